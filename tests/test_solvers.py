"""odenet.solvers: torchdiffeq's algorithm with cheaper arithmetic must give torchdiffeq's numbers.

In float64 the rounding differences vanish, so the same steps, NFE, states and
gradients must come out to ~1e-12; in float32 the two differ only by rounding.
"""

import pytest
import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from odenet.models import CountedDynamics, block_function
from odenet.solvers import FAST_SOLVERS, fast_method


def solve(method, backprop, regularised=False, dtype=torch.float64):
    torch.manual_seed(0)
    dynamics = CountedDynamics(block_function(4, "groupnorm", "tanh")).to(dtype)
    z0 = torch.randn(3, 4, 6, 6, dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    state = (z0, z0.new_zeros(3), z0.new_zeros(3)) if regularised else z0
    kwargs = dict(rtol=1e-4, atol=1e-4, method=method)
    if backprop == "direct":
        out = odeint(dynamics, state, t, **kwargs)
    else:
        options = {"norm": "seminorm"} if backprop == "seminorm" else None
        out = odeint_adjoint(dynamics, state, t, adjoint_options=options,
                             adjoint_params=tuple(dynamics.parameters()), **kwargs)
    z1 = out[0][-1] + out[1][-1].sum() if regularised else out[-1]
    forward_nfe = dynamics.fnfe
    (z1 * torch.linspace(-1, 1, z1.numel(), dtype=dtype).view_as(z1)).sum().backward()
    grads = torch.cat([z0.grad.flatten()] + [p.grad.flatten() for p in dynamics.parameters()])
    return z1.detach(), grads, forward_nfe, dynamics.bnfe


@pytest.mark.parametrize("method", sorted(FAST_SOLVERS))
@pytest.mark.parametrize("backprop", ["adjoint", "seminorm", "direct"])
def test_same_steps_states_and_gradients_as_torchdiffeq_in_float64(method, backprop):
    stock, fast = solve(method, backprop), solve(fast_method(method), backprop)
    assert fast[2:] == stock[2:]  # forward and backward NFE: the same steps accepted and rejected
    assert stock[2] > 6  # an adaptive solve of several steps, not a trivial one
    torch.testing.assert_close(fast[0], stock[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], stock[1], rtol=1e-10, atol=1e-12)


def test_regularised_tuple_state_matches_torchdiffeq():
    stock, fast = solve("dopri5", "adjoint", regularised=True), solve(fast_method("dopri5"), "adjoint", regularised=True)
    assert fast[2:] == stock[2:]
    torch.testing.assert_close(fast[1], stock[1], rtol=1e-10, atol=1e-12)


def test_float32_differs_only_by_rounding():
    stock = solve("dopri5", "direct", dtype=torch.float32)
    fast = solve(fast_method("dopri5"), "direct", dtype=torch.float32)
    assert fast[2:] == stock[2:]
    torch.testing.assert_close(fast[0], stock[0], rtol=1e-5, atol=1e-5)


def test_fixed_step_and_unknown_solvers_keep_their_names():
    assert fast_method("dopri5") != "dopri5" and fast_method("rk4") == "rk4"


def test_step_size_limit_fails_with_torchdiffeqs_message():
    """odenet.failures recognises a diverged solve by torchdiffeq's assertion text."""
    stiff = lambda t, z: 1e4 * torch.sin(1e3 * z)  # noqa: E731
    with pytest.raises(AssertionError, match="max_num_steps exceeded"):
        odeint(stiff, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
               method=fast_method("dopri5"), rtol=1e-8, atol=1e-8, options={"max_num_steps": 5})


def test_jump_points_are_refused_not_ignored():
    f = nn.Identity()
    with pytest.raises(ValueError, match="jump_t"):
        odeint(lambda t, z: f(z), torch.ones(2), torch.tensor([0.0, 1.0]), method=fast_method("dopri5"),
               options={"jump_t": torch.tensor([0.5])})


def test_events_are_found_where_torchdiffeq_finds_them():
    from torchdiffeq import odeint_event

    def falling(t, z):
        return -torch.ones_like(z) * (1 + z.abs())

    def ground(t, z):
        return z.sum()

    z0, t0 = torch.tensor([1.0], dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    found = [odeint_event(falling, z0, t0, event_fn=ground, method=m, rtol=1e-6, atol=1e-8)
             for m in ("dopri5", fast_method("dopri5"))]
    (t_stock, z_stock), (t_fast, z_fast) = found
    # the event search bisects to atol, so rounding may move its end point within that
    torch.testing.assert_close(t_fast, t_stock, rtol=0, atol=1e-8)
    torch.testing.assert_close(z_fast, z_stock, rtol=0, atol=1e-8)
    assert 0 < float(t_fast) < 1
