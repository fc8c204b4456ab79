"""Every run's cost columns: the batch size its NFE are means over, its trainable parameters, the
device model and its peak memory, logged to MLflow beside FNFE and BNFE."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from odenet import machine
from odenet.models import build
from odenet.run import execute
from odenet.tracker import MlflowTracker


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    return uri


def test_a_run_logs_its_batch_size_trainable_parameters_device_model_and_peak_memory(tiny, sqlite_store):
    config = tiny(model="odenet-simple", batch_size=32, subset=128, max_epochs=1)
    tracker = MlflowTracker(experiment="costs")
    execute(config, tracker=tracker)
    run = MlflowClient(sqlite_store).get_run(tracker.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["nfe_batch_size"] == 32
    # counted here independently of parameter_counts: every parameter of the model trains
    model = build(config)
    assert metrics["params_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert metrics["params_trainable"] == metrics["params_total"]
    assert metrics["peak_memory_mib"] > 0
    assert tags["device_model"].strip() and tags["device_model"] == machine.cpu_model()
    assert tags["peak_memory_of"] == machine.CPU_PEAK
    assert {"fnfe", "bnfe"} <= set(metrics)

    # the solver re-evaluation at a batch size of its own, named beside its FNFE
    from sweeps.solver_reevaluation import reevaluate_run

    table = reevaluate_run(tracker.run_id, None, 100, batch_size=50)
    metrics = MlflowClient(sqlite_store).get_run(tracker.run_id).data.metrics
    assert metrics["eval_nfe_batch_size"] == 50 and metrics["nfe_batch_size"] == 32
    assert metrics["eval_fnfe_rk4"] == table.set_index("solver").loc["rk4", "fnfe"] == 40  # T_n 1 at step 0.1


def test_a_bad_evaluation_batch_size_is_named_before_anything_starts(capsys, tmp_path, monkeypatch):
    from sweeps.solver_reevaluation import solver_reevaluation
    from sweeps.tuning import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    assert main(solver_reevaluation, ["--experiment", "any", "--eval-batch-size", "0"]) == 2
    assert "--eval-batch-size 0: expected a whole number of images >= 1" in capsys.readouterr().err
    assert not (tmp_path / "never.db").exists()


def test_a_frozen_parameter_is_not_counted_as_trainable(tiny):
    from odenet.models import parameter_counts

    model = build(tiny(model="resnet-small"))
    head = sum(p.numel() for p in model.head.parameters())
    for p in model.head.parameters():
        p.requires_grad_(False)
    counts = parameter_counts(model)
    assert counts["params_trainable"] == counts["params_total"] - head


def test_the_reevaluation_names_the_batch_size_its_fnfe_are_means_over():
    import pandas as pd

    from odenet.summary import reevaluation_metrics

    table = pd.DataFrame([{"solver": "rk4", "accuracy": 0.5, "fnfe": 40.0}])
    assert reevaluation_metrics(table, 128) == {"eval_nfe_batch_size": 128, "eval_acc_rk4": 0.5, "eval_fnfe_rk4": 40.0}
