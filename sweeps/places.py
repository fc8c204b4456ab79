"""Where a sweep keeps what must outlast it: the MLflow store and the sweep's state (a
folder, or S3 through the filesystem Tune is given).

Run from a checkout, the embedded defaults live in the working directory (`mlruns.db`,
`ray_results/`). A driver that `ray job submit` started runs in a copy of the checkout
that Ray deletes with its session, so there the same defaults go to a stable folder on
the machine that runs the driver: $ODENET_HOME, by default ~/odenet. A tracking URI or
an absolute or s3:// storage path given explicitly is used as given (on Kubernetes the
head has both, and nothing changes).
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from odenet import envvars, tracking

DEFAULT_STORAGE = "ray_results"
# The driver of a submitted job runs in an unpacked package named _ray_pkg_<hash> under
# the session's folder (and Ray sets envvars.RAY_JOB_CONFIG for it).
RAY_PACKAGE_PREFIX = "_ray_pkg_"


class PlaceError(ValueError):
    """A place the sweep must write to cannot be written; the message names the fix."""


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit`, whose working directory Ray deletes later."""
    return (bool(os.environ.get(envvars.RAY_JOB_CONFIG))
            or any(p.startswith(RAY_PACKAGE_PREFIX) for p in Path.cwd().parts))


def home() -> Path:
    """The stable folder of a submitted sweep: $ODENET_HOME, or ~/odenet."""
    return Path(os.environ.get(envvars.HOME) or Path.home() / "odenet").expanduser().resolve()


@dataclass(frozen=True)
class Places:
    storage_path: str  # absolute folder or s3://bucket/prefix
    tracking_uri: str
    stable_home: Path | None  # set when the defaults were moved out of a Ray job's working directory

    def describe(self, name: str) -> str:
        state = f"{self.storage_path.rstrip('/')}/{name}"
        where = f" (in {self.stable_home}, ${envvars.HOME})" if self.stable_home else ""
        return f"runs in {self.tracking_uri}, sweep state in {state}{where}"

    @functools.cached_property
    def tune_storage(self) -> tuple[str, Any]:
        """(storage path, filesystem) as Tune takes them: a local folder and None, or bucket/prefix and
        an S3 filesystem for AWS S3 or an S3-compatible store whose endpoint the standard variables give.
        Built once per sweep (cached): the restore check, the Tuner and its restore share it."""
        if not self.storage_path.startswith("s3://"):
            return self.storage_path, None
        import pyarrow.fs

        endpoint = os.environ.get(envvars.S3_ENDPOINT) or os.environ.get(envvars.MLFLOW_S3_ENDPOINT)
        options: dict[str, Any] = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            options.update(endpoint_override=host or scheme, scheme=scheme if host else "http")
        region = os.environ.get(envvars.REGION) or os.environ.get(envvars.AWS_REGION)
        if region:
            options["region"] = region
        return self.storage_path[len("s3://"):].rstrip("/"), pyarrow.fs.S3FileSystem(**options)


def settle(storage_path: str | None) -> Places:
    """Fix where the sweep's runs and state go, before anything is written, and check that
    this machine can write there. In a Ray job an unset MLFLOW_TRACKING_URI is set to the
    embedded store in home(), and a relative storage path is taken relative to home()."""
    stable = home() if in_ray_job() else None
    base = stable or Path.cwd()
    if stable is not None and tracking.is_embedded():
        _writable(stable, f"the embedded MLflow store of a submitted sweep goes to {stable}",
                  f"set {envvars.HOME} to a folder it can write, or {envvars.TRACKING_URI} to a tracking server")
        os.environ[envvars.TRACKING_URI] = f"sqlite:///{stable / tracking.EMBEDDED_DB}"
    given = storage_path or DEFAULT_STORAGE
    if given.startswith("s3://"):
        return Places(given, tracking.tracking_uri(), stable)
    folder = (base / Path(given).expanduser()).resolve()
    _writable(folder, f"--storage-path {given}: the sweep state goes to {folder}",
              f"give --storage-path a folder it can write or an s3://bucket/prefix, or leave it out "
              f"for {base / DEFAULT_STORAGE}")
    return Places(str(folder), tracking.tracking_uri(), stable)


def _writable(folder: Path, what: str, fix: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        driver = "the Ray head, which runs the driver of `ray job submit`" if in_ray_job() else "this machine"
        raise PlaceError(f"{what}, but {driver} ({socket.gethostname()}) cannot write there "
                         f"({exc.strerror or exc}): {fix}") from None
