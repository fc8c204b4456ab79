"""odenet.solvers: torchdiffeq's algorithm with cheaper arithmetic must give torchdiffeq's numbers.

In float64 the rounding differences vanish, so the same steps, NFE, states and
gradients must come out to ~1e-12; in float32 the two differ only by rounding. The same
holds with several steps per host synchronisation (steps_per_sync = 4, the GPU path, run
here on the CPU; direct backpropagation keeps one step per sync): NFE counts only the
steps torchdiffeq takes.
"""

import contextlib
import functools
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchdiffeq import odeint, odeint_adjoint

from odenet import solvers as odenet_solvers
from odenet.models import CountedDynamics, block_function
from odenet.solvers import FAST_SOLVERS, fast_method

STEPS_PER_SYNC = (1, 4)


def solve(method, backprop, regularised=False, dtype=torch.float64, steps_per_sync=None, tol=1e-4, device="cpu"):
    torch.manual_seed(0)
    dynamics = CountedDynamics(block_function(4, "groupnorm", "tanh")).to(device, dtype)
    z0 = torch.randn(3, 4, 6, 6, dtype=dtype, requires_grad=True).to(device)
    t = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
    state = (z0, z0.new_zeros(3), z0.new_zeros(3)) if regularised else z0
    options = {} if steps_per_sync is None else {"steps_per_sync": steps_per_sync}
    kwargs = dict(rtol=tol, atol=tol, method=method, options=options)
    if backprop == "direct":
        out = odeint(dynamics, state, t, **kwargs)
    else:
        adjoint_options = {"norm": "seminorm", **options} if backprop == "seminorm" else None
        out = odeint_adjoint(dynamics, state, t, adjoint_options=adjoint_options,
                             adjoint_params=tuple(dynamics.parameters()), **kwargs)
    z1 = out[0][-1] + out[1][-1].sum() if regularised else out[-1]
    forward_nfe = dynamics.fnfe
    (z1 * torch.linspace(-1, 1, z1.numel(), dtype=dtype, device=device).view_as(z1)).sum().backward()
    grads = torch.cat([z0.grad.flatten()] + [p.grad.flatten() for p in dynamics.parameters()])
    return z1.detach(), grads, forward_nfe, dynamics.bnfe


stock_solve = functools.cache(solve)  # torchdiffeq's results, shared by the steps_per_sync cases

