"""`--estimate`: trials and trial-epochs against a hand count, device-hours against the
epoch costs BENCHMARKS.md measured, and no sweep started."""

import re

import pytest

from sweeps import estimate
from sweeps.architecture_ablation import architecture_ablation
from sweeps.parameter_efficiency import parameter_efficiency
from sweeps.tuning import main


def printed(program, argv, capsys):
    assert main(program, [*argv, "--estimate"]) == 0
    out = capsys.readouterr().out
    import ray

    assert not ray.is_initialized()
    return out


def number(pattern, text):
    return float(re.search(pattern, text).group(1).replace(",", ""))


def test_asha_trial_epochs_are_counted_rung_by_rung(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # rungs at epochs 1, 2, 4 and 8 of 10: 8 trials run epoch 1, 4 run epoch 2, 2 run epochs 3-4,
    # 1 runs epochs 5-8 and half a trial (the expected survivor of rung 8) epochs 9-10
    assert estimate.asha_epochs(8, 10, 1, 2) == 8 * 1 + 4 * 1 + 2 * 2 + 1 * 4 + 0.5 * 2
    out = printed(architecture_ablation, ["--num-samples", "8", "--max-epochs", "10", "--grace-period", "1",
                                          "--reduction-factor", "2"], capsys)
    assert "trials: 8" in out and "trial-epochs: at most 21 " in out
    out = printed(architecture_ablation, ["--num-samples", "8", "--max-epochs", "10", "--scheduler", "fifo"], capsys)
    assert "trial-epochs: at most 80 " in out
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started


def test_designed_trials_are_every_cell_and_their_hours_the_measured_epochs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # base + stride 1 + final_time 2, 5, 10: five cells, two seeds each, three epochs at most
    out = printed(architecture_ablation, ["--design", "one-at-a-time", "--dimensions", "stride,final_time",
                                          "--seeds", "2", "--max-epochs", "3"], capsys)
    assert "trials: 10" in out and "trial-epochs: at most 30 " in out
    # at the benchmark's own sizes (2048 images, width 64, batch 128) an epoch costs what
    # BENCHMARKS.md measured plus, for the ODE model, the element-wise part at C + A = 66; a test
    # pass over 512 images a third of a quarter epoch; and the fixed costs of the sweep and of
    # each trial come on top
    measured = estimate.Measured.read().epoch_s
    out = printed(parameter_efficiency, ["--models", "odenet-simple,resnet-small", "--datasets", "fashion-mnist",
                                         "--seeds", "2", "--max-epochs", "4", "--subset", "2048", "--test-subset",
                                         "512", "--no-reevaluate"], capsys)
    assert "trials: 4" in out and "trial-epochs: at most 16 " in out
    for device, label in (("cpu", "CPU"), ("cuda", "GPU")):
        epochs = 4 + 1 / 4 / 3
        element_wise = (estimate.ELEMENT_WISE_S.get(device, 0.0)
                        + 66 * estimate.ELEMENT_WISE_PER_CHANNEL_S.get(device, 0.0))
        epoch_s = {"odenet-simple": measured[device]["odenet-simple"] + 2048 * element_wise,
                   "resnet-small": measured[device]["resnet-small"]}
        seconds = estimate.SWEEP_S + 2 * sum(estimate.TRIAL_S + epochs * s for s in epoch_s.values())
        assert number(label + r"[^:]*: ([\d.,]+) device-hours", out) == pytest.approx(seconds / 3600, rel=5e-3)


def test_small_widths_cost_their_element_wise_work_and_every_part_grows_with_the_pixels(capsys, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--models", "odenet-simple", "--datasets", "fashion-mnist", "--seeds", "1", "--max-epochs", "100",
            "--subset", "2048", "--test-subset", "1", "--no-reevaluate"]
    hours = {(width, stride): number(r"CPU[^:]*: ([\d.,]+) device-hours", printed(
        parameter_efficiency, [*argv, "--width", str(width), "--stride", str(stride)], capsys))
        for width, stride in ((8, 2), (64, 2), (8, 1))}
    epoch_64 = estimate.Measured.read().epoch_s["cpu"]["odenet-simple"]

    def element_wise(state: int) -> float:
        return 2048 * (estimate.ELEMENT_WISE_S["cpu"] + state * estimate.ELEMENT_WISE_PER_CHANNEL_S["cpu"])

    fixed = estimate.SWEEP_S + estimate.TRIAL_S
    # width 8 (C + A = 10): the element-wise part at 10 channels, plus the convolutions at (10/66)^2
    assert hours[8, 2] * 3600 == pytest.approx(fixed + 100 * (element_wise(10) + epoch_64 * (10 / 66) ** 2),
                                               rel=1e-2)
    assert hours[64, 2] * 3600 == pytest.approx(fixed + 100 * (element_wise(66) + epoch_64), rel=1e-2)
    # stride 1: a 28x28 block against 14x14, four times the pixels for both parts
    assert (hours[8, 1] * 3600 - fixed) == pytest.approx(4 * (hours[8, 2] * 3600 - fixed), rel=1e-2)


def test_unmeasured_models_are_said_not_estimated(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = printed(parameter_efficiency, ["--models", "odenet-complex", "--datasets", "fashion-mnist"], capsys)
    assert "not estimated" in out and "device-hours" not in out


def test_the_fast_recipe_costs_what_its_lever_measured_and_an_unmeasured_solve_is_not_guessed(
        capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--models", "odenet-simple", "--datasets", "fashion-mnist", "--seeds", "2", "--max-epochs", "4",
            "--subset", "2048", "--test-subset", "1", "--no-reevaluate"]
    study = printed(parameter_efficiency, argv, capsys)
    fast = printed(parameter_efficiency, [*argv, "--recipe", "fast"], capsys)
    lever = estimate.Measured.read().levers["cpu"][("direct", "rk4", 1.0, 0.0, 0.0)]
    assert 0.05 < lever < 0.5  # BENCHMARKS.md: direct+rk4@1 over the default epoch
    fixed = (estimate.SWEEP_S + 2 * estimate.TRIAL_S) / 3600
    assert number(r"CPU[^:]*: ([\d.,]+) device-hours", fast) - fixed == pytest.approx(
        (number(r"CPU[^:]*: ([\d.,]+) device-hours", study) - fixed) * lever, rel=2e-2)
    unmeasured = printed(parameter_efficiency, [*argv, "--recipe", "fast", "--step-size", "0.25"], capsys)
    assert "not estimated" in unmeasured


@pytest.mark.stack
@pytest.mark.ray
def test_the_estimate_of_the_smoke_sweep_is_within_a_factor_of_2_of_its_wall_time(smoke_sweep):
    """--estimate against the session's smoke sweep (width 8, 6 trials, ASHA). The machine is shared,
    so the wall time on an idle machine is known to lie between the sweep's CPU time spread over
    the cores and its measured wall time: the estimate must be within a factor of 2 of that range."""
    estimated_s = number(r"CPU[^:]*: ([\d.,]+) device-hours", smoke_sweep.estimate) * 3600
    run = smoke_sweep.run
    print(f"estimate {estimated_s:.0f} s; wall {run.wall_s:.0f} s, CPU {run.cpu_s:.0f} s (at least "
          f"{run.fastest_s:.0f} s of wall), other processes' CPU meanwhile {run.others_cpu_s:.0f} s")
    assert run.fastest_s / 2 <= estimated_s <= 2 * run.wall_s, (estimated_s, run.fastest_s, run.wall_s)
