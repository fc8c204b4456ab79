"""The odenet command as a user runs it: a subprocess, real data, embedded MLflow store."""

import os
import subprocess
import sys
from dataclasses import fields

from odenet.config import RunConfig


def odenet(*args, cwd, env=None):
    environment = {**os.environ, **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "odenet.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def test_train_help_documents_every_option(tmp_path):
    out = odenet("train", "--help", cwd=tmp_path).stdout
    for f in fields(RunConfig):
        assert "--" + f.name.replace("_", "-") in out
    assert "--checkpoint-dir" in out and "--resume" in out and "--config" in out


def test_describe_prints_layers_and_parameter_counts(tmp_path):
    result = odenet("describe", "--model", "odenet-simple", "--dataset", "fashion-mnist", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ODEBlock" in result.stdout and "Conv2d(66, 66" in result.stdout
    assert "168,900 in total, 39,530 outside the head" in result.stdout


def test_bad_flags_fail_before_any_work_naming_each(tmp_path):
    result = odenet("train", "--activation-inside", "gelu", "--stride", "3", "--lr", "fast", cwd=tmp_path)
    assert result.returncode == 2
    assert "activation_inside='gelu': expected one of relu, tanh, softplus" in result.stderr
    assert "stride=3: expected one of 1, 2" in result.stderr
    assert "lr='fast': expected a number" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns.db").exists()


def test_a_run_prints_epochs_and_a_summary(tmp_path, real_data_dir):
    result = odenet("train", "--model", "odenet-simple", "--width", "4", "--subset", "256", "--test-subset", "100",
                    "--max-epochs", "2", "--data-dir", str(real_data_dir), "--device", "cpu",
                    "--checkpoint-dir", "ck", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2
    assert all(word in epochs[0] for word in ("train_loss", "val_acc", "fnfe", "bnfe", "time"))
    assert any(line.startswith("test accuracy") for line in lines)
    assert "dopri5_1e-2" in result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlruns.db" in result.stdout
    assert (tmp_path / "ck" / "checkpoint.pt").exists() and (tmp_path / "mlruns.db").exists()

    again = odenet("train", "--checkpoint-dir", "ck", "--data-dir", str(real_data_dir), cwd=tmp_path)
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_a_diverged_run_exits_non_zero_with_its_cause(tmp_path, real_data_dir):
    result = odenet("train", "--model", "odenet-simple", "--width", "4", "--subset", "128", "--rtol", "1e-9",
                    "--atol", "1e-9", "--max-num-steps", "3", "--data-dir", str(real_data_dir), "--device", "cpu",
                    cwd=tmp_path)
    assert result.returncode == 3
    assert "diverged: max_num_steps at epoch 1, batch 1" in result.stderr


def test_a_malformed_config_file_is_named_with_its_line_and_column(tmp_path):
    (tmp_path / "run.yaml").write_text("model: resnet-small\nlr: [1e-3\nseed: 2\n")
    (tmp_path / "run.json").write_text('{"model": "resnet-small",\n "lr": 1e-3,}\n')
    result = odenet("train", "--config", "run.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "run.yaml: not valid YAML at line 3, column 5" in result.stderr
    result = odenet("train", "--config", "run.json", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "run.json: not valid JSON at line 2, column 13" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_with_nothing_to_resume_says_where_it_looked(tmp_path):
    result = odenet("train", "--resume", "--checkpoint-dir", "runs/nothing", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--resume: nothing to resume, no checkpoint.pt in {tmp_path / 'runs' / 'nothing'}" in result.stderr
    result = odenet("train", "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "--resume needs the --checkpoint-dir of the run to continue" in result.stderr
    assert not (tmp_path / "runs").exists()