@pytest.mark.parametrize("steps_per_sync", STEPS_PER_SYNC)
@pytest.mark.parametrize("method", sorted(FAST_SOLVERS))
@pytest.mark.parametrize("backprop", ["adjoint", "seminorm", "direct"])
def test_same_steps_states_and_gradients_as_torchdiffeq_in_float64(method, backprop, steps_per_sync):
    stock, fast = stock_solve(method, backprop), solve(fast_method(method), backprop, steps_per_sync=steps_per_sync)
    assert fast[2:] == stock[2:]  # forward and backward NFE: the same steps accepted and rejected
    assert stock[2] > 6  # an adaptive solve of several steps, not a trivial one
    torch.testing.assert_close(fast[0], stock[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], stock[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps_per_sync", STEPS_PER_SYNC)
def test_regularised_tuple_state_matches_torchdiffeq(steps_per_sync):
    stock = stock_solve("dopri5", "adjoint", regularised=True)
    fast = solve(fast_method("dopri5"), "adjoint", regularised=True, steps_per_sync=steps_per_sync)
    assert fast[2:] == stock[2:]
    torch.testing.assert_close(fast[1], stock[1], rtol=1e-10, atol=1e-12)


class Recorded(nn.Module):
    """dz/dt = -z^3 + sin(5 t) with torchdiffeq's step callbacks recording each step (as tensors:
    a float() would synchronise with the GPU), those of the adjoint's backward solve apart."""

    def __init__(self):
        super().__init__()
        self.steps, self.backward_steps = [], []

    def forward(self, t, z):
        return -z ** 3 + torch.sin(5 * t)

    def callback_accept_step(self, t0, y0, dt):
        self.steps.append(("accept", t0, dt))

    def callback_reject_step(self, t0, y0, dt):
        self.steps.append(("reject", t0, dt))

    def callback_step_adjoint(self, t0, y0, dt):
        self.backward_steps.append(t0)


@pytest.mark.parametrize("method", sorted(FAST_SOLVERS))
def test_several_steps_per_sync_take_the_synchronising_loops_steps_exactly(method):
    """Rejections inside blocks, blocks ending mid-solve and past the end, two output times: the
    same steps and numbers as one step per sync, to the bit; the same decisions as torchdiffeq."""
    z0 = torch.linspace(-3, 3, 5, dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 3.0], dtype=torch.float64)
    recorded = {}
    for name in ("stock", 1, 3, 4):
        func = Recorded()
        method_options = {} if name == "stock" else {"steps_per_sync": name}
        solved = odeint(func, z0, t, method=method if name == "stock" else fast_method(method),
                        rtol=1e-7, atol=1e-9, options={"first_step": 2.0, **method_options})
        kinds = [kind for kind, *_ in func.steps]
        times = torch.stack([torch.stack(step[1:]) for step in func.steps])  # t0 and dt of each step
        recorded[name] = (kinds, times, solved)
    kinds, times, solved = recorded["stock"]
    assert kinds.count("reject") >= 2 and len(kinds) > 12
    for name in (1, 3, 4):
        assert recorded[name][0] == kinds
    # torchdiffeq's stage sums round differently: over ~1000 steps that drifts to ~1e-10
    torch.testing.assert_close(recorded[1][1], times, rtol=1e-8, atol=0)
    torch.testing.assert_close(recorded[1][2], solved, rtol=1e-8, atol=1e-10)
    for name in (3, 4):
        assert torch.equal(recorded[name][1], recorded[1][1]) and torch.equal(recorded[name][2], recorded[1][2])


@pytest.mark.parametrize("backprop, in_blocks", [("adjoint", True), ("seminorm", True), ("direct", False)])
def test_only_solves_that_record_no_graph_run_in_blocks(backprop, in_blocks, monkeypatch):
    """Direct backpropagation keeps one step per sync: through torch.where, rejected steps would
    stay in its graph (a zero gradient, NaN where a trial step overflowed)."""
    used = []
    original = odenet_solvers._StageListRungeKutta._advance_in_blocks
    monkeypatch.setattr(odenet_solvers._StageListRungeKutta, "_advance_in_blocks",
                        lambda self, next_t: used.append(torch.is_grad_enabled()) or original(self, next_t))
    solve(fast_method("dopri5"), backprop, steps_per_sync=4)
    assert bool(used) == in_blocks and not any(used)  # the adjoint's forward and backward solves


FAILURES = {
    "max_num_steps exceeded": (lambda t, z: 1e4 * torch.sin(1e3 * z), 1.0, 1e-8, {"max_num_steps": 5}),
    # f turns NaN: the error ratio and so the next step are NaN, the step falls to min_step = 0
    "underflow in dt": (lambda t, z: z * torch.where(t > 0.3, math.nan, 1.0), 1.0, 1e-6, {}),
    # dz/dt = z^2 blows up at t = 1; steps fixed at 0.5 are accepted whatever their error
    "non-finite values in state `y`": (lambda t, z: z ** 2, 5.0, 1e-6, {"min_step": 0.5, "max_step": 0.5}),
}


@pytest.mark.parametrize("steps_per_sync", STEPS_PER_SYNC)
@pytest.mark.parametrize("message", sorted(FAILURES))
def test_failures_raise_torchdiffeqs_messages(message, steps_per_sync):
    """odenet.failures recognises a diverged solve by torchdiffeq's assertion text."""
    f, end, tol, options = FAILURES[message]
    for method in ("dopri5", fast_method("dopri5")):
        if method != "dopri5":
            options = {**options, "steps_per_sync": steps_per_sync}
        with pytest.raises(AssertionError, match="^" + message):
            odeint(f, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, end], dtype=torch.float64),
                   method=method, rtol=tol, atol=tol, options=options)


def test_float32_differs_only_by_rounding():
    stock = solve("dopri5", "direct", dtype=torch.float32)
    fast = solve(fast_method("dopri5"), "direct", dtype=torch.float32)
    assert fast[2:] == stock[2:]
    torch.testing.assert_close(fast[0], stock[0], rtol=1e-5, atol=1e-5)


