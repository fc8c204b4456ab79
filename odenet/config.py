"""The run configuration: one typed object, the only source of a run's settings.

A `RunConfig` is built from CLI flags (it declares its own: `add_arguments`,
`from_args`), from a plain dict (what a Ray Tune trial receives) or from a YAML/JSON
file, and validated once, here, with a message that names every bad field, its value
and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

DATASETS = ("fashion-mnist", "cifar10")
MODELS = ("odenet-simple", "resnet-small", "resnet-large", "odenet-complex", "resnet-complex")
ODE_MODELS = ("odenet-simple", "odenet-complex")
SIMPLE_MODELS = ("odenet-simple", "resnet-small", "resnet-large")
ACTIVATIONS_BEFORE = ("none", "relu", "tanh", "softplus")
ACTIVATIONS_INSIDE = ("relu", "tanh", "softplus")
NORMS = ("groupnorm", "batchnorm", "none")
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun3", "rk4", "explicit_adams", "implicit_adams")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_STEP_SOLVERS
ADJOINT_MODES = ("adjoint", "seminorm", "direct")
OPTIMIZERS = ("adam", "sgd")
BLOCK_PRECISIONS = ("fp32", "bf16")
STRIDES = (1, 2)
# The stem (1x1 convolution with a stride, then an activation) exists in the simple models
# only: these settings are left unset (None) for the complex ones, whose first layers are
# the stages themselves, and resolve to the study's values for the simple ones.
STEM_SETTINGS = {"stride": 2, "activation_before": "relu"}


# Named sets of settings (`--recipe`). "fast" trains with four fixed rk4 steps and direct
# backpropagation and still validates and tests with dopri5, so its trials stay comparable:
# BENCHMARKS.md's time-to-accuracy section measured it 9.2x [5.8, 14.7] faster to early stop
# than the study's settings, and non-inferior in test accuracy: paired difference +0.27 points,
# one-sided Holm-adjusted lower bound -0.76 points, above the 1-point margin (3 seeds, CPU,
# width 8, 8,000 training images). The study's settings stay the default.
RECIPES: dict[str, dict[str, Any]] = {
    "study": {},
    "fast": {"adjoint": "direct", "solver": "rk4", "step_size": 1.0, "eval_solver": "dopri5"},
}


def _setting(help: str, default: Any) -> Any:
    """A RunConfig field with its help text: the one place a setting, its default and its flag are declared."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one training run, with the study's defaults."""

    # data
    dataset: str = _setting(f"data set: {', '.join(DATASETS)}", default="fashion-mnist")
    data_dir: str | None = _setting(
        "data folder (torchvision layout); default $ODENET_DATA_DIR or ~/.cache/odenet/data",
        default=None,
    )
    subset: int | None = _setting("train on the first N training images (the study used 10000)", default=None)
    test_subset: int | None = _setting("evaluate on the first N test images (default: all)", default=None)
    seed: int = _setting("seed of the weights and the batch order", default=0)
    split_seed: int = _setting("seed of the 20% validation split; keep it fixed across a sweep", default=0)
    # model
    model: str = _setting(f"model: {', '.join(MODELS)}", default="odenet-simple")
    width: int | None = _setting(
        "width: channels C of the simple models (default 64 for FashionMNIST, 256 for "
        "CIFAR-10), first-stage channels of the complex ones (default 64)",
        default=None,
    )
    augment_dims: int = _setting(
        "augmented zero channels A: concatenated after the stem (simple models), kept beside the image "
        "channels inside the block (complex models)",
        default=2,
    )
    stride: int | None = _setting(
        "stride of the stem convolution: 1 or 2; simple models only (unset: 2), the complex ones have no stem",
        default=None,
    )
    activation_before: str | None = _setting(
        f"activation before the block: {', '.join(ACTIVATIONS_BEFORE)}; simple models only (unset: relu), "
        "the complex ones have no stem",
        default=None,
    )
    activation_inside: str = _setting(f"activation inside the block: {', '.join(ACTIVATIONS_INSIDE)}", default="relu")
    norm: str = _setting(f"norm inside the block: {', '.join(NORMS)}", default="groupnorm")
    # ODE solve
    final_time: float = _setting("final time T_n of the ODE solve", default=1.0)
    solver: str = _setting(f"torchdiffeq solver: {', '.join(SOLVERS)}", default="dopri5")
    rtol: float = _setting("relative tolerance of adaptive solvers", default=1e-3)
    atol: float = _setting("absolute tolerance of adaptive solvers", default=1e-3)
    step_size: float = _setting("step size of fixed-step solvers", default=0.1)
    max_num_steps: int = _setting("adaptive solvers give up after this many steps (a diverged trial)", default=1000)
    eval_solver: str | None = _setting(
        "solver for validation and test when it differs from the training solver (e.g. train "
        "with rk4, evaluate with dopri5)",
        default=None,
    )
    kinetic_energy: float = _setting("weight of the kinetic-energy regulariser (Finlay et al. 2020)", default=0.0)
    jacobian_norm: float = _setting("weight of the Jacobian Frobenius-norm regulariser (Finlay et al. 2020)",
                                    default=0.0)
    adjoint: str = _setting(
        "backpropagation: adjoint, seminorm (adjoint with seminorm error control) or direct",
        default="adjoint",
    )
    # speed levers that leave the arithmetic of the model alone (GPU ones; see BENCHMARKS.md)
    channels_last: bool = _setting("keep images and convolution weights channels-last (NHWC)", default=False)
    block_precision: str = _setting(
        "precision of the block function f: fp32, or bf16 autocast while the solver state stays fp32",
        default="fp32",
    )
    compile_block: bool = _setting("torch.compile the block function f", default=False)
    # optimisation
    optimizer: str = _setting(f"optimizer: {', '.join(OPTIMIZERS)}", default="adam")
    lr: float = _setting("learning rate", default=1e-3)
    weight_decay: float = _setting("weight decay", default=0.0)
    momentum: float = _setting("momentum of sgd", default=0.9)
    batch_size: int = _setting("batch size", default=128)
    max_epochs: int = _setting("most epochs to train", default=100)
    patience: int = _setting("stop after this many epochs without a better validation loss", default=5)
    # where
    device: str = _setting("device: auto, cpu, cuda or cuda:N", default="auto")
    reevaluate: bool = _setting("re-evaluate ODE models with other solvers after training", default=True)

    def __post_init__(self) -> None:
        if not self.is_complex:
            for name, study_value in STEM_SETTINGS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, study_value)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build and validate a config from a plain dict; unknown keys are errors."""
        errors: list[str] = []
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                errors.append(f"unknown field {key!r}: expected one of {', '.join(known)}")
                continue
            try:
                kwargs[key] = _coerce(raw, _field_type(known[key]))
            except (TypeError, ValueError):
                errors.append(f"{key}={raw!r}: expected {_type_name(known[key])}")
        # Fields of the wrong type keep their defaults so the rest are still checked:
        # the message lists every bad field at once.
        config = cls(**kwargs)
        errors += config.problems()
        if errors:
            raise ConfigError(errors)
        return config

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "RunConfig":
        """Load a YAML or JSON file; keyword overrides win over the file."""
        return cls.from_dict({**_settings_in(path), **overrides})

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """--config FILE and one flag per field, generated from the dataclass: the fields are the one place."""
        group = parser.add_argument_group("run configuration (defaults are the study's)")
        group.add_argument("--config", metavar="FILE", help="YAML or JSON file of run settings; flags override it")
        group.add_argument("--recipe", choices=RECIPES, default=None,
                           help="a named set of settings under the file and the flags: " + "; ".join(
                               f"{name}: {', '.join(f'{k}={v}' for k, v in settings.items()) or 'the defaults'}"
                               for name, settings in RECIPES.items()))
        for f in fields(RunConfig):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
            if str(f.type) == "bool":
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=help_text)
            else:
                # Values stay strings here: from_dict coerces and validates them all at once,
                # so every bad flag is reported in one message.
                group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)

    @classmethod
    def from_args(cls, args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> "RunConfig":
        """The config of parsed flags: flags win over the --config file, which wins over `defaults`
        (e.g. a sweep's --smoke sizes), which win over the study's."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}
        in_file = _settings_in(args.config) if args.config else {}
        recipe = RECIPES[args.recipe] if getattr(args, "recipe", None) else {}
        return cls.from_dict({**(defaults or {}), **recipe, **in_file, **given})

    def to_dict(self) -> dict[str, Any]:
        """The flat dict of every field: what MLflow logs as params and Tune passes to trials."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy with some fields changed. A change of model between the simple and
        the complex family drops the stem settings not given with it: they belong to the model."""
        values = {**self.to_dict(), **changes}
        if "model" in changes and (str(changes["model"]).endswith("complex")) != self.is_complex:
            values.update({name: None for name in STEM_SETTINGS if name not in changes})
        return RunConfig.from_dict(values)

    @property
    def is_ode(self) -> bool:
        return self.model in ODE_MODELS

    @property
    def is_complex(self) -> bool:
        return str(self.model).endswith("complex")

    @property
    def channels(self) -> int:
        """Width: the study's C (64 FashionMNIST, 256 CIFAR-10), or 64 for complex models."""
        if self.width is not None:
            return self.width
        if self.is_complex or self.dataset == "fashion-mnist":
            return 64
        return 256

    def problems(self) -> list[str]:
        """One message per invalid field: the field, its value and what is allowed."""
        errors: list[str] = []

        def choice(name: str, allowed: tuple) -> None:
            value = getattr(self, name)
            if value not in allowed:
                errors.append(f"{name}={value!r}: expected one of {', '.join(map(str, allowed))}")

        def at_least(name: str, low: float, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                errors.append(f"{name}={value!r}: expected a number >= {low}")

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                errors.append(f"{name}={value!r}: expected a number > 0")

        choice("dataset", DATASETS)
        choice("model", MODELS)
        if self.is_complex:
            for name in STEM_SETTINGS:
                if getattr(self, name) is not None:
                    errors.append(f"{name}={getattr(self, name)!r}: {self.model} has no stem, so {name} does not "
                                  f"apply; leave it unset (it applies to {', '.join(SIMPLE_MODELS)})")
        else:
            choice("activation_before", ACTIVATIONS_BEFORE)
            choice("stride", STRIDES)
        choice("activation_inside", ACTIVATIONS_INSIDE)
        choice("norm", NORMS)
        choice("solver", SOLVERS)
        choice("adjoint", ADJOINT_MODES)
        if self.eval_solver is not None:
            choice("eval_solver", SOLVERS)
        at_least("kinetic_energy", 0)
        at_least("jacobian_norm", 0)
        choice("block_precision", BLOCK_PRECISIONS)
        choice("optimizer", OPTIMIZERS)
        at_least("subset", 10, optional=True)
        at_least("test_subset", 1, optional=True)
        at_least("width", 1, optional=True)
        at_least("augment_dims", 0)
        at_least("seed", 0)
        at_least("split_seed", 0)
        positive("final_time")
        positive("rtol")
        positive("atol")
        positive("step_size")
        at_least("max_num_steps", 1)
        positive("lr")
        at_least("weight_decay", 0)
        at_least("momentum", 0)
        if isinstance(self.momentum, (int, float)) and self.momentum >= 1:
            errors.append(f"momentum={self.momentum!r}: expected a number in [0, 1)")
        at_least("batch_size", 1)
        at_least("max_epochs", 1)
        at_least("patience", 1)
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            errors.append(f"device={self.device!r}: expected one of auto, cpu, cuda, cuda:N")
        return errors


def _settings_in(path: str | Path) -> dict[str, Any]:
    """The mapping of settings in a YAML or JSON run file (--config)."""
    return read_mapping_file(path, "--config", "field names to values")


def read_settings_file(path: str | Path, flag: str) -> Any:
    """A YAML/JSON file given with `flag` (e.g. --base-file), parsed; a missing file or a
    syntax error becomes a ConfigError naming the flag, file, line and column."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{flag} {path}: {exc.strerror}"]) from None
    return load_mapping_text(text, f"{flag} {path}" if flag else path)


def read_mapping_file(path: str | Path, flag: str, of: str) -> dict[str, Any]:
    """A YAML/JSON file given with `flag` that must hold a mapping (`of` says of what to what);
    an empty file is an empty mapping."""
    values = read_settings_file(path, flag) or {}
    if not isinstance(values, dict):
        raise ConfigError([f"{flag} {path}: expected a mapping of {of}"])
    return values


def load_mapping_text(text: str, path: str | Path) -> Any:
    """Parse a YAML or JSON file's text (JSON by its .json suffix); a syntax error becomes a
    ConfigError naming the file, line and column."""
    if str(path).endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]) from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None


class ConfigError(ValueError):
    """Invalid run settings; the message lists every bad field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid run configuration:\n  " + "\n  ".join(self.errors))


def _field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of a RunConfig field, from its annotation string."""
    annotation = str(f.type)
    optional = "None" in annotation
    base = annotation.replace("| None", "").strip()
    return {"str": str, "int": int, "float": float, "bool": bool}[base], optional


def _type_name(f: dataclasses.Field) -> str:
    base, optional = _field_type(f)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names[base] + (" or null" if optional else "")


def _coerce(raw: Any, type_info: tuple[type, bool]) -> Any:
    """Accept what YAML, JSON, argparse and Tune hand us (e.g. '1e-3', numpy scalars)."""
    base, optional = type_info
    # "none" is a value of some string settings (activation_before): for those only "None"
    # (what MLflow logs for an unset field), "null" and "" mean unset.
    unset = ("None", "null", "") if base is str else ("none", "null", "")
    if raw is None or (optional and isinstance(raw, str) and (raw if base is str else raw.lower()) in unset):
        if optional:
            return None
        raise TypeError("null")
    if base is bool:
        if isinstance(raw, str):
            if raw.lower() in ("true", "yes", "1", "on"):
                return True
            if raw.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(raw)
        if hasattr(raw, "item"):
            raw = raw.item()
        if isinstance(raw, (bool, int)) and raw in (0, 1):
            return bool(raw)
        raise TypeError(raw)
    if base is int:
        if isinstance(raw, bool):
            raise TypeError(raw)
        value = float(raw)
        if not value.is_integer():
            raise ValueError(raw)
        return int(value)
    if base is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        return float(raw)
    if not isinstance(raw, str):
        raise TypeError(raw)
    return raw
