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
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
from torchdiffeq._impl.bosh3 import Bosh3Solver
from torchdiffeq._impl.dopri5 import Dopri5Solver
from torchdiffeq._impl.interp import _interp_evaluate, _interp_fit
from torchdiffeq._impl.misc import Perturb, _compute_error_ratio, _optimal_step_size
from torchdiffeq._impl.rk_common import _RungeKuttaState

PREFIX = "odenet_"


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


class _StageListRungeKutta:
    """Mixin over torchdiffeq's RKAdaptiveStepsizeODESolver: same algorithm, cheaper arithmetic."""

    def _before_integrate(self, t):
        super()._before_integrate(t)
        self._fit_every_step = False
        if len(self.step_t) or len(self.jump_t):
            raise ValueError(f"{type(self).__name__} has no step_t/jump_t support; use torchdiffeq's "
                             f"{type(self).__mro__[2].__name__}")
        table = self.tableau
        self._alpha = table.alpha.tolist()
        self._beta = [b.tolist() for b in table.beta]
        self._c_sol = table.c_sol.tolist()
        self._c_error = table.c_error.tolist()
        self._mid = self.mid.tolist()
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
