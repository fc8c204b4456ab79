"""Every wrong value of every run setting, given to every program that takes run settings,
is named in one clear message with exit code 2, before anything starts: generated from
RunConfig's own field list, so a new field is covered the day it is added."""

from dataclasses import fields

import pytest
import yaml

from odenet import cli
from odenet.config import ConfigError, RunConfig
from sweeps.architecture_ablation import architecture_ablation
from sweeps.parameter_efficiency import parameter_efficiency
from sweeps.tuning import main as sweep_main

# Candidates of every kind; each field keeps those RunConfig itself rejects.
CANDIDATES = ("bogus", "-7", "1.5", "nan", "0", "1e999", "", "[1, 2]")


def rejected(name: str, value) -> bool:
    try:
        RunConfig.from_dict({name: value})
    except ConfigError:
        return True
    return False


def from_yaml(text: str):
    return yaml.safe_load(text) if text else text


# (field, text): rejected as YAML in a --config file; the flag route (a string) where that is rejected too
WRONG = [(f.name, v) for f in fields(RunConfig) for v in CANDIDATES if rejected(f.name, from_yaml(v))]


def test_every_field_has_wrong_values_to_try():
    settable = {f.name for f in fields(RunConfig)} - {"data_dir"}  # any folder name is a folder name
    assert settable <= {name for name, _ in WRONG}


def _nothing_started(folder):
    import ray

    assert not ray.is_initialized()
    assert sorted(p.name for p in folder.iterdir()) == ["run.yaml"]


PROGRAMS = {
    "odenet train": lambda argv: cli.main(["train", *argv]),
    "architecture_ablation": lambda argv: sweep_main(architecture_ablation, argv),
    "architecture_ablation one-at-a-time": lambda argv: sweep_main(architecture_ablation,
                                                                   ["--design", "one-at-a-time", *argv]),
    "parameter_efficiency": lambda argv: sweep_main(parameter_efficiency, argv),
}


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_wrong_setting_is_named_and_nothing_starts(program, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    run = PROGRAMS[program]
    for name, value in WRONG:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({name: from_yaml(value)}))
        ways = [["--config", "run.yaml"]]
        is_bool = str(next(f for f in fields(RunConfig) if f.name == name).type) == "bool"
        if not is_bool and rejected(name, value):
            ways.append([f"--{name.replace('_', '-')}", value])
        for argv in ways:
            code = run(argv)
            err = capsys.readouterr().err
            assert code == 2, (program, argv)
            assert f"{name}=" in err or f"{name}:" in err, (program, argv, err)
            assert "Traceback" not in err
            _nothing_started(tmp_path)
