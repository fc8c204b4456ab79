"""What a user's terminal shows while a run works: progress of every long phase, and no
third-party INFO logs unless asked.

Where the output goes decides the progress (`mode`): bars with a rate and an estimate on a
terminal (tqdm, on stderr); one line per phase when it ends elsewhere (pipes, CI and
`ray job logs` stay readable, no carriage returns); nothing where $ODENET_PROGRESS is off,
as a sweep sets it for its trials, whose view is Tune's progress table.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

from odenet import envvars
from odenet.config import ConfigError

T = TypeVar("T")
AUTO, BARS, LINES, OFF = "auto", "bars", "lines", "off"
MODES = (AUTO, BARS, LINES, OFF)
LEVELS = ("WARNING", "DEBUG", "INFO", "ERROR", "CRITICAL")  # the first is the default
# The loggers of the libraries whose INFO lines a user did not ask for (MLflow's database
# setup, alembic's migrations, Ray's startup), for processes that imported them already.
THIRD_PARTY = ("mlflow", "alembic", "ray")


def _given(name: str, allowed: tuple[str, ...], environ=os.environ) -> str:
    """The variable's value in the case `allowed` spells, its first entry where unset."""
    value = (environ.get(name) or allowed[0]).strip()
    return value.upper() if allowed is LEVELS else value.lower()


def check(environ=os.environ) -> None:
    """Raise ConfigError naming each of $ODENET_PROGRESS and $ODENET_LOG_LEVEL that holds a value
    it does not take: called where a program starts, before any work."""
    errors = [f"${name}={environ.get(name)!r}: expected one of {', '.join(allowed)}"
              for name, allowed in ((envvars.PROGRESS, MODES), (envvars.LOG_LEVEL, LEVELS))
              if _given(name, allowed, environ) not in allowed]
    if errors:
        raise ConfigError(errors)


def mode(environ=os.environ, stream=None) -> str:
    """bars, lines or off: $ODENET_PROGRESS where set (not auto), else bars when `stream`
    (default stderr) is a terminal and lines when it is not."""
    chosen = _given(envvars.PROGRESS, MODES, environ)
    if chosen not in MODES:
        check(environ)
    if chosen != AUTO:
        return chosen
    stream = sys.stderr if stream is None else stream
    return BARS if stream.isatty() else LINES


@contextmanager
def phase(description: str, total: int, unit: str = "images", per_epoch: bool = False
          ) -> Iterator[Callable[[int], None]]:
    """Show one phase of `total` units; yields the function to call with each count done.
    A `per_epoch` phase (training, validation) leaves no bar and no line: the epoch's own
    line says what it measured."""
    chosen = mode()
    if chosen == BARS:
        from tqdm import tqdm

        # A terminal that reports no size (a bare pseudo-terminal) would get its bars cut to nothing.
        size = {"dynamic_ncols": True} if _columns() else {"ncols": 100, "nrows": 24}
        with tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=not per_epoch, **size) as bar:
            yield bar.update
    elif chosen == LINES and not per_epoch:
        done = [0]
        started = time.perf_counter()
        yield lambda n: done.__setitem__(0, done[0] + n)
        elapsed = time.perf_counter() - started
        print(f"{description}: {done[0]:,} {unit} in {elapsed:.1f} s ({done[0] / max(elapsed, 1e-9):,.0f} {unit}/s)",
              file=sys.stderr, flush=True)
    else:
        yield lambda n: None


def tracked(items: Sequence[T], description: str, unit: str) -> Iterator[T]:
    """Each of `items`, shown as one phase counted in `unit`."""
    with phase(description, len(items), unit) as advance:
        for item in items:
            yield item
            advance(1)


def say(message: str) -> None:
    """A line for the user on stderr, above a bar that is showing."""
    if mode() == BARS:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


def quiet_third_party(verbose: bool = False) -> None:
    """Third-party logs below WARNING (or $ODENET_LOG_LEVEL; INFO when `verbose`) off the terminal:
    set through the libraries' own variables before they are imported, so Ray's workers inherit
    it, and on their loggers for a process that imported them already. A level it does not know
    counts as the default here; `check` names it."""
    given = _given(envvars.LOG_LEVEL, LEVELS)
    level = given if given in LEVELS else LEVELS[0]
    if verbose and level != "DEBUG":
        level = "INFO"
    # An explicit choice (--verbose, $ODENET_LOG_LEVEL) wins over the libraries' variables, which a
    # parent process (a sweep, a test session) may have set to its default; the default does not.
    chosen = os.environ.__setitem__ if verbose or os.environ.get(envvars.LOG_LEVEL) else os.environ.setdefault
    chosen(envvars.MLFLOW_LOGGING_LEVEL, level)
    chosen(envvars.RAY_LOGGER_LEVEL, level.lower())
    chosen(envvars.MLFLOW_ARTIFACTS_PROGRESS_BAR, "true" if level in ("INFO", "DEBUG") else "false")
    for name in THIRD_PARTY:
        if name in sys.modules:
            logging.getLogger(name).setLevel(level)
