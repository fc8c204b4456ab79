"""Models: the study's parameter counts, shapes, NFE counting, adjoint vs direct gradients."""

import pytest
import torch

from odenet.config import MODELS, ConfigError, RunConfig
from odenet.failures import Diverged, solver_failures
from odenet.models import ODEBlock, ResidualBlock, SolverSettings, build, group_count, parameter_counts

# The study's own counts (spec table); a correct build lands within 1%.
STUDY_PARAMETERS = {
    ("fashion-mnist", "resnet-small"): 169_000,
    ("fashion-mnist", "resnet-large"): 248_000,
    ("fashion-mnist", "odenet-simple"): 169_000,
    ("fashion-mnist", "odenet-complex"): 394_000,
    ("fashion-mnist", "resnet-complex"): 394_000,
    ("cifar10", "resnet-small"): 1_270_000,
    ("cifar10", "resnet-large"): 2_470_000,
    ("cifar10", "odenet-simple"): 1_270_000,
    ("cifar10", "odenet-complex"): 413_000,
    ("cifar10", "resnet-complex"): 413_000,
}


def solver(**run_settings) -> SolverSettings:
    """The solver settings of a run with these RunConfig fields (the study's defaults otherwise)."""
    return SolverSettings.of(RunConfig(**run_settings))


@pytest.mark.parametrize("dataset, model", sorted(STUDY_PARAMETERS))
def test_parameter_count_matches_the_study(dataset, model):
    counts = parameter_counts(build(RunConfig(dataset=dataset, model=model)))
    target = STUDY_PARAMETERS[dataset, model]
    assert abs(counts["params_total"] - target) / target < 0.01, counts


def test_complex_head_is_about_41000_parameters_on_cifar10():
    counts = parameter_counts(build(RunConfig(dataset="cifar10", model="resnet-complex")))
    assert abs((counts["params_total"] - counts["params_outside_head"]) - 41_000) < 100


def test_group_count_is_the_largest_divisor_up_to_32():
    assert (group_count(66), group_count(64), group_count(258), group_count(7)) == (22, 32, 6, 7)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset, shape", [("fashion-mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_output_shape(model, dataset, shape):
    for stride in (1, 2):
        net = build(RunConfig(dataset=dataset, model=model, width=4, stride=stride))
        assert net(torch.randn(3, *shape)).shape == (3, 10)


@pytest.mark.parametrize("model", MODELS)
def test_nfe_counts_move_for_ode_models_and_stay_zero_for_resnets(model):
    net = build(RunConfig(model=model, width=4))
    net(torch.randn(4, 1, 28, 28)).sum().backward()
    if model.startswith("odenet"):
        assert net.fnfe >= 6 and net.bnfe >= 6
    else:
        assert net.fnfe == 0 and net.bnfe == 0


def test_one_block_function_serves_the_odenet_and_the_resnet():
    ode = build(RunConfig(model="odenet-simple", width=4))
    res = build(RunConfig(model="resnet-large", width=4))
    f_ode = ode.ode_blocks[0].dynamics.f
    f_res = [m.f for m in res.modules() if isinstance(m, ResidualBlock)]
    assert len(f_res) == 3
    assert all(str(f) == str(f_ode) for f in f_res)


@pytest.mark.parametrize("adjoint", ["adjoint", "seminorm"])
def test_adjoint_and_direct_backprop_give_matching_gradients(adjoint):
    def gradients(mode):
        torch.manual_seed(0)
        # float64, tight tolerances and smooth activations (ReLU's kinks make the adjoint
        # solve stiff), so the two gradients differ by solver error only
        net = build(RunConfig(model="odenet-simple", width=3, rtol=1e-7, atol=1e-7, adjoint=mode,
                              activation_before="tanh", activation_inside="tanh")).double()
        torch.manual_seed(1)
        x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
        net(x).square().sum().backward()
        return [p.grad.clone() for p in net.parameters()], net.bnfe

    direct, direct_bnfe = gradients("direct")
    other, other_bnfe = gradients(adjoint)
    for g_direct, g_other in zip(direct, other):
        assert (g_direct - g_other).abs().max() <= 5e-3 * g_direct.abs().max() + 1e-10
    assert direct_bnfe > 0 and other_bnfe > 0


def test_fixed_step_solvers_take_the_step_size():
    net = build(RunConfig(model="odenet-simple", width=4, solver="rk4", step_size=0.25))
    with torch.no_grad():
        net(torch.randn(2, 1, 28, 28))
    assert net.fnfe == 4 * 4  # four steps of four evaluations


