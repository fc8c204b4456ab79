"""The time-to-accuracy benchmark's statistics on known per-seed inputs, and one tiny real run."""

import math

import pytest

from bench.time_to_accuracy import BASELINE, SeedResult, compare, main, time_to_target
from odenet.train import EpochMetrics


def seeds(accuracies, total, to_target=1.0):
    return [SeedResult(a, to_target, total, 5) for a in accuracies]


def test_the_overlap_rule_decides_which_speed_ups_are_claimed():
    results = {
        BASELINE: seeds([0.80, 0.81, 0.82], total=100.0, to_target=50.0),
        "same": seeds([0.79, 0.81, 0.83], total=25.0, to_target=10.0),  # overlaps: 4x claimed
        "worse": seeds([0.70, 0.71, 0.72], total=10.0),  # faster, but its interval lies below: not claimed
        "better": seeds([0.90, 0.91, 0.92], total=50.0),  # above the baseline: claimed
    }
    table = compare(results).set_index("configuration")
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
    assert compare(results).set_index("configuration").loc["one", "equal accuracy"] == "no"
    history = [EpochMetrics(epoch=i, train_loss=1, train_acc=0.5, val_loss=1, val_acc=v, fnfe=0, bnfe=0,
                            val_fnfe=0, epoch_time_s=2.0, val_time_s=0.5) for i, v in enumerate((0.5, 0.7, 0.85), start=1)]
    assert time_to_target(history, 0.8) == 6.0 and time_to_target(history, 0.9) is None


def test_a_tiny_run_writes_its_section(real_data_dir, tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# kept\n")
    assert main(["--data-dir", str(real_data_dir), "--subset", "256", "--test-subset", "100", "--width", "4",
                 "--seeds", "2", "--max-epochs", "1", "--levers", "direct+rk4@1", "--target", "0.2",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# kept") and "<!-- odenet bench: tta_cpu -->" in text
    assert "odenet-simple:direct+rk4@1" in text and "resnet-small:default" in text
