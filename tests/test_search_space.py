"""The architecture ablation's search space, resolved without starting Ray."""

import importlib.util

from sweeps.space import check_space

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("architecture_ablation", REPO / "sweeps" / "architecture_ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_speed_levers_join_the_space_and_keep_evaluation_on_dopri5():
    _, base, space, points, _ = ablation.prepare(["--smoke", "--speed-levers"])
    assert set(ablation.SPEED_SPACE) <= set(space) and set(ablation.SEARCH_SPACE) <= set(space)
    assert list(space["solver"].values) == ["dopri5", "bosh3", "rk4", "euler"]
    assert base.eval_solver == "dopri5"
    assert check_space(space, base) == []
    # the study's points still start the search, at the unregularised dopri5 solve
    assert len(points) == len(ablation.STUDY_POINTS)
    assert all(p["solver"] == "dopri5" and p["kinetic_energy"] == 0.0 and p["jacobian_norm"] == 0.0
               for p in points)
    assert all(set(p) == set(space) for p in points)


def test_without_speed_levers_the_space_is_the_studys():
    _, base, space, _, _ = ablation.prepare(["--smoke"])
    assert set(space) == set(ablation.SEARCH_SPACE)
    assert base.eval_solver is None


def test_an_explicit_eval_solver_wins():
    _, base, _, _, _ = ablation.prepare(["--smoke", "--speed-levers", "--eval-solver", "rk4"])
    assert base.eval_solver == "rk4"


def test_smoke_sizes_stand_in_for_the_flags_not_given():
    args, base, _, _, _ = ablation.prepare(["--smoke", "--num-samples", "3", "--max-epochs", "5"])
    assert (args.num_samples, args.max_concurrent, args.grace_period) == (3, 2, 1)
    assert (base.max_epochs, base.subset, base.width) == (5, 1024, 8)
    args, base, _, _, _ = ablation.prepare(["--num-samples", "3"])
    assert (args.max_concurrent, args.grace_period, base.subset) == (4, 2, None)


def test_smoke_picks_its_one_ablated_dimension_only_in_the_one_at_a_time_design(capsys, tmp_path, monkeypatch):
    from sweeps.tuning import main

    monkeypatch.chdir(tmp_path)
    # activation_before's four values: the base and three others, each over --smoke's three seeds
    assert main(ablation.architecture_ablation, ["--smoke", "--design", "one-at-a-time", "--estimate"]) == 0
    assert "trials: 12\n" in capsys.readouterr().out
    assert main(ablation.architecture_ablation, ["--smoke", "--design", "one-at-a-time", "--dimensions", "stride",
                                                 "--estimate"]) == 0
    assert "trials: 6\n" in capsys.readouterr().out
    # the search design has no ablated dimension: --smoke supplies none, and one given is refused
    args, _, _, _, _ = ablation.prepare(["--smoke"])
    assert args.dimensions is None
    assert main(ablation.architecture_ablation, ["--smoke", "--dimensions", "stride", "--estimate"]) == 2
    assert "--dimensions: only for --design one-at-a-time" in capsys.readouterr().err
