"""Which sweep an invocation runs: a new one, or an unfinished one it names again.

Every invocation without --name or --resume starts a new sweep, named as Ray Tune
names its experiments: the program, then the date and time. Naming a sweep again
(--name NAME, or --resume NAME, which refuses to start a new one) restores it if it is
unfinished; a finished sweep is not rerun, the message points to its results.
"""

from __future__ import annotations

from datetime import datetime

from odenet import sweep_record, tracking


class SweepNameError(ValueError):
    """--name/--resume name a sweep that cannot be run; the message says what to do instead."""


def new_name(program: str) -> str:
    """A fresh sweep name, e.g. architecture_ablation_2026-11-28_10-41-07 (Ray Tune's format)."""
    return f"{program}_{datetime.now():%Y-%m-%d_%H-%M-%S}"


def sweep_name(name: str | None, resume: str | None, program: str) -> str:
    """The name this invocation runs under: --resume, --name, or a new one."""
    if resume and name and name != resume:
        raise SweepNameError(f"--resume {resume} and --name {name} name two sweeps; give one of them")
    return resume or name or new_name(program)


def restoring(name: str, resume: bool, storage_path: str, filesystem, experiment: str) -> bool:
    """True when the named sweep is unfinished and is to be restored, False for a new sweep.
    Raises SweepNameError for --resume of a sweep that does not exist and for a finished sweep."""
    from ray import tune

    exists = tune.Tuner.can_restore(f"{storage_path}/{name}", storage_filesystem=filesystem)
    if not exists:
        if resume:
            known = _sweeps_in(storage_path, filesystem)
            listed = f"sweeps there: {', '.join(known)}" if known else "there is no sweep there"
            raise SweepNameError(f"--resume {name}: no sweep of that name in {storage_path} ({listed}); "
                                 f"check --resume and --storage-path, or leave --resume out for a new sweep")
        return False
    parent = sweep_record.find_parent_run(experiment, name)
    if parent is not None and parent.info.status == "FINISHED":
        raise SweepNameError(
            f"sweep {name!r} already finished: nothing to restore. Its results are the MLflow run "
            f"{parent.info.run_id} (results.md, results.csv) in experiment {experiment!r} at "
            f"{tracking.tracking_uri()}; `odenet report --experiment {experiment}` prints the study's tables. "
            f"For a new sweep, leave out --name/--resume or give a new name")
    return True


def announce(name: str, restore: bool, experiment: str, where) -> str:
    """The line that says which happened, and where the sweep's runs and state are."""
    what = f"restoring sweep {name!r} (unfinished)" if restore else f"new sweep {name!r}"
    return f"{what}, experiment {experiment!r}: {where.describe(name)}"


def _sweeps_in(storage_path: str, filesystem) -> list[str]:
    import pyarrow.fs

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(storage_path, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
