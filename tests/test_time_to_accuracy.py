"""The time-to-accuracy benchmark's statistics on known per-seed inputs, and one tiny real run."""

import math
import statistics

import pytest

from bench.time_to_accuracy import BASELINE, SeedResult, compare, main
from odenet.stats import ratio_interval


def seeds(accuracies, total, to_target=1.0):
    """Runs of five epochs that reach validation accuracy 0.5 after `to_target` CPU seconds and
    stop after `total`."""
    rest = (total - to_target) / 4
    return [SeedResult(a, val_acc=(0.5, 0.6, 0.6, 0.6, 0.6), epoch_s=(to_target, rest, rest, rest, rest))
            for a in accuracies]


def test_the_overlap_rule_and_the_target_decide_which_speed_ups_are_claimed():
    results = {
        BASELINE: seeds([0.80, 0.81, 0.82], total=100.0, to_target=50.0),
        "odenet-simple:same": seeds([0.79, 0.81, 0.83], total=25.0, to_target=10.0),  # overlaps: 4x claimed
        "odenet-simple:worse": seeds([0.70, 0.71, 0.72], total=10.0),  # faster, interval below: not claimed
        "odenet-simple:better": seeds([0.90, 0.91, 0.92], total=50.0),  # above the baseline: claimed
        "resnet-small:default": seeds([0.80, 0.81, 0.82], total=2.0),  # another model, not a lever
    }
    table = compare(results, target=0.5).set_index("configuration")
    # mean 0.81, t(0.975, 2) = 4.303, sd 0.01: 0.81 +- 0.0248
    assert table.loc[BASELINE, "acc_low"] == pytest.approx(0.81 - 4.3027 * 0.01 / math.sqrt(3), abs=1e-4)
    assert table.loc["odenet-simple:same", "claimed"] == "yes"
    assert table.loc["odenet-simple:same", "claimed_speed_up"] == pytest.approx(4.0)
    assert table.loc["odenet-simple:same", "speed-up to target"] == pytest.approx(5.0)
    assert table.loc["odenet-simple:worse", "claimed"] == "no"
    assert math.isnan(table.loc["odenet-simple:worse", "claimed_speed_up"])
    assert table.loc["odenet-simple:worse", "speed-up to early stop"] == "10 [10, 10]"
    assert table.loc["odenet-simple:better", "claimed_speed_up"] == pytest.approx(2.0)
    assert table.loc["resnet-small:default", "claimed"] == "-"
    assert math.isnan(table.loc[BASELINE, "claimed_speed_up"])
    # paired by seed: +0.10 in every seed, however wide each configuration's own interval
    assert table.loc["odenet-simple:better", "Δ test acc vs odenet-simple, points"] == "10 [10, 10]"


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
               "odenet-simple:missed": seeds([0.8, 0.81, 0.82], total=20.0, to_target=10.0)}
    results["odenet-simple:missed"][0] = SeedResult(0.8, val_acc=(0.4,) * 5, epoch_s=(4.0,) * 5)
    row = compare(results, target=0.5).set_index("configuration").loc["odenet-simple:missed"]
    assert row["reached target"] == "2 of 3" and math.isnan(row["speed-up to target"])
    assert row["claimed"] == "no" and math.isnan(row["claimed_speed_up"])


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
