"""torchdiffeq's adaptive Runge-Kutta solvers with cheaper arithmetic and the same numbers.

torchdiffeq keeps a step's stages in one tensor whose last (innermost) dimension is the
stage, and combines them with a broadcast multiply and a sum over that strided
dimension; the interpolating polynomial is fitted after every accepted step. On the
state of an image ODEnet (batch x 64 x 14 x 14) that memory-bound arithmetic cost
about half of a CPU training step with the adjoint, more than the convolutions
(profiled with torch.profiler: mul, sum and copy_ on the stage tensor).

These solvers keep the stages as separate contiguous tensors, combine them with a chain
of fused multiply-adds that skips the tableau's zeros, and fit the interpolant only for
the step that crosses the output time (every step while searching for an event). Everything else is torchdiffeq's: tableaux,
initial step, error norm (including the adjoint's seminorm), step-size controller, the
adjoint itself. So a solve accepts and rejects the same steps, costs the same NFE and
returns the same state up to float rounding (tests/test_solvers.py holds them to that).

They are registered in torchdiffeq's solver table under their own names, since
`odeint` and `odeint_adjoint` take solvers by name only; `fast_method` maps a study
solver name to its registered name.

On a GPU, torchdiffeq's step loop copies a device scalar to the host several times per
step (`if accept_step`, `while next_t > t1`, the assertions, Python's `max` in the tuple
and adjoint norms), and each copy waits for the GPU to finish. With the option
`steps_per_sync` = K > 1 (or a device's entry in `STEPS_PER_SYNC`), steps run in
blocks of K (the first as long as the last like solve took: `_steps_last_taken`) with
the accept/reject decision, the next step size and the interpolation
data chosen on the device by `torch.where`, and the host looks once per block: whether
the output time is reached, and whether the solve failed (with torchdiffeq's messages,
which odenet.failures matches). Steps of a block after the solve has finished (or
failed) are no-ops: they evaluate f but change nothing. NFE counts them as the
synchronising loop would, i.e. not at all: an ODE function that counts its evaluations
(and the vector-Jacobian products of the adjoint's backward solve) through `count` and
`vjp_counter` has those of no-op steps taken back at the block's end. A solve that
records a graph (direct backpropagation) keeps the synchronising loop: through
`torch.where` every rejected and no-op step would stay in the graph, with a zero gradient
that turns NaN (0 x inf) where a rejected trial step overflowed. K = 1 is the
synchronising loop itself, unchanged: the default on the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import types
from functools import reduce
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torchdiffeq._impl.bosh3 import Bosh3Solver
from torchdiffeq._impl.dopri5 import Dopri5Solver
from torchdiffeq._impl.interp import _interp_evaluate, _interp_fit
from torchdiffeq._impl.misc import Perturb, _compute_error_ratio, _null_callback, _optimal_step_size
from torchdiffeq._impl.rk_common import _RungeKuttaState

PREFIX = "odenet_"
# Steps per host synchronisation by device type; 1 where absent (on the CPU the host is the device).
# Empty, so off everywhere, until a GPU run of bench/gpu_path.py shows the device-side loop
# faster than the synchronising one; then {"cuda": 4}. Tested on the CPU only so far.
STEPS_PER_SYNC: dict[str, int] = {}


class _Pending(NamedTuple):
    """An accepted step whose interpolant is fitted only if an output time falls inside it."""

    y0: torch.Tensor
    y1: torch.Tensor
    stages: list[torch.Tensor]
    dt: torch.Tensor


def _combine(stages: list[torch.Tensor], weights: list[float], dt: torch.Tensor,
             base: torch.Tensor | None = None) -> torch.Tensor:
    """base + sum_j (weights_j * dt) * stages_j, skipping zero weights, in one accumulator.

    The coefficient (weight * dt) is formed in the state's dtype, as torchdiffeq forms it,
    and stays a 0-dim tensor so that direct backpropagation still reaches dt.
    """
    total = None
    for stage, weight in zip(stages, weights):
        if weight == 0.0:
            continue
        coefficient = dt * weight
        total = stage * coefficient if total is None else total.addcmul_(stage, coefficient)
    if base is None:
        return total
    # torchdiffeq adds y0 to the finished sum; the same order keeps the rounding close.
    return base + total


def default_steps_per_sync(device: torch.device) -> int:
    return STEPS_PER_SYNC.get(device.type, 1)


@contextlib.contextmanager
def steps_per_sync(device_type: str, steps: int) -> Iterator[None]:
    """Solve on `device_type` with `steps` steps per host synchronisation where the options don't
    say, also in the adjoint's backward solve (which autograd may run on its own thread: a module
    setting, not a context variable)."""
    saved = dict(STEPS_PER_SYNC)
    STEPS_PER_SYNC[device_type] = steps
    try:
        yield
    finally:
        STEPS_PER_SYNC.clear()
        STEPS_PER_SYNC.update(saved)


class _StepRecord:
    """One step of a block: the counts its evaluations made, until the host knows whether it ran."""

    __slots__ = ("counted", "ran")

    def __init__(self):
        self.counted: list[tuple[Any, str]] = []
        self.ran: bool | None = None

    def settle(self, ran: bool) -> None:
        self.ran = ran
        if not ran:
            for owner, attribute in self.counted:
                setattr(owner, attribute, getattr(owner, attribute) - 1)
        self.counted = []


# A block's steps after the solve is done are wasted evaluations, and a training solve takes
# only a few steps (~3 forward, ~5 backward for the study's ODEnet): so the first block of a
# solve is as long as the last solve of the same solver and state shape took (the next
# training batch's), and only the blocks after it are steps_per_sync long.
_steps_last_taken: dict[tuple, int] = {}

_open_step: contextvars.ContextVar[_StepRecord | None] = contextvars.ContextVar("odenet_solver_step", default=None)


def count(owner: Any, attribute: str) -> None:
    """owner.attribute += 1 for one evaluation of an ODE function, taken back if it belongs to a
    no-op step of a block (see the module's docstring)."""
    setattr(owner, attribute, getattr(owner, attribute) + 1)
    step = _open_step.get()
    if step is not None:
        step.counted.append((owner, attribute))


def vjp_counter(owner: Any, attribute: str) -> Callable[[torch.Tensor], None]:
    """A gradient hook for an evaluation's output: owner.attribute += 1 per vector-Jacobian
    product, taken back, as `count`, if it is the adjoint's backward solve's in a no-op step."""
    step = _open_step.get()

    def hook(grad: torch.Tensor) -> None:
        setattr(owner, attribute, getattr(owner, attribute) + 1)
        if step is not None and step.ran is None:
            step.counted.append((owner, attribute))  # the step, not the context: autograd may run this elsewhere
    return hook


def _device_max(*values):
    """Python's max over 0-dim tensors without a host synchronisation (NaN propagates)."""
    if len(values) == 1:
        values = tuple(values[0])
    like = next(v for v in values if isinstance(v, torch.Tensor))
    # new_full, not as_tensor: a Python number copied to the GPU would synchronise.
    return reduce(torch.maximum, [v if isinstance(v, torch.Tensor) else like.new_full((), v) for v in values])


def _without_host_max(function):
    """torchdiffeq's norm for tuple states and the adjoint (closures calling Python's `max`, which
    compares on the host), rebuilt with `_device_max`, through the functions it closes over or names."""
    if not isinstance(function, types.FunctionType) or not function.__module__.startswith("torchdiffeq"):
        return function
    names = dict(function.__globals__, max=_device_max)
    for name in function.__code__.co_names:
        if name in names and names[name] is not function:
            names[name] = _without_host_max(names[name])
    closure = tuple(types.CellType(_without_host_max(cell.cell_contents)) for cell in function.__closure__ or ())
    return types.FunctionType(function.__code__, names, function.__name__, function.__defaults__, closure or None)


class _StageListRungeKutta:
    """Mixin over torchdiffeq's RKAdaptiveStepsizeODESolver: same algorithm, cheaper arithmetic."""

    def __init__(self, *args, steps_per_sync: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_per_sync = steps_per_sync or default_steps_per_sync(self.y0.device)

    def _before_integrate(self, t):
        super()._before_integrate(t)
        self._fit_every_step = False
        if len(self.step_t) or len(self.jump_t):
            raise ValueError(f"{type(self).__name__} has no step_t/jump_t support; use torchdiffeq's "
                             f"{type(self).__mro__[2].__name__}")
        # The class's tableau, on the CPU, rounded to the state's dtype as torchdiffeq's copy on the
        # state's device is: reading that one would wait for a GPU.
        dtype = self.y0.dtype
        table, mid = type(self).tableau, type(self).mid
        self._alpha = table.alpha.to(dtype).tolist()
        self._beta = [b.to(dtype).tolist() for b in table.beta]
        self._c_sol = table.c_sol.to(dtype).tolist()
        self._c_error = table.c_error.to(dtype).tolist()
        self._mid = mid.to(dtype).tolist()
        # True for Dormand-Prince and Bogacki-Shampine: the last stage's input is the solution.
        self._last_stage_is_solution = self._c_sol[-1] == 0 and self._c_sol[:-1] == self._beta[-1]

    def _step(self, y0, f0, t0, dt, t1):
        t_dtype = y0.abs().dtype
        t0, dt, t1 = t0.to(t_dtype), dt.to(t_dtype), t1.to(t_dtype)
        stages = [f0]
        yi = y0
        for alpha, beta in zip(self._alpha, self._beta):
            if alpha == 1.0:
                ti, perturb = t1, Perturb.PREV  # just before the end time, as torchdiffeq does
            else:
                ti, perturb = t0 + alpha * dt, Perturb.NONE
            yi = _combine(stages, beta, dt, base=y0)
            stages.append(self.func(ti, yi, perturb=perturb))
        if not self._last_stage_is_solution:
            yi = _combine(stages, self._c_sol, dt, base=y0)
        return yi, stages[-1], _combine(stages, self._c_error, dt), stages

    def _adaptive_step(self, rk_state):
        y0, f0, _, t0, dt, interp_coeff = rk_state
        if not torch.isfinite(dt):
            dt = self.min_step
        dt = dt.clamp(self.min_step, self.max_step)
        self.func.callback_step(t0, y0, dt)
        t1 = t0 + dt
        # The same messages as torchdiffeq: odenet.failures recognises them.
        assert t0 + dt > t0, 'underflow in dt {}'.format(dt.item())
        assert torch.isfinite(y0).all(), 'non-finite values in state `y`: {}'.format(y0)

        y1, f1, y1_error, stages = self._step(y0, f0, t0, dt, t1)
        error_ratio = _compute_error_ratio(y1_error, self.rtol, self.atol, y0, y1, self.norm)
        accept_step = error_ratio <= 1
        if dt > self.max_step:
            accept_step = False
        if dt <= self.min_step:
            accept_step = True

        if accept_step:
            self.func.callback_accept_step(t0, y0, dt)
            t_next, y_next, f_next = t1, y1, f1
            interp_coeff = _Pending(y0, y1, stages, dt)
            if self._fit_every_step:
                interp_coeff = self._fit(interp_coeff)
        else:
            self.func.callback_reject_step(t0, y0, dt)
            t_next, y_next, f_next = t0, y0, f0
        dt_next = _optimal_step_size(dt, error_ratio, self.safety, self.ifactor, self.dfactor, self.order)
        dt_next = dt_next.clamp(self.min_step, self.max_step)
        return _RungeKuttaState(y_next, f_next, t0, t_next, dt_next, interp_coeff)

    def _advance(self, next_t):
        y, f, _, _, dt, _ = self.rk_state
        records_graph = torch.is_grad_enabled() and (y.requires_grad or f.requires_grad or dt.requires_grad)
        if self.steps_per_sync > 1 and not records_graph:
            if next_t > self.rk_state.t1:
                self._advance_in_blocks(next_t)
        else:
            n_steps = 0
            while next_t > self.rk_state.t1:
                assert n_steps < self.max_num_steps, 'max_num_steps exceeded ({}>={})'.format(n_steps, self.max_num_steps)
                self.rk_state = self._adaptive_step(self.rk_state)
                n_steps += 1
        coefficients = self.rk_state.interp_coeff
        if isinstance(coefficients, _Pending):
            coefficients = self._fit(coefficients)
            self.rk_state = self.rk_state._replace(interp_coeff=coefficients)
        return _interp_evaluate(coefficients, self.rk_state.t0, self.rk_state.t1, next_t)

    def _advance_in_blocks(self, next_t):
        """`_advance`'s loop with the host looking once per `steps_per_sync` steps (module docstring)."""
        y, f, _, t, dt, pending = self.rk_state
        if not isinstance(pending, _Pending):  # no step accepted yet: a stand-in that where() replaces
            pending = _Pending(y, y, [f] * (len(self._alpha) + 1), dt)
        t_start = t  # start of the last accepted step: the interpolant's interval is [t_start, t]
        n_steps = torch.zeros((), dtype=torch.int32, device=y.device)
        active = next_t > t
        cause = torch.zeros((), dtype=torch.int64, device=y.device)  # 1 underflow, 2 non-finite state
        failed_dt = dt
        norm = _without_host_max(self.norm)
        # torch.full, not torch.tensor: a Python number copied to the GPU would synchronise
        exponent = torch.full((), self.order, dtype=dt.dtype, device=dt.device).reciprocal()
        callbacks = [getattr(self.func, name) for name in ("callback_step", "callback_accept_step",
                                                            "callback_reject_step")]
        replay = any(callback is not _null_callback for callback in callbacks)
        like_this = (type(self), y.shape, y.dtype, y.device)
        # at most 8 blocks' worth: a solve that ran out of steps says little about the next one
        block = min(_steps_last_taken.get(like_this, self.steps_per_sync), 8 * self.steps_per_sync)
        while True:
            records, flags, visited = [], [], []
            for _ in range(block):
                record = _StepRecord()
                token = _open_step.set(record)
                try:
                    dt = torch.where(torch.isfinite(dt), dt, self.min_step).clamp(self.min_step, self.max_step)
                    t1 = t + dt
                    ran = active & (n_steps < self.max_num_steps)
                    underflow = ~(t1 > t)
                    non_finite = ~torch.isfinite(y).all()
                    fails = ran & (underflow | non_finite)
                    cause = torch.where(fails, torch.where(underflow, 1, 2), cause)
                    failed_dt = torch.where(fails & underflow, dt, failed_dt)
                    effective = ran & ~fails
                    y1, f1, y1_error, stages = self._step(y, f, t, dt, t1)
                    error_ratio = _compute_error_ratio(y1_error, self.rtol, self.atol, y, y1, norm)
                    accepted = ((error_ratio <= 1) & ~(dt > self.max_step)) | (dt <= self.min_step)
                    take = effective & accepted
                    if replay:
                        visited.append((t, y, dt))
                    pending = _Pending(torch.where(take, y, pending.y0), None,
                                       [torch.where(take, new, old) for new, old in zip(stages[:-1], pending.stages)],
                                       torch.where(take, dt, pending.dt))
                    t_start = torch.where(take, t, t_start)
                    y, f, t = torch.where(take, y1, y), torch.where(take, f1, f), torch.where(take, t1, t)
                    pending = pending._replace(y1=y, stages=pending.stages + [f])
                    dt = torch.where(effective, self._next_step_size(dt, error_ratio, exponent), dt)
                    n_steps = n_steps + ran.to(n_steps.dtype)
                    active = effective & (next_t > t) | active & ~ran  # still short of next_t, or out of steps
                    flags += [ran, take]
                finally:
                    _open_step.reset(token)
                records.append(record)
            # The block's one host synchronisation.
            *step_flags, still_active, steps_taken, failure = torch.stack(
                [x.to(torch.int64) for x in (*flags, active, n_steps, cause)]).tolist()
            for i, record in enumerate(records):
                record.settle(bool(step_flags[2 * i]))
            if replay:
                self._replay_callbacks(callbacks, visited, step_flags, failure)
            # The same messages as torchdiffeq: odenet.failures recognises them.
            assert failure != 1, 'underflow in dt {}'.format(failed_dt.item())
            assert failure != 2, 'non-finite values in state `y`: {}'.format(y)
            if not still_active:
                break
            assert steps_taken < self.max_num_steps, 'max_num_steps exceeded ({}>={})'.format(
                steps_taken, self.max_num_steps)
            block = self.steps_per_sync
        _steps_last_taken[like_this] = max(steps_taken, 1)
        self.rk_state = _RungeKuttaState(y, f, t_start, t, dt, pending)

    @staticmethod
    def _replay_callbacks(callbacks, visited, step_flags, failure):
        """The callbacks of the steps that ran, in order, as the synchronising loop calls them."""
        on_step, on_accept, on_reject = callbacks
        for i, (t0, y0, dt) in enumerate(visited):
            if not step_flags[2 * i]:
                break
            on_step(t0, y0, dt)
            if failure and i == sum(step_flags[0::2]) - 1:
                break  # the failing step: torchdiffeq raises before accepting or rejecting it
            (on_accept if step_flags[2 * i + 1] else on_reject)(t0, y0, dt)

    @torch.no_grad()
    def _next_step_size(self, dt, error_ratio, exponent):
        """torchdiffeq's _optimal_step_size, clamped, with where() for its two Python branches."""
        dfactor = torch.where(error_ratio < 1, torch.ones_like(dt), self.dfactor)
        factor = torch.min(self.ifactor, torch.max(self.safety / error_ratio.type_as(dt) ** exponent, dfactor))
        factor = torch.where(error_ratio == 0, self.ifactor, factor)
        return (dt * factor).clamp(self.min_step, self.max_step)

    def _fit(self, step: _Pending) -> list[torch.Tensor]:
        dt = step.dt.type_as(step.y0)
        y_mid = _combine(step.stages, self._mid, dt, base=step.y0)
        return _interp_fit(step.y0, step.y1, y_mid, step.stages[0], step.stages[-1], dt)

    def _advance_until_event(self, event_fn):
        # torchdiffeq's event search reads each step's interpolant as it goes: fit them all.
        self._fit_every_step = True
        return super()._advance_until_event(event_fn)


class Dopri5(_StageListRungeKutta, Dopri5Solver):
    pass


class Bosh3(_StageListRungeKutta, Bosh3Solver):
    pass


FAST_SOLVERS = {"dopri5": Dopri5, "bosh3": Bosh3}
# The package re-exports the function `odeint` under the module's name: fetch the module.
importlib.import_module("torchdiffeq._impl.odeint").SOLVERS.update({PREFIX + name: cls for name, cls in FAST_SOLVERS.items()})


def fast_method(method: str) -> str:
    """The registered name of this package's version of `method`, or `method` itself."""
    return PREFIX + method if method in FAST_SOLVERS else method
