"""End to end on tiny generated data: fit logs everything, resume after kill -9, clear early errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from serving.launch import free_port
from tests.conftest import image_folder_overrides
from train import tracking
from train.config import Settings
from train.data import DataError
from train.device import resolve_placement
from train.engine import CheckpointError
from train.models import Classifier, ModelError
from train.pipeline import latest_checkpoint, run_data, run_evaluate, run_fit, spec_from_metadata
from train.tracking import TrackingError

MakeSettings = Callable[..., Settings]
REPO = Path(__file__).resolve().parent.parent


def test_fit_logs_metrics_artifacts_and_model(make_settings: MakeSettings) -> None:
    settings = make_settings("train.epochs=2")
    outcome = run_fit(settings, run_name="tiny")
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == settings.model.name
    # What train.device auto and train.precision became here (no GPU in the tests' machines is
    # assumed: the device is whatever the resolver says).
    placement = resolve_placement(settings.train.device, settings.train.precision)
    assert run.data.params["train.device"] == "auto"
    assert run.data.params["device"] == str(placement.device)
    assert run.data.params["device_name"] == placement.params()["device_name"]
    assert run.data.params["precision"] == "fp32"
    # Fashion-MNIST trains with flips by default, so auto flip TTA is on.
    assert run.data.params["data.augmentation"] == "flip"
    assert run.data.params["model.flip_tta"] == "auto"
    assert run.data.params["flip_tta"] == "true"
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val_accuracy")] == [1, 2]
    for key in ("train_loss", "lr", "epoch_seconds", "images_per_second", "test_accuracy"):
        assert key in run.data.metrics
    assert run.data.metrics["test_accuracy"] == pytest.approx(outcome.test_accuracy)
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "plots")}
    assert artifacts == {"plots/confusion_matrix.png", "plots/misclassified.png"}
    evaluation = {a.path for a in client.list_artifacts(outcome.run_id, "evaluation")}
    assert "evaluation/per_class_report.json" in evaluation
    assert {a.path for a in client.list_artifacts(outcome.run_id, "data")} == {
        "data/data_stats.json"
    }
    report = mlflow.artifacts.load_dict(f"runs:/{outcome.run_id}/evaluation/per_class_report.json")
    assert set(report) >= {"T-shirt/top", "Ankle boot", "macro avg"}
    classes, spec = spec_from_metadata(mlflow.models.get_model_info(outcome.model_uri).metadata)
    assert len(classes) == 10 and spec.image_size == 28 and spec.channels == 1
    model = tracking.load_torch_model(outcome.model_uri)
    out = model(__import__("torch").zeros(3, 1, 28, 28))
    assert tuple(out.shape) == (3, 10)
    metrics = run_evaluate(settings, outcome.model_uri)
    assert metrics["test_accuracy"] == pytest.approx(outcome.test_accuracy)


def test_fit_on_an_image_folder(make_settings: MakeSettings, image_folder: Path) -> None:
    settings = make_settings(*image_folder_overrides(image_folder))
    outcome = run_fit(settings)
    info = mlflow.models.get_model_info(outcome.model_uri)
    classes, spec = spec_from_metadata(info.metadata)
    assert spec.image_size == 16 and spec.channels == 3
    # An image folder trains without flips by default, hence without flip TTA.
    params = MlflowClient().get_run(outcome.run_id).data.params
    assert (params["data.augmentation"], params["flip_tta"]) == ("none", "false")
    model = tracking.load_torch_model(outcome.model_uri)
    assert isinstance(model, Classifier) and model.flip_tta is False
    assert classes == sorted(classes) and len(classes) >= 2


def test_data_stage_writes_and_logs_statistics(make_settings: MakeSettings) -> None:
    settings = make_settings()
    stats = run_data(settings)
    assert Path(settings.data.stats_path).exists()
    assert stats["sizes"]["train"] + stats["sizes"]["val"] + stats["sizes"]["test"] > 0
    runs = mlflow.search_runs(output_format="list", search_all_experiments=True)
    assert any(r.data.tags.get("stage") == "data" for r in runs)


def test_unreachable_tracking_server_fails_before_training(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match="unreachable"):
        run_fit(settings)
    assert not Path(settings.train.checkpoint_dir).exists()


def test_missing_data_fails_before_any_run(make_settings: MakeSettings, tmp_path: Path) -> None:
    settings = make_settings(f"data.path={tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="nowhere"):
        run_fit(settings)
    assert mlflow.search_runs(output_format="list", search_all_experiments=True) == []


def test_resume_without_checkpoint_or_run_id(make_settings: MakeSettings, tmp_path: Path) -> None:
    settings = make_settings()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        latest_checkpoint(settings)
    import torch

    bare = tmp_path / "bare.pt"
    torch.save(
        {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "rng": {}, "train_state": None},
        bare,
    )
    with pytest.raises(CheckpointError, match="no MLflow run id"):
        run_fit(settings, resume=bare)


def test_metadata_without_spec_is_refused() -> None:
    with pytest.raises(ModelError, match="metadata"):
        spec_from_metadata({"class_names": ["a"]})


def test_kill_9_during_training_then_resume_continues_the_same_run(
    make_settings: MakeSettings,
) -> None:
    """A real ``kill -9`` of ``python -m train fit``; ``--resume`` finishes the same MLflow run."""
    settings = make_settings(
        "model.name=resnet_small",
        "model.width=32",
        "train.epochs=6",
        "train.early_stopping_patience=50",
    )
    overrides = _overrides_of(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_SERVE__")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "train", "fit", *overrides]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint_root = Path(settings.train.checkpoint_dir)
    deadline = time.monotonic() + 240
    while not list(checkpoint_root.glob("*/last.pt")):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = latest_checkpoint(settings)
    run_id = checkpoint.parent.name
    from train.engine import load_checkpoint

    epochs_done = load_checkpoint(checkpoint)["epoch"]
    assert epochs_done < 6
    tracking.connect(settings.tracking)
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"

    result = subprocess.run(
        [*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert run_id in result.stdout
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_after_epoch"] == str(epochs_done)
    steps = [m.step for m in client.get_metric_history(run_id, "val_accuracy")]
    assert sorted(set(steps)) == list(range(1, 7))  # every epoch logged; at most one twice
    assert len(steps) - len(set(steps)) <= 1
    assert len(client.get_metric_history(run_id, "test_accuracy")) == 1
    runs = mlflow.search_runs(output_format="list", search_all_experiments=True)
    assert [r.info.run_id for r in runs if r.data.tags.get("stage") != "data"] == [run_id]


def _overrides_of(settings: Settings) -> list[str]:
    """The settings as CLI overrides, so a subprocess trains on exactly the same config."""
    tree = settings.model_dump(mode="json")
    out = []
    for section in ("data", "model", "train", "tracking"):
        for key, value in tree[section].items():
            if value is None:
                continue
            out.append(f"{section}.{key}={value}")
    return out


def test_overrides_round_trip(make_settings: MakeSettings) -> None:
    from train.config import load_settings

    settings = make_settings("train.epochs=3")
    again = load_settings(overrides=_overrides_of(settings))
    assert again.data == settings.data and again.train == settings.train
    assert np.isclose(again.train.lr, settings.train.lr)


def test_connect_keeps_artifacts_in_the_store_and_the_environment_clean(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    first = make_settings()
    tracking.connect(first.tracking)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = make_settings(f"tracking.store_dir={tmp_path / 'other'}", "tracking.experiment_name=x")
    experiment_id = tracking.connect(second.tracking)
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "other" / "artifacts").as_uri()
    assert mlflow.get_tracking_uri().endswith(f"{tmp_path / 'other'}/mlflow.db")
