"""A trial restored from its newest checkpoint on storage even when Tune's sweep state names one
Tune has since deleted.

Why: Tune keeps `num_to_keep` checkpoints per trial and deletes the oldest as each new one is
registered, and it uploads the sweep state (which names each trial's latest checkpoints) at that
same moment, in the background. A head lost while that upload is in flight leaves on storage a
state naming checkpoints that no longer exist; Tune's restore then fails on every retry
("Could not recover from checkpoint as it does not exist on storage anymore") and the trial ends
in ERROR. The more often trials checkpoint, and the slower the upload, the likelier it is.

The repair, in the trial's own process before Tune restores: the newest checkpoint still in the
trial's folder (each holds the whole resumable state, odenet/train.py) is copied to the paths the
state names, so Tune's bookkeeping (what it restores, what it deletes next) finds what it
expects, and the trial resumes from an epoch at least as late as the state's.
"""

from __future__ import annotations

import logging
import posixpath
import re
from typing import Callable

import pyarrow.fs

log = logging.getLogger(__name__)

# Tune names a trial's checkpoint folders checkpoint_000000, checkpoint_000001, ... in order.
FOLDER = re.compile(r"checkpoint_(\d+)$")


def newest(fs: pyarrow.fs.FileSystem, trial_dir: str) -> str | None:
    """The trial's checkpoint folder written last (by its files' modification times; the higher
    index where they tie), None if none holds a file."""
    written: dict[str, tuple[float, int]] = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, recursive=True, allow_not_found=True)):
        folder = posixpath.dirname(info.path)
        found = FOLDER.search(posixpath.basename(folder))
        if info.is_file and found and posixpath.dirname(folder) == trial_dir.rstrip("/"):
            at = info.mtime.timestamp() if info.mtime else 0.0
            written[folder] = max(written.get(folder, (0.0, 0)), (at, int(found.group(1))))
    return max(written, key=written.get) if written else None


def repair(fs: pyarrow.fs.FileSystem, named: str, kept: int) -> str | None:
    """Copy the trial's newest surviving checkpoint to `named` and to the `kept - 1` folders
    before it that Tune also holds (and will delete) where they are missing; the folder copied,
    or None when `named` exists or nothing survives to copy."""
    if fs.get_file_info(named).type != pyarrow.fs.FileType.NotFound:
        return None
    trial_dir, name = posixpath.split(named.rstrip("/"))
    source = newest(fs, trial_dir)
    index = FOLDER.search(name)
    if source is None or index is None:
        return None
    last = int(index.group(1))
    width = len(index.group(1))
    for i in range(max(last - kept + 1, 0), last + 1):
        target = posixpath.join(trial_dir, f"checkpoint_{i:0{width}d}")
        if target == named.rstrip("/") or fs.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
            fs.create_dir(target)
            pyarrow.fs.copy_files(source, target, source_filesystem=fs, destination_filesystem=fs)
    log.warning("checkpoint %s named by the sweep state was deleted before that state was replaced "
                "(the head was lost mid-upload): resuming from the newest one on storage, %s", named, source)
    return source


class RestoresNewest:
    """Tune's restore, after repairing a deleted checkpoint (above); `kept` as Tune keeps them."""

    kept: int

    def restore(self, checkpoint_path):
        checkpoint = getattr(checkpoint_path, "checkpoint", None)  # Tune's _TrainingResult
        if checkpoint is not None:
            repair(checkpoint.filesystem, checkpoint.path, self.kept)
        return super().restore(checkpoint_path)


def restoring_newest(trainable: Callable, kept: int) -> Callable:
    """`trainable` (a Tune function trainable) whose restore repairs a deleted checkpoint first:
    a mixin, Tune's way to add to the class it wraps a function in."""
    mixin = type("RestoresNewest", (RestoresNewest,), {"kept": kept})
    trainable.__mixins__ = (mixin, *getattr(trainable, "__mixins__", ()))
    return trainable