def test_underflow_in_dt_becomes_diverged():
    # dz/dt = z^2 from z(0) = 1 blows up at t = 1: dopri5 shrinks its step to nothing.
    class BlowUp(torch.nn.Module):
        def forward(self, z):
            return z * z

    block = ODEBlock(BlowUp(), final_time=2.0, solver=solver(rtol=1e-6, atol=1e-6, max_num_steps=10**6))
    with pytest.raises(Diverged) as err, solver_failures(epoch=3, batch=7):
        block(torch.ones(1, 1, 1, 1))
    assert err.value.cause == "underflow" and (err.value.epoch, err.value.batch) == (3, 7)
    assert not isinstance(err.value, AssertionError)


@pytest.mark.parametrize("adjoint", ["adjoint", "direct"])
def test_regularisers_add_to_the_loss_and_reach_the_weights(adjoint):
    torch.manual_seed(0)
    net = build(RunConfig(model="odenet-simple", width=3, kinetic_energy=0.1, jacobian_norm=0.1, adjoint=adjoint))
    net(torch.randn(2, 1, 28, 28))
    penalty = net.regularisation()
    assert torch.is_tensor(penalty) and penalty.item() > 0
    penalty.backward()
    conv = net.ode_blocks[0].dynamics.f[0].weight
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 1, 28, 28))
    assert net.regularisation() == 0.0


def test_evaluation_can_use_another_solver():
    net = build(RunConfig(model="odenet-simple", width=4, solver="rk4", step_size=0.5))
    with net.solving_with(solver(solver="euler", step_size=0.25)), torch.no_grad():
        net(torch.randn(2, 1, 28, 28))
    assert net.fnfe == 4
    assert net.ode_blocks[0].solver.method == "rk4"


@pytest.mark.parametrize("model", ["odenet-complex", "resnet-complex"])
def test_complex_models_honour_augment_dims_and_refuse_stem_settings(model):
    counts = [parameter_counts(build(RunConfig(model=model, augment_dims=a)))["params_total"] for a in (0, 1, 3)]
    # each augmented zero channel feeds the first 3x3 convolution of 64 filters
    assert counts[1] - counts[0] == counts[2] - counts[1] - 64 * 9 == 64 * 9
    assert RunConfig(model=model).stride is None and RunConfig(model=model).activation_before is None
    for name, value in (("stride", 1), ("activation_before", "tanh")):
        with pytest.raises(ConfigError, match=f"{name}=.*{model} has no stem, so {name} does not apply"):
            RunConfig.from_dict({"model": model, name: value})
    # moving a simple run's settings to a complex model drops the stem settings it cannot have
    moved = RunConfig.from_dict({"stride": 1, "activation_before": "tanh"}).replace(model=model)
    assert (moved.stride, moved.activation_before) == (None, None)
    assert RunConfig.from_dict({"model": model}).replace(model="odenet-simple").stride == 2


def test_too_many_steps_and_a_non_finite_state_become_diverged_and_other_assertions_stay_bugs():
    # Real torchdiffeq solves: a release that rewords its messages fails here.
    class Fast(torch.nn.Module):
        def forward(self, z):
            return 50 * torch.sin(20 * z)

    block = ODEBlock(Fast(), final_time=1.0, solver=solver(rtol=1e-7, atol=1e-7, max_num_steps=3))
    with pytest.raises(Diverged) as err, solver_failures(epoch=1, batch=2):
        block(torch.ones(1, 1, 1, 1))
    assert err.value.cause == "max_num_steps"

    # a state that stopped being finite, with a step size that still is
    import torchdiffeq

    with pytest.raises(Diverged) as err, solver_failures(epoch=1, batch=2):
        torchdiffeq.odeint(lambda t, z: z, torch.full((1,), float("nan")), torch.tensor([0.0, 1.0]),
                           method="dopri5", options={"first_step": 0.1})
    assert err.value.cause == "non_finite_state"

    class Buggy(torch.nn.Module):
        def forward(self, z):
            assert z.shape[1] == 3, "expected 3 channels"
            return z

    with pytest.raises(AssertionError, match="expected 3 channels") as err, solver_failures(epoch=1, batch=2):
        ODEBlock(Buggy(), final_time=1.0, solver=solver())(torch.ones(1, 1, 1, 1))
    assert not isinstance(err.value, Diverged)
