"""A restore whose sweep state names a checkpoint Tune has deleted resumes from the newest one on
storage (sweeps/trial_checkpoints.py), on a local folder and on the real S3 endpoint."""

import time
import uuid

import pyarrow.fs
import pytest

from sweeps.places import Places
from sweeps.trial_checkpoints import newest, repair


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, trial folder) as Tune hands them to a trial: a local folder, or bucket/prefix on S3."""
    if request.param == "local":
        return pyarrow.fs.LocalFileSystem(), str(tmp_path / "trial_ab12")
    stack = request.getfixturevalue("tracking_stack")
    request.getfixturevalue("tracking_env")
    path, fs = Places(f"s3://{stack.bucket}/repair-{uuid.uuid4().hex[:8]}", "", None).tune_storage
    return fs, f"{path}/trial_ab12"


def write(fs: pyarrow.fs.FileSystem, folder: str, epoch: int) -> None:
    fs.create_dir(folder)
    with fs.open_output_stream(f"{folder}/checkpoint.pt") as out:
        out.write(f"epoch {epoch}".encode())


def read(fs: pyarrow.fs.FileSystem, folder: str) -> str:
    with fs.open_input_stream(f"{folder}/checkpoint.pt") as stream:
        return stream.read().decode()


def exists(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def test_a_deleted_named_checkpoint_is_rebuilt_from_the_newest_written(storage):
    fs, trial = storage
    # A folder left from before an earlier restore: a higher index, an older epoch, written first.
    write(fs, f"{trial}/checkpoint_000009", 5)
    time.sleep(1.1)  # S3 keeps modification times to the second
    write(fs, f"{trial}/checkpoint_000006", 6)
    write(fs, f"{trial}/checkpoint_000007", 7)
    assert newest(fs, trial) == f"{trial}/checkpoint_000007"

    # The state names 000005 (and, keeping 2, holds 000004 too); Tune deleted both.
    assert repair(fs, f"{trial}/checkpoint_000005", kept=2) == f"{trial}/checkpoint_000007"
    assert read(fs, f"{trial}/checkpoint_000005") == "epoch 7"
    assert read(fs, f"{trial}/checkpoint_000004") == "epoch 7"
    assert not exists(fs, f"{trial}/checkpoint_000003")
    assert [read(fs, f"{trial}/checkpoint_{i:06d}") for i in (6, 7, 9)] == ["epoch 6", "epoch 7", "epoch 5"]


def test_a_checkpoint_that_exists_is_restored_as_named(storage):
    fs, trial = storage
    write(fs, f"{trial}/checkpoint_000002", 2)
    write(fs, f"{trial}/checkpoint_000003", 3)
    assert repair(fs, f"{trial}/checkpoint_000002", kept=2) is None
    assert read(fs, f"{trial}/checkpoint_000002") == "epoch 2"
    assert not exists(fs, f"{trial}/checkpoint_000001")


def test_with_nothing_left_to_restore_from_tune_reports_the_missing_checkpoint(storage):
    fs, trial = storage
    assert newest(fs, trial) is None
    assert repair(fs, f"{trial}/checkpoint_000004", kept=2) is None
    assert not exists(fs, f"{trial}/checkpoint_000004")
