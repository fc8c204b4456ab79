"""Shared fixtures: small data files in real formats, the real FashionMNIST, tiny configs; and the
suite's hygiene: telemetry off, each test's own HOME and Ray folder, a PID namespace for `ray stop`,
and under CI (CI=true) a missing tool or data set fails instead of skipping."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from odenet.config import RunConfig
from odenet.data import SYSTEM_FASHION_MNIST_IDX, import_fashion_mnist_idx
from tests.datasets import write_cifar10, write_fashion_mnist_idx

pytest_plugins = ["tests.stack", "tests.sweep_fixtures"]

REPO = Path(__file__).resolve().parents[1]
# Under CI every test runs: a missing tool, data set or CRD is a failure, not a skip.
CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
# No usage statistics or telemetry from any process the suite starts (Ray; MLflow 3, which also
# honours DO_NOT_TRACK). tests/readme.py passes these on to the user's shell it makes.
TELEMETRY_OFF = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


_SESSION_FOLDERS: list[str] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "ci_may_skip: a skip that is right under CI too (e.g. no GPU there)")
    os.environ.update(TELEMETRY_OFF)
    # Session fixtures (services, shared sweeps) get a HOME and a Ray folder of the session's own;
    # each test one of its own (own_home_and_ray_folder).
    session = tempfile.mkdtemp(prefix="odenet-tests-")
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    _SESSION_FOLDERS.extend([session, ray_tmp])
    os.makedirs(f"{session}/home")
    os.environ.update(HOME=f"{session}/home", RAY_TMPDIR=ray_tmp)
    # Every subprocess would otherwise build matplotlib's font cache in its fresh HOME: one for the session.
    os.environ.setdefault("MPLCONFIGDIR", f"{session}/matplotlib")


def pytest_unconfigure(config):
    for folder in _SESSION_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


# Under pytest-xdist (`make test`: two workers, --dist loadfile) a work unit is a whole file, so
# that a module's fixtures are built once, except that the files reading the session's smoke
# sweep form one unit, so that it is run once. Units are handed out in LONGEST_FIRST's order
# (each worker takes the next when it finishes one), so that no long one starts last: seconds of
# a serial run on 2 cores (`--durations=0`, 2026-12-05), summed per unit; the rest follow in file
# order. (xdist's own --dist loadgroup marks do nothing under pytest 9: it renames node ids
# through an attribute pytest no longer reads.)
SMOKE_UNIT = "smoke sweep"
SMOKE_SWEEP_FILES = {"tests/test_sweep.py", "tests/test_estimate.py", "tests/test_mlflow_ui.py"}
LONGEST_FIRST = {"tests/test_readme.py": 414, SMOKE_UNIT: 342, "tests/test_ray_job.py": 172,
                 "tests/test_cluster.py": 144, "tests/test_tracking.py": 107, "tests/test_cli.py": 63,
                 "tests/test_optuna_search.py": 60, "tests/test_bench.py": 55, "tests/test_report.py": 45,
                 "tests/test_k8s.py": 43}


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def work_unit(nodeid: str) -> str:
    return SMOKE_UNIT if file_of(nodeid) in SMOKE_SWEEP_FILES else file_of(nodeid)


def pytest_collection_modifyitems(config, items):
    strays = sorted({file_of(item.nodeid) for item in items if "smoke_sweep" in item.fixturenames}
                    - SMOKE_SWEEP_FILES)
    if strays:
        raise pytest.UsageError(f"{', '.join(strays)} read the smoke sweep: add them to SMOKE_SWEEP_FILES "
                                "in tests/conftest.py, or two workers each run it")
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable: file order otherwise


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class ByWorkUnit(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    if config.getvalue("dist") == "loadfile":
        config.option.loadscopereorder = False  # the collection's order is LONGEST_FIRST's
        return ByWorkUnit(config, log)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skip is a failure (the check it stands for did not run), unless the test is
    marked ci_may_skip; locally the skip stays, its reason naming the fix."""
    report = (yield).get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail") and not item.get_closest_marker("ci_may_skip"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every check must run: {reason}"


@pytest.fixture(autouse=True)
def own_home_and_ray_folder(monkeypatch, tmp_path_factory):
    """Each test's HOME (Ray's token, ~/odenet, ~/.cache) and Ray temp folder (RAY_TMPDIR, which
    `ray start` and `ray.init` read; /tmp/ray otherwise) are folders of its own, so no test sees
    another's or the user's cluster, token or results. The Ray folder is short and under /tmp:
    Ray's socket paths are limited to 108 bytes."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    yield
    shutil.rmtree(ray_tmp, ignore_errors=True)


def table_rows(stdout):
    """The rows of the results table printed at the end (not those of Tune's live progress table)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| trial "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


@functools.cache
def _namespace(net: bool) -> list[str]:
    if shutil.which("unshare") and (shutil.which("ip") or not net):
        command = ["unshare", "--pid", "--fork", "--mount-proc", *(["--net"] if net else [])]
        if subprocess.run([*command, "true"], capture_output=True).returncode == 0:
            return command
    return []


def isolation(net: bool = True, required: bool = False) -> list[str]:
    """A command prefix for a PID (and, with net, network) namespace of the test's own where the
    machine allows it (root): `ray stop` then stops only this test's Ray, killing the namespace's
    first process ends all of it, and with net Ray's default ports are free. With `required`
    (a test that runs `ray stop`, which kills Ray processes by name machine-wide) the test fails
    where none can be made, instead of running outside one."""
    command = _namespace(net)
    if required and not command:
        pytest.fail("this test runs `ray stop` (or services on fixed ports) and needs a PID"
                    f"{' and network' if net else ''} namespace of its own: run the tests as root with "
                    "`unshare` (util-linux)" + (" and `ip` (iproute2)" if net else ""), pytrace=False)
    return command


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory) -> Path:
    """A data folder holding the real FashionMNIST, imported from the Debian package's IDX files."""
    if not (SYSTEM_FASHION_MNIST_IDX / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"real FashionMNIST missing at {SYSTEM_FASHION_MNIST_IDX}: "
                    "apt-get install dataset-fashion-mnist (make test does this)")
    root = tmp_path_factory.mktemp("data")
    import_fashion_mnist_idx(SYSTEM_FASHION_MNIST_IDX, root)
    return root


@pytest.fixture
def fashion_idx(tmp_path, monkeypatch) -> Path:
    """Small FashionMNIST IDX .gz files, found through $ODENET_FASHION_MNIST_IDX."""
    folder = write_fashion_mnist_idx(tmp_path / "idx")
    monkeypatch.setenv("ODENET_FASHION_MNIST_IDX", str(folder))
    return folder


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    root = tmp_path / "cifar"
    write_cifar10(root)
    return root


@pytest.fixture
def tiny(real_data_dir):
    """A factory of small, fast configs on real FashionMNIST."""

    def make(**changes) -> RunConfig:
        values = dict(dataset="fashion-mnist", data_dir=str(real_data_dir), model="resnet-small", width=4,
                      subset=320, test_subset=200, batch_size=64, max_epochs=2, device="cpu",
                      reevaluate=False)
        values.update(changes)
        return RunConfig.from_dict(values)

    return make
