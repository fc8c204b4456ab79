"""`python -m bench`: a tiny run on real data writes every table; correctness only, no timing asserted."""

import os
import re
import subprocess
import sys

import pytest

from bench import settings
from bench.__main__ import EXIT_BAD_INPUT, main
from bench.levers import parse_lever
from bench.markdown import write_section
from bench.plan import plan


def python_m_bench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=800)


def table_after(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the markdown table under `## heading`, as dicts of cell strings."""
    section = text.split(f"## {heading}\n", 1)[1]
    lines = [line for line in section.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


# Smaller than --quick's sizes: the tables' shape and signs are checked, not the numbers, and
# the 36 worker processes (3 repetitions, bench's floor for a median) dominate the time.
SMALLEST = ["--subset", "64", "--width", "2", "--batch-size", "32"]


@pytest.mark.slow
def test_quick_run_writes_every_table_with_positive_numbers(tmp_path, real_data_dir):
    result = python_m_bench("--quick", *SMALLEST, "--out", "tmp/BENCH.md", "--data-dir", str(real_data_dir),
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "tmp" / "BENCH.md").read_text()
    assert text.startswith("<!-- odenet bench: cpu -->\n# Benchmarks on the CPU")
    body = text.split("-->\n", 1)[1].rsplit("\n<!--", 1)[0]
    assert body.strip() in result.stdout  # the tables are printed too

    # header: machine, date, the command that reproduces the run
    assert "- Machine: " in text and " cores available" in text and "torch " in text
    assert re.search(r"- Date: \d{4}-\d{2}-\d{2}", text)
    command = re.search(r"- Command: `(python -m bench [^`]*)`", text).group(1)
    assert "--quick" in command and "--repeats 3" in command and "--out tmp/BENCH.md" in command
    assert all(f"{flag} {value}" in command for flag, value in zip(SMALLEST[::2], SMALLEST[1::2]))

    # the ratio lines
    ratio = re.search(r"odenet-simple / resnet-small epoch time at default settings: ([0-9.]+)x", text)
    assert ratio and float(ratio.group(1)) > 0
    assert "Lowest epoch-time ratio with levers" in text and "see the time-to-accuracy section" in text
    for model in ("resnet-small", "odenet-simple"):
        loop = re.search(rf"Our loop against the reference loop, {model}: ([0-9.]+)x", text)
        assert loop and float(loop.group(1)) > 0

    models = table_after(text, "Each model at default settings: our loop and the reference loop")
    assert {(r["model"], r["loop"]) for r in models} == {
        (m, loop) for m in ("resnet-small", "odenet-simple") for loop in ("ours", "reference")}
    for row in models:
        assert number(row["epoch s"]) > 0 and number(row["train img/s"]) > 0
        assert number(row["peak MiB"]) >= 0
        assert 0 <= number(row["val acc"]) <= 1
        if row["model"] == "odenet-simple":
            assert number(row["FNFE"]) > 0 and number(row["BNFE"]) > 0 and number(row["val FNFE"]) > 0
        else:
            assert number(row["FNFE"]) == 0

    loops = table_after(text, "Our loop against the reference loop")
    assert [r["model"] for r in loops] == ["resnet-small", "odenet-simple"]
    assert all(number(r["speed-up (reference / ours)"]) > 0 for r in loops)

    levers = table_after(text, "Levers")
    by_lever = {(r["model"], r["levers"]): r for r in levers}
    assert set(by_lever) == {("resnet-small", "default"), ("resnet-small", "dataloader"),
                             ("odenet-simple", "default"), ("odenet-simple", "direct+rk4@1+kinetic")}
    combo = by_lever[("odenet-simple", "direct+rk4@1+kinetic")]
    assert "adjoint=direct" in combo["settings"] and "eval_solver=dopri5" in combo["settings"]
    assert number(combo["FNFE"]) == 4 and number(combo["BNFE"]) == 4  # rk4, one step: 4 evaluations
    for row in levers:
        assert number(row["epoch s"]) > 0 and number(row["x default"]) > 0
    assert number(by_lever[("odenet-simple", "default")]["x default"]) == 1
    assert number(combo["x resnet-small"]) > 0

    sharing = table_after(text, "Trials sharing the machine")
    assert {(r["model"], r["trials at once"]) for r in sharing} == {
        (m, n) for m in ("resnet-small", "odenet-simple") for n in ("1", "2")}
    for row in sharing:
        assert number(row["train img/s summed"]) > 0 and number(row["epoch s per trial"]) > 0
        assert number(row["threads each"]) >= 1
    assert "## How it was measured" in text and "Failed runs" not in text
    assert "VmHWM after clear_refs" in text or "ru_maxrss" in text


def test_levers_parse_to_run_settings():
    lever = parse_lever("direct+rk4@0.5+kinetic+jacobian@0.01")
    assert lever.changes == {"adjoint": "direct", "solver": "rk4", "eval_solver": "dopri5", "step_size": 0.5,
                             "kinetic_energy": 0.1, "jacobian_norm": 0.01}
    assert lever.ode_only and not lever.dataloader and lever.model is None
    loader = parse_lever("resnet-small:dataloader")
    assert loader.dataloader and not loader.ode_only and loader.model == "resnet-small" and loader.changes == {}
    assert parse_lever("seminorm+bosh3").changes == {"adjoint": "seminorm", "solver": "bosh3",
                                                          "eval_solver": "dopri5"}
    for bad, message in [("warp", "unknown atom"), ("dopri5@0.1", "fixed-step"), ("rk4@x", "a number"),
                         ("resnet-small:direct", "has none"), ("direct+", "empty atom")]:
        with pytest.raises(ValueError, match=message):
            parse_lever(bad)


def test_plan_measures_levers_only_where_they_apply():
    cases, sharing = plan(settings.parse(["--levers", "dataloader,direct,odenet-simple:dataloader"]), cores=4)
    keys = [c.key for c in cases]
    assert keys == ["resnet-small/ours", "resnet-small/reference", "odenet-simple/ours", "odenet-simple/reference",
                    "resnet-small/dataloader", "odenet-simple/dataloader", "odenet-simple/direct"]
    assert [(s.model, s.trials, s.threads) for s in sharing] == [
        ("resnet-small", 1, 4), ("resnet-small", 2, 2), ("resnet-small", 4, 1),
        ("odenet-simple", 1, 4), ("odenet-simple", 2, 2), ("odenet-simple", 4, 1)]


def test_gpu_levers_apply_to_every_model_and_join_the_defaults_on_cuda():
    lever = parse_lever("channels_last+bf16+compile")
    assert lever.changes == {"channels_last": True, "block_precision": "bf16", "compile_block": True}
    assert not lever.ode_only
    cases, _ = plan(settings.parse(["--levers", "bf16", "--concurrency", ""]), cores=2)
    assert [c.key for c in cases if c.lever == "bf16"] == ["resnet-small/bf16", "odenet-simple/bf16"]
    on_gpu = settings.parse(["--device", "cuda"])
    assert set(settings.GPU_LEVERS.split(",")) <= set(on_gpu.levers)
    on_cpu = settings.parse(["--device", "cpu"])
    assert not set(settings.GPU_LEVERS.split(",")) & set(on_cpu.levers)


def test_reference_block_solves_with_torchdiffeq_and_counts_the_same_nfe():
    """The reference loop's model is ours with its ODE block swapped for the MNIST example's."""
    import torch

    from odenet import models
    from odenet.config import RunConfig
    from bench.reference import ReferenceODEBlock, use_reference_blocks

    config = RunConfig(width=4)
    torch.manual_seed(0)
    ours = models.build(config)
    reference = models.build(config)
    reference.load_state_dict(ours.state_dict())
    counters = [b.dynamics for b in reference.ode_blocks]
    use_reference_blocks(reference)
    assert not reference.ode_blocks and any(isinstance(m, ReferenceODEBlock) for m in reference.modules())
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(reference(x), ours(x), rtol=1e-4, atol=1e-5)
    assert sum(c.fnfe for c in counters) == ours.fnfe > 0


def test_bad_options_are_named_before_any_work(tmp_path, capsys):
    code = main(["--repeats", "2", "--models", "resnet-tiny", "--levers", "direct+warp",
                 "--out", str(tmp_path / "B.md")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "--repeats 2: expected at least 3" in err
    assert "--models 'resnet-tiny'" in err and "unknown atom 'warp'" in err
    assert not (tmp_path / "B.md").exists()


def test_cpu_and_gpu_runs_share_one_file_each_rewriting_its_own_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    write_section(out, "cpu", "cpu tables, first run")
    write_section(out, "cuda", "gpu tables")
    write_section(out, "cpu", "cpu tables, second run")
    text = out.read_text()
    assert "first run" not in text and text.count("second run") == 1 and text.count("gpu tables") == 1
    assert text.index("second run") < text.index("gpu tables")  # the cpu section stays where it was


def test_a_measurement_that_fails_or_dies_is_reported_as_such_not_lost():
    """A worker's exception comes back as its message; a worker killed before it sends, as its exit."""
    import signal

    from bench.worker import collect, spawn

    failed = collect(spawn(dict(loop="ours", dataloader=False, threads=1, config={"model": "resnet-tiny"})))
    assert failed["epochs"] == [] and failed["error"].startswith("worker failed: ") and "resnet-tiny" in failed["error"]
    running = spawn(dict(loop="ours", dataloader=False, threads=1, config={"model": "resnet-tiny"}))
    os.kill(running.process.pid, signal.SIGKILL)  # at once: before it could send its (failed) result
    assert collect(running) == dict(epochs=[], error=f"worker exited {-signal.SIGKILL} without a result")
