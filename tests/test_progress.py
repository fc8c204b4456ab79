"""What a user sees while a run works: bars on a terminal, one line per phase in a pipe, nothing
in a sweep's trials, and no third-party INFO logs unless asked."""

import io
import logging
import os
import pty
import subprocess
import sys

import pytest

from odenet import envvars, progress
from odenet.config import ConfigError
from odenet.evaluate import REEVALUATION_SOLVERS
from tests.test_cli import odenet

MLFLOW_INFO = "Creating initial MLflow database tables"


def tiny_run(data_dir, *extra):
    return ["train", "--model", "odenet-simple", "--width", "4", "--subset", "128", "--test-subset", "64",
            "--max-epochs", "1", "--data-dir", str(data_dir), "--device", "cpu", "--checkpoint-dir", "ck", *extra]


def on_a_terminal(args, cwd) -> str:
    """What a run writes to a pseudo-terminal (stdout and stderr both, as a user sees them)."""
    controller, terminal = pty.openpty()
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop(envvars.PROGRESS, None)
    process = subprocess.Popen([sys.executable, "-m", "odenet.cli", *args], cwd=cwd, env=env,
                               stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the run closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert process.wait(timeout=600) == 0, seen.decode(errors="replace")[-3000:]
    return seen.decode(errors="replace")


def bars(output: str, description: str) -> list[str]:
    """The states a bar was drawn in: each carriage-return-separated piece naming it."""
    return [piece for line in output.split("\n") for piece in line.split("\r") if piece.startswith(description + ":")]


def test_a_run_on_a_terminal_shows_the_plan_and_a_bar_for_the_test_and_each_solver(tmp_path, real_data_dir):
    output = on_a_terminal(tiny_run(real_data_dir), tmp_path)
    assert "plan: 1 epoch on 102 training images" in output and "then the test evaluation on 64 images" in output
    assert "re-evaluation with 5 solvers" in output and "roughly" in output
    for description in ["epoch 1 training", "test evaluation"] + [f"re-evaluation {n}" for n, _, _ in REEVALUATION_SOLVERS]:
        drawn = bars(output, description)
        assert drawn, f"no progress shown for {description}"
        # a bar: carriage-return redrawn, ending at its total with a rate
        assert any("100%" in d and "images/s" in d for d in drawn), (description, drawn)
    assert "\r" in output
    assert "test accuracy" in output  # the summary after the bars


def test_a_run_into_a_pipe_prints_one_line_per_phase_and_no_bars_nor_third_party_info(tmp_path, real_data_dir):
    result = odenet(*tiny_run(real_data_dir), cwd=tmp_path, env={envvars.PROGRESS: ""})
    assert result.returncode == 0, result.stderr
    seen = result.stdout + result.stderr
    assert "\r" not in seen
    assert "plan: 1 epoch" in result.stderr
    phases = [line.split(":")[0] for line in result.stderr.splitlines() if " images in " in line]
    assert phases == ["test evaluation"] + [f"re-evaluation {n}" for n, _, _ in REEVALUATION_SOLVERS]
    assert MLFLOW_INFO not in seen and " INFO " not in seen


def test_verbose_brings_back_the_third_party_info_logs(tmp_path, real_data_dir):
    result = odenet(*tiny_run(real_data_dir, "--no-reevaluate", "--verbose"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert MLFLOW_INFO in result.stderr


LIBRARY_VARIABLES = (envvars.LOG_LEVEL, envvars.MLFLOW_LOGGING_LEVEL, envvars.RAY_LOGGER_LEVEL,
                     envvars.MLFLOW_ARTIFACTS_PROGRESS_BAR)


def quieted(monkeypatch, verbose: bool, **given: str) -> tuple[str, str]:
    """quiet_third_party(verbose) from the variables `given` alone (the others unset), with the
    session's environment and loggers as they were afterwards: MLflow's and Ray's levels it set."""
    for name in LIBRARY_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded, so that teardown removes what the call sets
        monkeypatch.delenv(name)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    levels = {name: logging.getLogger(name).level for name in progress.THIRD_PARTY}
    try:
        progress.quiet_third_party(verbose)
    finally:
        for name, was in levels.items():
            logging.getLogger(name).setLevel(was)
    return os.environ[envvars.MLFLOW_LOGGING_LEVEL], os.environ[envvars.RAY_LOGGER_LEVEL]


@pytest.mark.parametrize("given, verbose, level", [(None, False, "WARNING"), ("info", False, "INFO"),
                                                   (None, True, "INFO"), ("error", False, "ERROR")])
def test_the_log_level_variable_sets_the_libraries_own(given, verbose, level, monkeypatch):
    given = {envvars.LOG_LEVEL: given} if given else {}
    assert quieted(monkeypatch, verbose, **given) == (level, level.lower())


@pytest.mark.parametrize("verbose, level", [(False, "ERROR"), (True, "INFO")])
def test_verbose_wins_over_a_level_inherited_from_a_parent_process(verbose, level, monkeypatch):
    """A sweep or a test session quietens the libraries through their variables; a child run asked
    for --verbose still gets INFO, and without it keeps what it inherited."""
    inherited = {envvars.MLFLOW_LOGGING_LEVEL: "ERROR", envvars.RAY_LOGGER_LEVEL: "error"}
    assert quieted(monkeypatch, verbose, **inherited) == (level, level.lower())


class Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_the_progress_mode_follows_the_output_and_the_variable():
    assert progress.mode({}, Stream(terminal=True)) == progress.BARS
    assert progress.mode({}, Stream(terminal=False)) == progress.LINES
    assert progress.mode({envvars.PROGRESS: "auto"}, Stream(terminal=True)) == progress.BARS
    assert progress.mode({envvars.PROGRESS: "lines"}, Stream(terminal=True)) == progress.LINES
    # a sweep's trials: off even where Ray hands them a terminal
    assert progress.mode({envvars.PROGRESS: "OFF"}, Stream(terminal=True)) == progress.OFF


def test_a_sweeps_workers_show_no_progress():
    from sweeps.tuning import worker_env

    assert progress.mode(worker_env(), Stream(terminal=True)) == progress.OFF


def test_bad_progress_or_log_level_is_named_with_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"\$ODENET_PROGRESS='bar': expected one of auto, bars, lines, off"):
        progress.mode({envvars.PROGRESS: "bar"}, Stream(terminal=True))
    result = odenet("describe", "--model", "resnet-small", cwd=tmp_path,
                    env={envvars.PROGRESS: "fancy", envvars.LOG_LEVEL: "loud"})
    assert result.returncode == 2
    assert "$ODENET_PROGRESS='fancy': expected one of auto, bars, lines, off" in result.stderr
    assert "$ODENET_LOG_LEVEL='loud': expected one of WARNING, DEBUG, INFO, ERROR, CRITICAL" in result.stderr
