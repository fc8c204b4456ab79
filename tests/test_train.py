"""The training loop: learning, early stopping, exact resume, divergence as a result."""

import pickle

import pytest
import torch

from odenet.failures import Diverged
from odenet.run import execute
from odenet.evaluate import predict
from odenet.train import CHECKPOINT_FILE, fit


def test_a_tiny_run_lowers_the_loss(tiny):
    seen = []
    fit(tiny(max_epochs=3, lr=3e-3), on_epoch=seen.append)
    assert [m.epoch for m in seen] == [1, 2, 3]
    assert seen[-1].train_loss < seen[0].train_loss
    assert seen[-1].val_acc > 0.3  # ten classes: chance is 0.1
    assert all(m.fnfe == 0 and m.bnfe == 0 and m.val_fnfe == 0 for m in seen)
    assert all(m.epoch_time_s > m.val_time_s > 0 for m in seen)


def test_an_odenet_reports_forward_and_backward_nfe(tiny):
    result = fit(tiny(model="odenet-simple", max_epochs=1, subset=128))
    m = result.history[0]
    assert m.fnfe >= 8 and m.bnfe >= 8 and m.val_fnfe >= 8


def test_early_stopping_fires_and_the_best_weights_come_back(tiny):
    # A large learning rate on 160 images overfits fast: validation loss turns up.
    config = tiny(subset=200, lr=0.05, patience=2, max_epochs=40)
    result = fit(config)
    history = result.history
    assert result.stopped_early and len(history) < 40
    best = min(history, key=lambda m: m.val_loss)
    assert result.best_epoch == best.epoch
    assert history[-1].epoch == best.epoch + config.patience
    validation = predict(result.model, result.data.val, config.batch_size)
    assert validation.loss == pytest.approx(best.val_loss, rel=1e-6)
    assert validation.accuracy == pytest.approx(best.val_acc)


def test_a_resumed_run_continues_exactly(tiny, tmp_path, monkeypatch):
    # The Jacobian regulariser's Hutchinson estimate draws from torch's global generator in
    # every batch: a resume that did not restore it would train on other noise.
    config = tiny(model="odenet-simple", subset=128, max_epochs=3, optimizer="sgd", lr=0.05, jacobian_norm=0.5)
    whole = fit(config, checkpoint_dir=tmp_path / "whole")

    def resumed_from_epoch_2(folder):
        fit(config.replace(max_epochs=2), checkpoint_dir=folder)
        epochs = []
        result = fit(config, checkpoint_dir=folder, on_epoch=lambda m: epochs.append(m.epoch))
        assert epochs == [3]
        return result

    resumed = resumed_from_epoch_2(tmp_path / "split")
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    strip = lambda m: {k: v for k, v in m.as_dict().items() if k not in ("epoch_time_s", "val_time_s")}  # noqa: E731
    assert [strip(m) for m in whole.history] == [strip(m) for m in resumed.history]

    # the same resume without restoring the generators does not continue exactly
    monkeypatch.setattr("odenet.train._set_rng_state", lambda state: None)
    unrestored = resumed_from_epoch_2(tmp_path / "unrestored")
    assert not all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                      unrestored.model.state_dict().values()))


def test_checkpoints_keep_what_resuming_needs(tiny, tmp_path):
    fit(tiny(max_epochs=1), checkpoint_dir=tmp_path, checkpoint_metadata={"tracking_run_id": "abc"})
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert {"model", "optimizer", "epoch", "early_stopping", "rng", "history", "config"} <= saved.keys()
    assert saved["metadata"] == {"tracking_run_id": "abc"} and saved["epoch"] == 1


def test_too_many_solver_steps_end_the_run_as_diverged(tiny):
    with pytest.raises(Diverged) as err:
        fit(tiny(model="odenet-simple", rtol=1e-9, atol=1e-9, max_num_steps=3))
    assert err.value.cause == "max_num_steps"
    assert (err.value.epoch, err.value.batch) == (1, 1)
    assert isinstance(err.value.__cause__, AssertionError)


def test_a_non_finite_loss_ends_the_run_as_diverged(tiny):
    with pytest.raises(Diverged) as err:
        fit(tiny(optimizer="sgd", lr=1e30, momentum=0))
    assert err.value.cause == "non_finite_loss"
    assert err.value.epoch == 1 and err.value.batch >= 2


def test_diverged_survives_pickling_for_ray():
    copy = pickle.loads(pickle.dumps(Diverged("underflow", 2, 5, "underflow in dt 0.0")))
    assert (copy.cause, copy.epoch, copy.batch, copy.detail) == ("underflow", 2, 5, "underflow in dt 0.0")


def test_execute_evaluates_and_reevaluates_an_ode_model(tiny):
    outcome = execute(tiny(model="odenet-simple", subset=128, max_epochs=1, reevaluate=True))
    metrics = outcome.final_metrics()
    assert 0 <= metrics["test_acc"] <= 1 and metrics["params_total"] > metrics["params_outside_head"]
    assert set(outcome.reevaluation["solver"]) == {"euler", "rk4", "dopri5_1e-3", "dopri5_1e-2", "dopri5_1e-1"}
    assert metrics["eval_fnfe_euler"] == 10  # T_n = 1 at step 0.1
    assert metrics["eval_fnfe_rk4"] == 40
    assert outcome.report.confusion.sum() == 200
    assert list(outcome.report.per_class.columns) == ["class", "precision", "recall", "f1", "support",
                                                      "average_precision", "roc_auc"]