def test_fixed_step_and_unknown_solvers_keep_their_names():
    assert fast_method("dopri5") != "dopri5" and fast_method("rk4") == "rk4"


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


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (bool(), item(), tolist(): aten's
    _local_scalar_dense), each of which on a GPU waits for it to finish."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def host_reads_and_steps(tol, steps_per_sync, backprop, device="cpu", counter=HostReads):
    """Host reads of a solve of dz/dt = -z^3 + sin(5 t) and its steps (the backward solve's, for
    the adjoint)."""
    func = Recorded()
    z0 = torch.linspace(-3, 3, 64, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0.0, 3.0], dtype=torch.float64, device=device)
    kwargs = dict(method=fast_method("dopri5"), rtol=tol, atol=tol, options={"steps_per_sync": steps_per_sync})
    if backprop == "adjoint":
        z1 = odeint_adjoint(func, z0, t, adjoint_params=(), **kwargs)[-1]
    with counter() as reads:
        if backprop == "adjoint":
            z1.sum().backward()
        else:
            odeint(func, z0.detach(), t, **kwargs)
    return reads.count, len(func.backward_steps if backprop == "adjoint" else func.steps)


def assert_one_read_per_block(steps_per_sync, backprop, **where):
    """A tighter tolerance takes more steps: the reads grow by one per block of them, where
    one step per sync reads at every step (which shows that the counter sees the reads)."""
    loose, tight = (host_reads_and_steps(tol, steps_per_sync, backprop, **where) for tol in (1e-4, 1e-9))
    assert tight[1] - loose[1] >= 60, (loose, tight)  # steps
    assert tight[0] - loose[0] <= math.ceil((tight[1] - loose[1]) / steps_per_sync) + 2, (loose, tight)
    every_step = host_reads_and_steps(1e-9, 1, backprop, **where)
    assert every_step[0] >= every_step[1]


@pytest.mark.parametrize("backprop", ["adjoint", "forward"])
def test_the_host_reads_once_per_block_of_steps_not_per_step(backprop):
    assert_one_read_per_block(8, backprop)


def needs_cuda(test):
    """Skipped without a GPU, under CI too (CI machines have none; tests/conftest.py fails any other skip there)."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs a CUDA device: the host synchronisations it removes are the GPU's")
    return pytest.mark.ci_may_skip(skip(test))


@needs_cuda
@pytest.mark.parametrize("backprop", ["adjoint", "direct"])
def test_on_cuda_several_steps_per_sync_give_torchdiffeqs_numbers(backprop):
    stock = stock_solve("dopri5", backprop, device="cuda")
    fast = solve(fast_method("dopri5"), backprop, steps_per_sync=8, device="cuda")
    assert fast[2:] == stock[2:]
    torch.testing.assert_close(fast[0], stock[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], stock[1], rtol=1e-10, atol=1e-12)


class CudaSynchronisations(contextlib.AbstractContextManager):
    """Counts the host's waits for the GPU: torch.cuda's sync debug mode warns at each."""

    def __enter__(self):
        torch.cuda.synchronize()
        self._caught = warnings.catch_warnings(record=True)
        self.warnings = self._caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(*exc)
        self.count = sum("synchroniz" in str(warning.message) for warning in self.warnings)


@needs_cuda
@pytest.mark.parametrize("backprop", ["adjoint", "forward"])
def test_on_cuda_the_host_waits_once_per_block_of_steps_not_per_step(backprop):
    assert_one_read_per_block(8, backprop, device="cuda", counter=CudaSynchronisations)


def test_gpu_path_benchmark_runs_on_the_cpu_and_reports_its_fields(real_data_dir, capsys):
    """bench/gpu_path.py at width 4 on a few images: both variants, the same training (so the same
    NFE), and the FLOP count from the block's convolution: 2 x (4+2)*9*(4+2) x 14*14 per evaluation."""
    from bench import gpu_path

    assert gpu_path.main(["--device", "cpu", "--data-dir", str(real_data_dir), "--width", "4", "--subset", "20",
                          "--batch-size", "8", "--epochs", "1", "--steps-per-sync", "4", "--peak-tflops", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["steps_per_sync"] for row in rows] == [1, 4]
    assert [row["variant"] for row in rows] == ["synchronising", "device-side"]
    conv_flop = 2 * 6 * 9 * 6 * 14 * 14
    for row in rows:
        assert row["images"] == 16 and row["width"] == 4 and row["images_per_s"] > 0
        assert row["conv_gflop_per_evaluation"] == pytest.approx(conv_flop / 1e9)
        assert row["gflop_per_image"] == pytest.approx(conv_flop * (row["fnfe"] + 3 * row["bnfe"]) / 1e9)
        assert row["fraction_of_peak"] == pytest.approx(row["tflop_per_s"])
        assert row["fnfe"] > 6 and row["bnfe"] > 6
    assert (rows[0]["fnfe"], rows[0]["bnfe"]) == (rows[1]["fnfe"], rows[1]["bnfe"])
