"""One --smoke sweep per test session, shared by the tests that read a finished sweep
(tests/test_sweep.py, test_mlflow_ui.py, test_estimate.py), with its wall and CPU time.

Run as a script, this file is the measuring wrapper: `python tests/sweep_fixtures.py OUT.json
-- COMMAND...` runs COMMAND, reaps every process it left (Ray's outlive the driver by a moment)
and writes to OUT.json the wall time, the CPU time of the whole process tree and the CPU time
the rest of the machine took meanwhile (the machine is shared: see Measured.fastest_s).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABLATION = str(REPO / "sweeps" / "architecture_ablation.py")
PR_SET_CHILD_SUBREAPER = 36
# How long Ray's processes may outlive the driver before the wrapper ends them.
REAP_S = 60


@dataclass(frozen=True)
class Measured:
    """What a command printed and what it cost."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system time of every process of the command's tree
    others_cpu_s: float  # CPU time every other process of the machine took meanwhile

    @property
    def fastest_s(self) -> float:
        """The least wall time the command could have taken here: its CPU time spread over every
        core. On a shared machine its wall time on an idle one lies between this and wall_s."""
        return self.cpu_s / len(os.sched_getaffinity(0))


def measured_run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> Measured:
    """Run `command` under the measuring wrapper (this file as a script)."""
    out = cwd / f"measured-{time.monotonic_ns()}.json"
    wrapper = subprocess.Popen([sys.executable, __file__, str(out), "--", *command], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = wrapper.communicate(timeout=timeout)
    finally:
        # on a timeout or Ctrl-C: the command, its Ray and the wrapper, all in the wrapper's session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(wrapper.pid, signal.SIGKILL)
        wrapper.wait()
    times = json.loads(out.read_text()) if out.exists() else dict.fromkeys(("wall_s", "cpu_s", "busy_s"), math.nan)
    return Measured(wrapper.returncode, stdout, stderr, times["wall_s"], times["cpu_s"],
                    max(0.0, times["busy_s"] - times["cpu_s"]))


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (/proc/stat: all but idle and iowait)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class SmokeSweep:
    """The session's --smoke sweep: its experiment, what it printed, what it cost, and what
    --estimate said it would cost beforehand."""

    experiment: str
    run: Measured
    estimate: str
    storage_prefix: str  # its state in the stack's bucket


SMOKE_NAME = "smoke"


@pytest.fixture(scope="session")
def smoke_sweep(tracking_stack, real_data_dir, tmp_path_factory) -> SmokeSweep:
    """One `architecture_ablation.py --smoke` on a local Ray, logging to the tracking stack, its
    state on S3 (SeaweedFS); run once per session for every test that reads a finished sweep."""
    cwd = tmp_path_factory.mktemp("smoke")
    # Ray's socket paths must stay under 108 bytes: its temporary folder is a short one of its own
    # (pytest's base folder is longer under pytest-xdist, which adds popen-gwN/)
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, **tracking_stack.env, "HOME": str(cwd), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    flags = ["--smoke", "--name", SMOKE_NAME, "--storage-path", f"s3://{tracking_stack.bucket}/ray",
             "--data-dir", str(real_data_dir)]
    estimate = subprocess.run([sys.executable, ABLATION, *flags, "--estimate"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    try:
        run = measured_run([sys.executable, ABLATION, *flags], cwd, env, timeout=1800)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return SmokeSweep(SMOKE_NAME, run, estimate.stdout, f"ray/{SMOKE_NAME}/")


def _measure(out: str, command: list[str]) -> int:
    """Run `command` as this process's child, adopt its orphans (a subreaper) so that their CPU
    time counts, reap them all, and write {"wall_s", "cpu_s"} to `out`."""
    import ctypes
    import resource

    import psutil

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    start, busy = time.monotonic(), _busy_s()
    child = subprocess.Popen(command)
    try:
        code = child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    wall, busy = time.monotonic() - start, _busy_s() - busy
    deadline = time.monotonic() + REAP_S
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break  # every descendant reaped
        if pid == 0:
            if time.monotonic() > deadline:
                for process in psutil.Process().children(recursive=True):
                    process.kill()
            time.sleep(0.1)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(out).write_text(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "busy_s": busy}))
    return code


if __name__ == "__main__":
    sys.exit(_measure(sys.argv[1], sys.argv[sys.argv.index("--") + 1:]))
