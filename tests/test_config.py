"""The run configuration: built from a dict, a file or flags; bad values named at once."""

import json

import pytest

from odenet.cli import build_parser
from odenet.config import ConfigError, RunConfig


def test_defaults_are_the_studys():
    c = RunConfig()
    assert (c.model, c.dataset, c.channels, c.augment_dims, c.stride) == ("odenet-simple", "fashion-mnist", 64, 2, 2)
    assert (c.solver, c.rtol, c.atol, c.adjoint, c.patience) == ("dopri5", 1e-3, 1e-3, "adjoint", 5)
    assert RunConfig(dataset="cifar10").channels == 256


def test_from_dict_coerces_what_tune_and_yaml_hand_over():
    import numpy as np

    c = RunConfig.from_dict({"lr": "1e-3", "stride": np.int64(1), "final_time": "5", "subset": "null",
                             "reevaluate": "false", "weight_decay": np.float32(0.5)})
    assert c.lr == 1e-3 and c.stride == 1 and c.final_time == 5.0 and c.subset is None
    assert c.reevaluate is False and c.weight_decay == 0.5


def test_from_yaml_and_json_files(tmp_path):
    (tmp_path / "run.yaml").write_text("model: resnet-large\nlr: 1e-4\nnorm: batchnorm\n")
    (tmp_path / "run.json").write_text(json.dumps({"model": "odenet-complex", "final_time": 2}))
    assert RunConfig.from_file(tmp_path / "run.yaml").model == "resnet-large"
    assert RunConfig.from_file(tmp_path / "run.yaml").lr == 1e-4
    assert RunConfig.from_file(tmp_path / "run.json", final_time=10).final_time == 10.0


def test_flags_override_the_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text("model: resnet-large\nlr: 0.01\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--lr", "0.002"])
    c = RunConfig.from_args(args)
    assert c.model == "resnet-large" and c.lr == 0.002


def test_defaults_handed_to_from_args_sit_below_the_file_and_the_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("width: 16\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--subset", "512"])
    c = RunConfig.from_args(args, defaults={"width": 8, "subset": 1024, "max_epochs": 3})
    assert (c.width, c.subset, c.max_epochs) == (16, 512, 3)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("activation_inside", "gelu", "activation_inside='gelu': expected one of relu, tanh, softplus"),
        ("activation_before", "elu", "activation_before='elu': expected one of none, relu, tanh, softplus"),
        ("model", "vit", "model='vit': expected one of odenet-simple, resnet-small"),
        ("dataset", "mnist", "dataset='mnist': expected one of fashion-mnist, cifar10"),
        ("norm", "layernorm", "norm='layernorm': expected one of groupnorm, batchnorm, none"),
        ("solver", "rk45", "solver='rk45': expected one of dopri5"),
        ("stride", 3, "stride=3: expected one of 1, 2"),
        ("final_time", -1, "final_time=-1.0: expected a number > 0"),
        ("lr", 0, "lr=0.0: expected a number > 0"),
        ("weight_decay", -0.1, "weight_decay=-0.1: expected a number >= 0"),
        ("augment_dims", -2, "augment_dims=-2: expected a number >= 0"),
        ("optimizer", "rmsprop", "optimizer='rmsprop': expected one of adam, sgd"),
        ("adjoint", "maybe", "adjoint='maybe': expected one of adjoint, seminorm, direct"),
        ("batch_size", 0, "batch_size=0: expected a number >= 1"),
        ("momentum", 1.5, "momentum=1.5: expected a number in [0, 1)"),
        ("device", "tpu", "device='tpu': expected one of auto, cpu, cuda, cuda:N"),
        ("max_epochs", "ten", "max_epochs='ten': expected an integer"),
        ("rtol", "tight", "rtol='tight': expected a number"),
        ("stride", 1.5, "stride=1.5: expected an integer"),
        ("colour", "red", "unknown field 'colour': expected one of dataset, data_dir"),
    ],
)
def test_bad_value_is_named_with_what_is_allowed(field, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({field: value})
    assert message in str(err.value)


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"activation_inside": "gelu", "stride": 3, "lr": -1, "norm": "x"})
    assert len(err.value.errors) == 4
    text = str(err.value)
    for name in ("activation_inside", "stride", "lr", "norm"):
        assert name in text


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        RunConfig.from_file(tmp_path / "nope.yaml")


def test_to_dict_round_trips():
    c = RunConfig(model="resnet-small", lr=0.01, subset=100)
    assert RunConfig.from_dict(c.to_dict()) == c


def test_none_is_a_value_of_activation_before_and_None_leaves_it_unset():
    # "none" (no activation) is a choice; "None" is how MLflow logs an unset field
    assert RunConfig.from_dict({"activation_before": "none"}).activation_before == "none"
    assert RunConfig().replace(activation_before="none").activation_before == "none"
    assert RunConfig.from_dict({"activation_before": "None"}).activation_before == "relu"
    assert RunConfig.from_dict({"model": "odenet-complex", "stride": "None"}).stride is None


def test_the_fast_recipe_trains_with_fixed_steps_validates_with_dopri5_and_yields_to_flags(capsys):
    import argparse

    from odenet.config import RECIPES

    parser = argparse.ArgumentParser()
    RunConfig.add_arguments(parser)
    fast = RunConfig.from_args(parser.parse_args(["--recipe", "fast"]))
    assert (fast.adjoint, fast.solver, fast.step_size, fast.eval_solver) == ("direct", "rk4", 1.0, "dopri5")
    assert RunConfig.from_args(parser.parse_args(["--recipe", "fast", "--solver", "midpoint"])).solver == "midpoint"
    assert RunConfig.from_args(parser.parse_args(["--recipe", "study"])) == RunConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--recipe", "quick"])
    assert "invalid choice: 'quick' (choose from 'study', 'fast')" in capsys.readouterr().err
    assert set(RECIPES) == {"study", "fast"}
