"""The time-to-accuracy benchmark's statistics on known per-seed inputs, and one tiny real run."""

import math
import statistics

import pytest
from scipy import stats as sp
from scipy.stats import t as t_dist

from bench.time_to_accuracy import BASELINE, SeedResult, compare, main
from odenet.stats import ratio_interval


def seeds(accuracies, total, to_target=1.0):
    """Runs of five epochs that reach validation accuracy 0.5 after `to_target` CPU seconds and
    stop after `total`."""
    rest = (total - to_target) / 4
    return [SeedResult(a, val_acc=(0.5, 0.6, 0.6, 0.6, 0.6), epoch_s=(to_target, rest, rest, rest, rest))
            for a in accuracies]


BASE_ACC = [0.80, 0.84, 0.88, 0.82]  # a wide spread over seeds: unpaired intervals overlap whatever a lever does
BASE_S = [100.0, 120.0, 110.0, 90.0]


def lever(differences, ratios):
    """A lever's seeds: test accuracy the baseline's plus `differences`, time the baseline's / `ratios`."""
    return [SeedResult(a + d, val_acc=(0.5,) * 5, epoch_s=(t / r / 5,) * 5)
            for a, d, t, r in zip(BASE_ACC, differences, BASE_S, ratios)]


def test_the_claim_rule_non_inferiority_speed_and_holm_over_the_levers():
    results = {
        BASELINE: [SeedResult(a, val_acc=(0.5,) * 5, epoch_s=(t / 5,) * 5) for a, t in zip(BASE_ACC, BASE_S)],
        # 2 points worse in every seed, 4x faster: its own interval overlaps the baseline's
        "odenet-simple:worse": lever([-0.021, -0.019, -0.020, -0.0205], [4, 4.2, 3.9, 4.1]),
        # as accurate, twice as slow
        "odenet-simple:slower": lever([0.001, -0.001, 0.002, 0.0], [0.5, 0.52, 0.48, 0.5]),
        # as accurate, a speed-up whose interval contains 1
        "odenet-simple:unsure": lever([0.001, -0.001, 0.002, 0.0], [2.0, 0.6, 1.5, 0.8]),
        # as accurate and 4-5x faster: claimed
        "odenet-simple:good": lever([0.002, -0.001, 0.003, 0.001], [4.0, 5.0, 4.5, 4.0]),
        "resnet-small:default": [SeedResult(a, val_acc=(0.5,) * 5, epoch_s=(1.0,) * 5) for a in BASE_ACC],
    }
    table = compare(results, target=0.5).set_index("configuration")
    worse = table.loc["odenet-simple:worse"]
    acc = [r.test_acc * 100 for r in results["odenet-simple:worse"]]
    base = [r.test_acc * 100 for r in results[BASELINE]]
    # unpaired, the two 95% intervals overlap: the old overlap rule claimed "equal accuracy" here
    assert sp.ttest_1samp(acc, 0).confidence_interval().high > sp.ttest_1samp(base, 0).confidence_interval().low
    assert worse["non-inferior"] == "no" and worse["claimed"] == "no" and worse["faster"] == "yes"
    assert table.loc["odenet-simple:slower", "faster"] == "no"
    assert table.loc["odenet-simple:slower", "claimed"] == "no"
    assert table.loc["odenet-simple:slower", "non-inferior"] == "yes"
    unsure = table.loc["odenet-simple:unsure"]
    ratios = [2.0, 0.6, 1.5, 0.8]
    logs = [math.log(r) for r in ratios]
    ci = sp.ttest_1samp(logs, 0).confidence_interval(0.95)
    assert math.exp(ci.low) < 1 < math.exp(ci.high)
    assert unsure["faster"] == "no" and unsure["claimed"] == "no" and unsure["speed_bound"] < 1
    good = table.loc["odenet-simple:good"]
    assert good["claimed"] == "yes" and good["claimed_speed_up"] == pytest.approx((4 * 5 * 4.5 * 4) ** 0.25, rel=1e-6)
    assert table.loc["resnet-small:default", "claimed"] == "-"

    # the numbers, by hand: Holm over the 4 levers' one-sided non-inferiority p-values (dof 3)
    levers = ["odenet-simple:worse", "odenet-simple:slower", "odenet-simple:unsure", "odenet-simple:good"]
    tests = {}
    for name in levers:
        d = [(r.test_acc - b.test_acc) * 100 for r, b in zip(results[name], results[BASELINE])]
        n, mean, se = len(d), sum(d) / len(d), statistics.stdev(d) / math.sqrt(len(d))
        tests[name] = (mean, se, t_dist.sf((mean + 1.0) / se, n - 1))
    order = sorted(levers, key=lambda name: tests[name][2])
    running, adjusted = 0.0, {}
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(levers) - rank) * tests[name][2]))
        adjusted[name] = running
    mean, se, p = tests["odenet-simple:good"]
    level = 1 - 0.05 * p / adjusted["odenet-simple:good"]
    assert good["acc_p_holm"] == pytest.approx(adjusted["odenet-simple:good"])
    assert good["acc_level"] == pytest.approx(level)
    assert good["acc_bound"] == pytest.approx(mean - t_dist.ppf(level, 3) * se)
    assert worse["acc_bound"] == pytest.approx(tests["odenet-simple:worse"][0] - t_dist.ppf(
        1 - 0.05 * tests["odenet-simple:worse"][2] / adjusted["odenet-simple:worse"], 3) * tests["odenet-simple:worse"][1])
    # the speed-up's one-sided bound, the same way, on the log ratios
    logs = [math.log(r) for r in (4.0, 5.0, 4.5, 4.0)]
    assert good["speed_bound"] == pytest.approx(math.exp(sum(logs) / 4 - t_dist.ppf(good["speed_level"], 3)
                                                         * statistics.stdev(logs) / 2))


