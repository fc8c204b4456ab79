"""What a user of the README does, for the tests that follow it: the README's shell
commands (by section), a fresh copy of the checkout as a clone has it, and a user's shell
(no virtual environment active, no tracking server, a home of its own), in a PID and
network namespace of its own where the machine allows it."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, TELEMETRY_OFF, isolation

README = REPO / "README.md"


@dataclass(frozen=True)
class Command:
    chapter: str  # the level-2 heading it is under, e.g. "## Run on Kubernetes"
    section: str  # the heading right above its code block, e.g. "### On a local Ray cluster"
    text: str  # one command line, continuation lines joined, as bash reads it


def blocks(text: str | None = None, chapters: bool = False) -> list[tuple]:
    """(section, lines) of every bash/sh code block, indentation removed; with `chapters`,
    (chapter, section, lines)."""
    text = README.read_text() if text is None else text
    found, chapter, section, block, indent = [], "", "", None, 0
    for line in text.splitlines():
        fence = re.match(r"^( *)```(\w*)\s*$", line)
        if block is None:
            if fence and fence.group(2) in ("bash", "sh"):
                block, indent = [], len(fence.group(1))
            elif line.startswith("#"):
                section = line.strip()
                chapter = section if re.match(r"^#{1,2} ", section) else chapter
            continue
        if fence:
            found.append((chapter, section, block) if chapters else (section, block))
            block = None
            continue
        block.append(line[indent:] if line.startswith(" " * indent) else line.lstrip())
    return found


def commands(text: str | None = None) -> list[Command]:
    """Every command line of the README's bash/sh blocks, in order; comment-only lines dropped."""
    out = []
    for chapter, section, lines in blocks(text, chapters=True):
        pending = ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].rstrip() + " "
                continue
            joined = (pending + line.strip()).strip()
            pending = ""
            if joined and not joined.startswith("#"):
                out.append(Command(chapter, section, joined))
    return out


def copy_checkout(root: Path) -> Path:
    """The checkout's files (tracked and untracked-not-ignored) copied to `root`, committed in a
    git repository of its own, with the project's .venv linked in."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)  # times kept: make sees .venv up to date
    (root / ".venv").symlink_to(REPO / ".venv")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], cwd=root, check=True)
    assert subprocess.run(["make", "-q", ".venv/.installed"], cwd=root).returncode == 0, \
        "the checkout's .venv is older than pyproject.toml: run `make venv` first"
    return root


def run_script(lines: list[str], cwd: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run shell lines with bash as a user's terminal would, in a PID and network namespace of their
    own: the README's `ray stop` and its services' fixed ports touch nothing outside, and killing
    the namespace ends whatever the lines left running. Fails the test where none can be made."""
    wrapper = isolation(required=True)
    script = "set -eo pipefail\nip link set lo up\n" + "\n".join(lines) + "\n"
    proc = subprocess.Popen([*wrapper, "bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the namespace's first process: the kernel ends the rest
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def user_env(home: Path, data_dir: Path) -> dict[str, str]:
    """A fresh user's shell: no virtual environment, no tracking server, no Ray settings but
    telemetry off; Ray's files in a short folder of their own (socket paths are limited to 108 bytes)."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "ODENET_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(TELEMETRY_OFF, HOME=str(home), RAY_TMPDIR=ray_tmp, ODENET_DATA_DIR=str(data_dir),
               PATH=os.pathsep.join(p for p in env.get("PATH", os.defpath).split(os.pathsep)
                                    if not p.startswith(str(REPO))))
    return env


def section(heading: str, text: str | None = None) -> str:
    """The README's text under `heading` (a whole heading line), up to the next heading of any level."""
    text = README.read_text() if text is None else text
    after = text.split(f"\n{heading}\n", 1)[1]
    return re.split(r"^#{1,6} ", after, maxsplit=1, flags=re.M)[0]


def table(text: str) -> list[dict[str, str]]:
    """The first markdown table in `text`: one dict of cell strings per row, keyed by the header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def number(text: str) -> float:
    """A number as the README or a program prints it: 1,477 or **185 (7.7 days)** or 0.25."""
    return float(re.search(r"-?[\d,]*\.?\d+", text.replace("*", "")).group().replace(",", ""))


def same_number(shown: str, value: float, printed: bool = False) -> bool:
    """`shown` (a README cell) is `value` rounded to the digits `shown` has. With `printed`, `value`
    is itself rounded as --estimate prints hours: three significant digits, whole from 100 up."""
    digits = re.search(r"\.(\d+)", shown.split("(")[0])
    tolerance = 0.5 * 10 ** -(len(digits.group(1)) if digits else 0)
    if printed and value:
        tolerance += min(0.5, 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 2))
    return abs(number(shown) - value) <= tolerance + 1e-9
