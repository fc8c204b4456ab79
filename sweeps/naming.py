"""Which sweep an invocation runs: a new one, or an unfinished one it names again.

Every invocation without --name or --resume starts a new sweep, named as Ray Tune
names its experiments: the program, then the date and time. Naming a sweep again
(--name NAME, or --resume NAME, which refuses to start a new one) restores it if it is
unfinished; a finished sweep is not rerun, the message points to its results.
"""

from __future__ import annotations

import argparse
from datetime import datetime

from odenet import tracking


class SweepNameError(ValueError):
    """--name/--resume name a sweep that cannot be run; the message says what to do instead."""


def new_name(program: str) -> str:
    """A fresh sweep name, e.g. architecture_ablation_2026-11-28_10-41-07 (Ray Tune's format)."""
    return f"{program}_{datetime.now():%Y-%m-%d_%H-%M-%S}"


def sweep_name(args: argparse.Namespace, program: str) -> str:
    """The name this invocation runs under: --resume, --name, or a new one."""
    if args.resume and args.name and args.name != args.resume:
        raise SweepNameError(f"--resume {args.resume} and --name {args.name} name two sweeps; give one of them")
    return args.resume or args.name or new_name(program)


def restoring(args: argparse.Namespace, storage_path: str, filesystem, experiment: str) -> bool:
    """True when the named sweep is unfinished and is to be restored, False for a new sweep.
    Raises SweepNameError for --resume of a sweep that does not exist and for a finished sweep."""
    from ray import tune

    exists = tune.Tuner.can_restore(f"{storage_path}/{args.name}", storage_filesystem=filesystem)
    if not exists:
        if args.resume:
            known = _sweeps_in(storage_path, filesystem)
            listed = f"sweeps there: {', '.join(known)}" if known else "there is no sweep there"
            raise SweepNameError(f"--resume {args.resume}: no sweep of that name in {storage_path} ({listed}); "
                                 f"check --resume and --storage-path, or leave --resume out for a new sweep")
        return False
    parent = _finished_parent(experiment, args.name)
    if parent is not None:
        raise SweepNameError(
            f"sweep {args.name!r} already finished: nothing to restore. Its results are the MLflow run {parent} "
            f"(results.md, results.csv) in experiment {experiment!r} at {tracking.tracking_uri()}; "
            f"`odenet report --experiment {experiment}` prints the study's tables. For a new sweep, leave out "
            f"--name/--resume or give a new name")
    return True


def announce(name: str, restore: bool, experiment: str, where) -> str:
    """The line that says which happened, and where the sweep's runs and state are."""
    what = f"restoring sweep {name!r} (unfinished)" if restore else f"new sweep {name!r}"
    return f"{what}, experiment {experiment!r}: {where.describe(name)}"


def _finished_parent(experiment: str, name: str) -> str | None:
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id],
                              f"tags.sweep_name = '{name}' and tags.sweep_role = 'parent'", max_results=1)
    return runs[0].info.run_id if runs and runs[0].info.status == "FINISHED" else None


def _sweeps_in(storage_path: str, filesystem) -> list[str]:
    import pyarrow.fs

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(storage_path, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
