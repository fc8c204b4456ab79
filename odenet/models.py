"""The study's classifiers: stem -> block(s) -> linear head over the flattened state.

One block function `f` (conv3x3 -> norm -> activation) serves the ODEnet, where it is
the dynamics dz/dt = f(z), and the ResNets, where each residual block is x + f_i(x):
a ResNet is the ODEnet's Euler discretisation with separate weights per step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from odenet.config import FIXED_STEP_SOLVERS, RunConfig
from odenet.data import IMAGE_SHAPE
from odenet.solvers import count, fast_method, vjp_counter

NUM_CLASSES = 10


def activation(name: str) -> nn.Module:
    return {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}[name]()


def group_count(channels: int) -> int:
    """The largest group count that divides `channels` and is at most 32."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "groupnorm":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def block_function(channels: int, norm: str, act: str) -> nn.Sequential:
    """f = conv3x3 -> norm -> activation, shape-preserving: the ODE's dynamics or a residual branch."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), norm_layer(norm, channels), activation(act)
    )


def evaluate_block(f: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """f(x); with bf16, f runs under bf16 autocast and its output returns in x's dtype,
    so the solver's state, stages and error estimate stay in fp32."""
    if not bf16:
        return f(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return f(x).to(x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f
        self.bf16 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + evaluate_block(self.f, x, self.bf16)


@dataclass(frozen=True)
class SolverSettings:
    """How an ODE block integrates: method, tolerances, step size and backpropagation; made from
    a RunConfig (`of`, `for_evaluation`), whose fields hold the defaults."""

    method: str
    rtol: float
    atol: float
    step_size: float
    max_num_steps: int
    adjoint: str  # adjoint | seminorm | direct

    @classmethod
    def of(cls, config: RunConfig) -> "SolverSettings":
        """How the run trains."""
        return cls(config.solver, config.rtol, config.atol, config.step_size,
                   config.max_num_steps, config.adjoint)

    @classmethod
    def for_evaluation(cls, config: RunConfig) -> "SolverSettings":
        """How the run validates and tests: the eval solver where one is set."""
        return replace(cls.of(config), method=config.eval_solver or config.solver)

    @property
    def options(self) -> dict:
        if self.method in FIXED_STEP_SOLVERS:
            return {"step_size": self.step_size}
        return {"max_num_steps": self.max_num_steps}


class CountedDynamics(nn.Module):
    """Wraps f as dz/dt = f(z) and counts its evaluations in the forward and backward pass.

    `fnfe` counts calls of f; `bnfe` counts vector-Jacobian products through f, which is
    what the backward pass costs for the adjoint (one per adjoint step evaluation) and for
    direct backpropagation (one per recorded forward evaluation) alike.

    Given a state (z, kinetic, jacobian), it also integrates the two regularisers of
    Finlay et al. 2020, "How to train your neural ODE": the kinetic energy |f(z)|^2 and
    a Hutchinson estimate |e^T df/dz|^2 of the Jacobian's Frobenius norm, per dimension.
    """

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f
        self.fnfe = 0
        self.bnfe = 0
        self.probe: torch.Tensor | None = None  # Hutchinson noise, fixed during one solve
        self.bf16 = False

    def forward(self, t: torch.Tensor, state):
        count(self, "fnfe")  # through the solver: it takes back the evaluations of steps that did nothing
        if isinstance(state, tuple):
            return self._regularised(state[0])
        dz = evaluate_block(self.f, state, self.bf16)
        if dz.requires_grad:
            dz.register_hook(vjp_counter(self, "bnfe"))
        return dz

    def _regularised(self, z: torch.Tensor):
        if self.probe is not None and not (torch.is_grad_enabled() and z.requires_grad):
            z = z.detach().requires_grad_()  # the adjoint's forward solve runs without a graph
        with torch.enable_grad():
            dz = evaluate_block(self.f, z, self.bf16)
            kinetic = dz.pow(2).flatten(1).mean(1)
            if self.probe is None:
                jacobian = torch.zeros_like(kinetic)
            else:
                (vjp,) = torch.autograd.grad(dz, z, self.probe, create_graph=True)
                jacobian = vjp.pow(2).flatten(1).mean(1)
        if dz.requires_grad:
            dz.register_hook(vjp_counter(self, "bnfe"))
        return dz, kinetic, jacobian

    def reset(self) -> None:
        self.fnfe = self.bnfe = 0


class ODEBlock(nn.Module):
    """Solves dz/dt = f(z) from t = 0 to t = final_time and returns z(final_time).

    With regulariser weights, training also integrates them and leaves their weighted
    sum in `regularisation`, for the training loop to add to the loss.
    """

    def __init__(self, f: nn.Module, final_time: float, solver: SolverSettings,
                 kinetic_energy: float = 0.0, jacobian_norm: float = 0.0):
        super().__init__()
        self.dynamics = CountedDynamics(f)
        self.final_time = final_time
        self.solver = solver
        self.kinetic_energy, self.jacobian_norm = kinetic_energy, jacobian_norm
        self.regularisation: torch.Tensor | float = 0.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        regularise = (self.kinetic_energy or self.jacobian_norm) and self.training and torch.is_grad_enabled()
        if not regularise:
            self.regularisation = 0.0
            return self._solve(z)[-1]
        self.dynamics.probe = torch.randn_like(z) if self.jacobian_norm else None
        zero = z.new_zeros(z.shape[0])
        z_t, kinetic, jacobian = (x[-1] for x in self._solve((z, zero, zero)))
        self.regularisation = self.kinetic_energy * kinetic.mean() + self.jacobian_norm * jacobian.mean()
        return z_t

    def _solve(self, state):
        first = state[0] if isinstance(state, tuple) else state
        t = torch.tensor([0.0, self.final_time], device=first.device, dtype=first.dtype)
        solver = self.solver
        kwargs = dict(rtol=solver.rtol, atol=solver.atol, method=fast_method(solver.method), options=solver.options)
        if solver.adjoint != "direct" and torch.is_grad_enabled():
            adjoint_options = {**solver.options, "norm": "seminorm"} if solver.adjoint == "seminorm" else None
            return odeint_adjoint(self.dynamics, state, t, adjoint_options=adjoint_options,
                                  adjoint_params=tuple(self.dynamics.parameters()), **kwargs)
        return odeint(self.dynamics, state, t, **kwargs)


class Augment(nn.Module):
    """Concatenates `dims` zero channels (augmented Neural ODEs)."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 0:
            return x
        return F.pad(x, (0, 0, 0, 0, 0, self.dims))


class Classifier(nn.Module):
    """features -> flatten -> linear head; `ode_blocks` lists the blocks whose NFE counts."""

    def __init__(self, features: nn.Module, head_in: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(head_in, NUM_CLASSES)
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.features(x).flatten(1))

    @property
    def ode_blocks(self) -> list[ODEBlock]:
        return [m for m in self.modules() if isinstance(m, ODEBlock)]

    def reset_nfe(self) -> None:
        for block in self.ode_blocks:
            block.dynamics.reset()

    @property
    def fnfe(self) -> int:
        return sum(b.dynamics.fnfe for b in self.ode_blocks)

    @property
    def bnfe(self) -> int:
        return sum(b.dynamics.bnfe for b in self.ode_blocks)

    @contextlib.contextmanager
    def solving_with(self, solver: SolverSettings) -> Iterator[None]:
        """Integrate with other solver settings inside the block (evaluation), then as before."""
        saved = [block.solver for block in self.ode_blocks]
        for block in self.ode_blocks:
            block.solver = solver
        try:
            yield
        finally:
            for block, settings in zip(self.ode_blocks, saved):
                block.solver = settings

    def regularisation(self) -> torch.Tensor | float:
        """The weighted regularisers of the last training forward pass (0 without them)."""
        return sum((block.regularisation for block in self.ode_blocks), 0.0)


def parameter_counts(model: Classifier) -> dict[str, int]:
    """Parameters in total and outside the linear head (the study's two counts), and those that
    train (the cost a parameter-efficiency curve counts)."""
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_outside_head": total - head, "params_trainable": trainable}


def build(config: RunConfig) -> Classifier:
    """The classifier a run configuration describes."""
    image = IMAGE_SHAPE[config.dataset]
    if config.model.endswith("complex"):
        model = _build_complex(config, image)
    else:
        model = _build_simple(config, image)
    return _apply_speed_levers(model, config)


def _apply_speed_levers(model: Classifier, config: RunConfig) -> Classifier:
    """channels_last, block_precision and compile_block: each changes how the block
    functions (ODE dynamics, residual branches) run, not what they compute."""
    for module in model.modules():
        if isinstance(module, (ResidualBlock, CountedDynamics)):
            module.bf16 = config.block_precision == "bf16"
            if config.compile_block:
                module.f.compile()  # in place: parameter names and checkpoints stay the same
    if config.channels_last:
        model.channels_last = True
        model.to(memory_format=torch.channels_last)
    return model


def ode_block(f: nn.Module, config: RunConfig) -> ODEBlock:
    return ODEBlock(f, config.final_time, SolverSettings.of(config), config.kinetic_energy, config.jacobian_norm)


def _build_simple(config: RunConfig, image: tuple[int, int, int]) -> Classifier:
    c_in, h, w = image
    state = config.channels + config.augment_dims
    side_h, side_w = -(-h // config.stride), -(-w // config.stride)

    def f() -> nn.Module:
        return block_function(state, config.norm, config.activation_inside)

    if config.model == "odenet-simple":
        stem = [nn.Conv2d(c_in, config.channels, 1, stride=config.stride),
                activation(config.activation_before), Augment(config.augment_dims)]
        body = [ode_block(f(), config)]
    else:
        # The ResNets' stem makes the C+A channels the ODEnet gets by augmentation.
        stem = [nn.Conv2d(c_in, state, 1, stride=config.stride), activation(config.activation_before)]
        depth = 1 if config.model == "resnet-small" else 3
        body = [ResidualBlock(f()) for _ in range(depth)]
    return Classifier(nn.Sequential(*stem, *body), state * side_h * side_w)


# -- complex models -------------------------------------------------------------------


def _pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


class Stage(nn.Module):
    """conv3x3 -> maxpool 2 -> norm -> activation; `residual` adds the zero-padded input
    before the pooling (the ResNet-complex shortcut, no 1x1 convolutions)."""

    def __init__(self, c_in: int, c_out: int, norm: str, act: str, residual: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.post = nn.Sequential(nn.MaxPool2d(2), norm_layer(norm, c_out), activation(act))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.residual:
            y = y + _pad_channels(x, y.shape[1])
        return self.post(y)


def _stages(c_in: int, width: int, config: RunConfig, residual: bool) -> nn.Sequential:
    widths = (c_in, width, 2 * width, 4 * width)
    return nn.Sequential(*(
        Stage(widths[i], widths[i + 1], config.norm, config.activation_inside, residual)
        for i in range(3)
    ))


class ShapeChangingDynamics(nn.Module):
    """f for an ODE state of the input's full size: drop the padding channels (keeping A
    zero channels as augmentation), run the stages, zero-pad their output back to the
    state's shape. This is how layers that change shape live inside an ODE block."""

    def __init__(self, stages: nn.Module, keep_channels: int):
        super().__init__()
        self.stages = stages
        self.keep_channels = keep_channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.stages(z[:, : self.keep_channels])
        h, w = z.shape[-2:]
        return F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2], 0, z.shape[1] - out.shape[1]))


class PadTo(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pad_channels(x, self.channels)


class CropTo(nn.Module):
    """Crops the padding off the ODE state: the region the stages wrote."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, :, : self.height, : self.width]


def _build_complex(config: RunConfig, image: tuple[int, int, int]) -> Classifier:
    c_in, h, w = image
    width = config.channels
    out_channels, out_h, out_w = 4 * width, h // 8, w // 8
    head_in = out_channels * out_h * out_w
    keep = c_in + config.augment_dims  # the image channels and A zero channels of augmentation
    if config.model == "resnet-complex":
        return Classifier(nn.Sequential(Augment(config.augment_dims), _stages(keep, width, config, residual=True)),
                          head_in)
    f = ShapeChangingDynamics(_stages(keep, width, config, residual=False), keep)
    features = nn.Sequential(
        PadTo(out_channels),
        ode_block(f, config),
        CropTo(out_h, out_w),
    )
    return Classifier(features, head_in)


def describe(model: Classifier) -> str:
    """The model's layers and parameter counts, as `odenet describe` prints them."""
    counts = parameter_counts(model)
    return (f"{model}\n\nparameters: {counts['params_total']:,} in total, "
            f"{counts['params_outside_head']:,} outside the head")
