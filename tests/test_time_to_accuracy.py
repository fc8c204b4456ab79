"""The time-to-accuracy benchmark's statistics on known per-seed inputs, and one tiny real run."""

import math

import pytest

from bench.time_to_accuracy import BASELINE, SeedResult, compare, main


def seeds(accuracies, total, to_target=1.0):
    """Runs of five epochs that reach validation accuracy 0.5 after `to_target` CPU seconds and
    stop after `total`."""
    rest = (total - to_target) / 4
    return [SeedResult(a, val_acc=(0.5, 0.6, 0.6, 0.6, 0.6), epoch_s=(to_target, rest, rest, rest, rest))
            for a in accuracies]


def test_the_overlap_rule_decides_which_speed_ups_are_claimed():
    results = {
        BASELINE: seeds([0.80, 0.81, 0.82], total=100.0, to_target=50.0),
        "same": seeds([0.79, 0.81, 0.83], total=25.0, to_target=10.0),  # overlaps: 4x claimed
        "worse": seeds([0.70, 0.71, 0.72], total=10.0),  # faster, but its interval lies below: not claimed
        "better": seeds([0.90, 0.91, 0.92], total=50.0),  # above the baseline: claimed
    }
    table = compare(results, target=0.5).set_index("configuration")
    # mean 0.81, t(0.975, 2) = 4.303, sd 0.01: 0.81 +- 0.0248
    assert table.loc[BASELINE, "acc_low"] == pytest.approx(0.81 - 4.3027 * 0.01 / math.sqrt(3), abs=1e-4)
    assert table.loc["same", "claimed speed-up"] == pytest.approx(4.0)
    assert table.loc["same", "speed-up to target"] == pytest.approx(5.0)
    assert table.loc["worse", "equal accuracy"] == "no" and math.isnan(table.loc["worse", "claimed speed-up"])
    assert table.loc["worse", "speed-up to early stop"] == pytest.approx(10.0)
    assert table.loc["better", "claimed speed-up"] == pytest.approx(2.0)
    assert math.isnan(table.loc[BASELINE, "claimed speed-up"])


def test_one_seed_claims_nothing_and_a_target_never_reached_has_no_time():
    results = {BASELINE: seeds([0.8], 100.0), "one": seeds([0.8], 10.0)}
    assert compare(results, target=0.5).set_index("configuration").loc["one", "equal accuracy"] == "no"
    run = SeedResult(0.8, val_acc=(0.5, 0.7, 0.85), epoch_s=(2.0, 3.0, 4.0))
    assert run.time_to(0.8) == 9.0 and run.time_to(0.5) == 2.0 and run.time_to(0.9) is None
    assert run.total_s == 9.0 and run.epochs == 3


def test_a_configuration_that_misses_the_target_in_one_seed_has_no_speed_up_to_target():
    results = {BASELINE: seeds([0.8, 0.81, 0.82], total=100.0, to_target=50.0),
               "missed": seeds([0.8, 0.81, 0.82], total=20.0, to_target=10.0)}
    results["missed"][0] = SeedResult(0.8, val_acc=(0.4,) * 5, epoch_s=(4.0,) * 5)
    row = compare(results, target=0.5).set_index("configuration").loc["missed"]
    assert row["reached target"] == "2 of 3" and math.isnan(row["speed-up to target"])
    assert row["speed-up to early stop"] == pytest.approx(5.0)


def test_a_tiny_run_writes_its_section(real_data_dir, tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# kept\n")
    assert main(["--data-dir", str(real_data_dir), "--subset", "256", "--test-subset", "100", "--width", "4",
                 "--seeds", "2", "--max-epochs", "1", "--levers", "direct+rk4@1", "--target", "0.2",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# kept") and "<!-- odenet bench: tta_cpu -->" in text
    assert "odenet-simple:direct+rk4@1" in text and "resnet-small:default" in text