def test_three_seeds_are_the_least_a_claim_rests_on():
    results = {BASELINE: [SeedResult(a, val_acc=(0.5,), epoch_s=(t,)) for a, t in zip(BASE_ACC[:2], BASE_S[:2])],
               "odenet-simple:two": [SeedResult(a, val_acc=(0.5,), epoch_s=(t / 4,)) for a, t in
                                     zip(BASE_ACC[:2], BASE_S[:2])]}
    row = compare(results, target=0.5).set_index("configuration").loc["odenet-simple:two"]
    assert row["claimed"] == "no" and row["why not"] == "fewer than 3 seeds"


def test_the_speed_up_is_paired_by_seed_and_averaged_in_logarithms():
    base, lever = [100.0, 200.0, 400.0], [50.0, 50.0, 100.0]  # ratios 2, 4, 4
    ratio = ratio_interval(base, lever)
    assert ratio.mean == pytest.approx((2 * 4 * 4) ** (1 / 3))
    logs = [math.log(2), math.log(4), math.log(4)]
    mean, sd = sum(logs) / 3, statistics.stdev(logs)
    assert ratio.low == pytest.approx(math.exp(mean - 4.3027 * sd / math.sqrt(3)), rel=1e-4)
    assert ratio.high == pytest.approx(math.exp(mean + 4.3027 * sd / math.sqrt(3)), rel=1e-4)


def test_one_seed_claims_nothing_and_a_target_never_reached_has_no_time():
    results = {BASELINE: seeds([0.8], 100.0), "odenet-simple:one": seeds([0.8], 10.0)}
    assert compare(results, target=0.5).set_index("configuration").loc["odenet-simple:one", "claimed"] == "no"
    run = SeedResult(0.8, val_acc=(0.5, 0.7, 0.85), epoch_s=(2.0, 3.0, 4.0))
    assert run.time_to(0.8) == 9.0 and run.time_to(0.5) == 2.0 and run.time_to(0.9) is None
    assert run.total_s == 9.0 and run.epochs == 3


def test_a_lever_that_misses_the_target_in_one_seed_is_not_claimed_even_where_intervals_overlap():
    results = {BASELINE: seeds([0.8, 0.81, 0.82], total=100.0, to_target=50.0),
               "odenet-simple:missed": seeds([0.801, 0.809, 0.821], total=20.0, to_target=10.0)}
    results["odenet-simple:missed"][0] = SeedResult(0.801, val_acc=(0.4,) * 5, epoch_s=(4.1,) * 5)
    row = compare(results, target=0.5).set_index("configuration").loc["odenet-simple:missed"]
    assert row["reached target"] == "2 of 3" and row["speed-up to target"] == "5 [5, 5]"
    assert row["claimed"] == "no" and math.isnan(row["claimed_speed_up"])
    assert row["why not"] == "missed the target in some seed"


def test_a_tiny_run_writes_its_section(real_data_dir, tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# kept\n")
    assert main(["--data-dir", str(real_data_dir), "--subset", "256", "--test-subset", "100", "--width", "4",
                 "--seeds", "2", "--max-epochs", "1", "--levers", "direct+rk4@1", "--target", "0.2",
                 "--jobs", "2", "--out", str(out), "--results", str(tmp_path / "runs.json")]) == 0
    text = out.read_text()
    assert text.startswith("# kept") and "<!-- odenet bench: tta_cpu -->" in text
    assert "odenet-simple:direct+rk4@1" in text and "resnet-small:default" in text
    # the saved runs render the same table again without training
    again = tmp_path / "again.md"
    assert main(["--render", str(tmp_path / "runs.json"), "--subset", "256", "--test-subset", "100", "--width", "4",
                 "--seeds", "2", "--max-epochs", "1", "--target", "0.2", "--jobs", "2", "--out", str(again)]) == 0
    assert again.read_text().split("| configuration")[1] == text.split("| configuration")[1]
