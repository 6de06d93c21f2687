"""The stages the CLI runs: ``data`` (statistics), ``fit`` (train + evaluate + log) and ``evaluate``.

Each stage validates everything it can (config, data, tracking store, resume checkpoint) before
any training starts, so a mistake costs seconds and leaves MLflow and ``models/`` untouched.
"""

from __future__ import annotations

import contextlib
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from loguru import logger
from mlflow import ActiveRun
from numpy.typing import NDArray

from common.preprocess import PreprocessSpec
from train import tracking
from train.config import Settings, resolve_path
from train.data import (
    AnyBundle,
    Split,
    batch_source,
    data_findings,
    dataset_statistics,
    open_data,
    with_upload_variation,
    write_statistics,
)
from train.device import Placement, resolve_device, resolve_placement
from train.distributed import DistributedContext, process_group
from train.engine import (
    CheckpointError,
    EpochMetrics,
    check_resumable,
    evaluate,
    fit,
    load_checkpoint,
)
from train.models import Classifier, ModelError, build_model, count_parameters, model_size_mb
from train.transforms import AugmentationPreset, get_preset


@dataclass
class FitOutcome:
    """What a finished training run produced."""

    run_id: str
    model_uri: str
    val_accuracy: float
    test_accuracy: float
    epochs: int
    minutes: float


def run_data(settings: Settings) -> dict[str, Any]:
    """Load the data set, write its statistics JSON (with the findings) and log it to MLflow."""
    bundle = open_data(settings.data)
    stats = dataset_statistics(bundle)
    stats["findings"] = data_findings(stats, settings.data)
    path = write_statistics(stats, settings.data.stats_path)
    experiment_id = tracking.connect(settings.tracking)
    with mlflow.start_run(experiment_id=experiment_id, run_name="data-statistics"):
        mlflow.set_tag("stage", "data")
        mlflow.log_artifact(str(path), artifact_path="data")
        mlflow.log_metrics({f"count_{k}": float(v) for k, v in stats["sizes"].items()})
    logger.info("dataset statistics written to {}", path)
    return stats


def _resume_payload(settings: Settings, resume: Path | None) -> dict[str, Any] | None:
    if resume is None:
        return None
    path = resume
    if path.is_dir():
        path = path / "last.pt"
    payload = load_checkpoint(path)
    if "run_id" not in payload:
        raise CheckpointError(f"checkpoint {path} has no MLflow run id; it cannot be resumed")
    return payload


def latest_checkpoint(settings: Settings) -> Path:
    """The most recently written ``last.pt`` under ``train.checkpoint_dir``."""
    root = resolve_path(settings.train.checkpoint_dir)
    candidates = sorted(root.glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no checkpoint to resume under {root}")
    return candidates[-1]


def run_fit(
    settings: Settings, resume: Path | None = None, run_name: str | None = None
) -> FitOutcome:
    """Train the configured model in an MLflow run (or continue one from a checkpoint).

    Under ``torchrun`` every process trains (:func:`train.engine.fit`) and only the main one
    talks to MLflow, evaluates on the test set and writes checkpoints; every process returns
    the main one's outcome.

    Args:
        settings: All settings.
        resume: A checkpoint file or run checkpoint folder to continue from.
        run_name: Optional MLflow run name.
    """
    payload = _resume_payload(settings, resume)
    if payload is not None:
        # The checkpoint's own settings win: a resumed run must be the same run.
        settings = Settings.model_validate(payload["settings"])
    placement = resolve_placement(settings.train.device, settings.train.precision)
    with process_group(placement) as (context, placement):
        if payload is not None:
            check_resumable(payload, context)
        outcome = context.from_main(_fit_in_run(settings, payload, run_name, context, placement))
    if outcome is None:  # the main process always returns one
        raise RuntimeError("the main training process returned no outcome")
    return outcome


def _fit_in_run(
    settings: Settings,
    payload: dict[str, Any] | None,
    run_name: str | None,
    context: DistributedContext,
    placement: Placement,
) -> FitOutcome | None:
    """:func:`run_fit` on one process; ``None`` on all but the main one."""
    experiment_id = tracking.connect(settings.tracking) if context.is_main else ""
    bundle = open_data(settings.data)
    model, preset = model_and_augmentation(settings, bundle)
    torch.set_num_threads(settings.train.num_threads or torch.get_num_threads())
    started = time.perf_counter()
    run_kwargs: dict[str, Any] = (
        {"run_id": payload["run_id"]}
        if payload is not None
        else {"experiment_id": experiment_id, "run_name": run_name}
    )
    # Under a sweep's parent run, a trial is its child.
    run_kwargs["nested"] = mlflow.active_run() is not None
    # Only the main process opens the run: the others must not create runs of their own.
    active: contextlib.AbstractContextManager[ActiveRun | None] = (
        mlflow.start_run(**run_kwargs) if context.is_main else contextlib.nullcontext()
    )
    with active as run:
        run_id = context.from_main(run.info.run_id if run is not None else "")
        checkpoint_dir = resolve_path(settings.train.checkpoint_dir) / run_id
        if context.is_main and payload is None:
            _log_run_start(settings, bundle, model, placement, context)
        elif context.is_main and payload is not None:
            logger.info("resuming run {} after epoch {}", run_id, payload["epoch"])
            mlflow.set_tag("resumed_after_epoch", str(payload["epoch"]))

        def on_epoch_end(metrics: EpochMetrics) -> None:
            mlflow.log_metrics(metrics.as_dict(), step=metrics.epoch)
            logger.info(
                "epoch {}: train_loss={:.4f} val_accuracy={:.4f} ({:.1f}s, {:.0f} img/s)",
                metrics.epoch,
                metrics.train_loss,
                metrics.val_accuracy,
                metrics.epoch_seconds,
                metrics.images_per_second,
            )

        train_cfg = settings.train
        train_split = bundle.train
        if isinstance(train_split, Split):  # a streamed folder's files went through serving's path
            train_split = with_upload_variation(
                train_split, bundle.spec, settings.data, train_cfg.seed
            )
        state = fit(
            model,
            batch_source(train_split, train_cfg.batch_size, settings.data, True, train_cfg.seed),
            batch_source(bundle.val, train_cfg.eval_batch_size, settings.data, False),
            settings.train,
            preset,
            checkpoint_dir,
            extra={
                "run_id": run_id,
                "settings": settings.model_dump(mode="json"),
                "classes": bundle.classes,
                "spec": bundle.spec.model_dump(mode="json"),
            },
            resume_from=payload,
            on_epoch_end=on_epoch_end if context.is_main else None,
            placement=placement,
        )
        if not context.is_main:
            return None
        minutes = (time.perf_counter() - started) / 60.0
        test_accuracy = _log_final_evaluation(settings, bundle, model, placement.device)
        model = model.to("cpu")  # the logged model loads anywhere
        mlflow.log_metrics(
            {
                "best_val_accuracy": state.best_metric,
                "best_epoch": float(state.best_epoch),
                "epochs_trained": float(state.epoch),
                "train_minutes": minutes,
            }
        )
        mlflow.set_tag("stopped_early", str(state.stopped_early))
        model_uri = tracking.log_model(
            model.eval(),
            bundle.classes,
            bundle.spec,
            _example(bundle),
            torch.__version__,
            settings.export,
        )
    logger.info(
        "run {} done: best val_accuracy={:.4f}, test_accuracy={:.4f}, model {}",
        run_id,
        state.best_metric,
        test_accuracy,
        model_uri,
    )
    return FitOutcome(run_id, model_uri, state.best_metric, test_accuracy, state.epoch, minutes)


def model_and_augmentation(
    settings: Settings, bundle: AnyBundle
) -> tuple[Classifier, AugmentationPreset]:
    """The configured model for ``bundle`` and the augmentation preset it trains with.

    ``model.flip_tta: auto`` follows the preset: flip TTA only for a model trained on flips.
    """
    preset = get_preset(settings.data.augmentation)
    model = build_model(
        settings.model, bundle.spec, len(bundle.classes), trained_with_flips=preset.hflip
    )
    return model, preset


def _example(bundle: AnyBundle) -> NDArray[np.uint8]:
    """Two validation images, ``uint8 [N, H, W, C]``: the logged model's input example."""
    return bundle.val.read(np.arange(min(2, len(bundle.val))))


def _log_run_start(
    settings: Settings,
    bundle: AnyBundle,
    model: torch.nn.Module,
    placement: Placement,
    context: DistributedContext,
) -> None:
    mlflow.log_params(tracking.flatten(settings.model_dump(mode="json")))
    mlflow.log_params(
        {
            # What "auto" became on this machine: device, its name, precision, flip TTA.
            **placement.params(),
            # Processes training together (torchrun); train.batch_size is per process.
            "world_size": str(context.world_size),
            "flip_tta": str(bool(getattr(model, "flip_tta", False))).lower(),
            "num_classes": str(len(bundle.classes)),
            "train_size": str(len(bundle.train)),
            "val_size": str(len(bundle.val)),
            "test_size": str(len(bundle.test)),
        }
    )
    mlflow.log_metrics(
        {"parameters": float(count_parameters(model)), "size_mb": model_size_mb(model)}
    )
    mlflow.set_tags(
        {
            "architecture": settings.model.name,
            "data_source": bundle.source,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "torch": torch.__version__,
        }
    )
    tracking.log_json(dataset_statistics(bundle), "data/data_stats.json")
    tracking.log_json(bundle.classes, "model_metadata/class_names.json")


def _log_final_evaluation(
    settings: Settings, bundle: AnyBundle, model: torch.nn.Module, device: torch.device
) -> float:
    """Evaluate on the untouched test set; log metrics, report and plots. Returns test accuracy.

    On the training device, in float32 whatever ``train.precision`` is: the number that is
    logged is the one of the model as exported and served.
    """
    batch_size = settings.train.eval_batch_size
    result = evaluate(
        model,
        batch_source(bundle.test, batch_size, settings.data, False),
        batch_size,
        settings.train.channels_last,
        device=device,
    )
    matrix = tracking.confusion_matrix(bundle.test.labels, result.predictions, len(bundle.classes))
    report = tracking.per_class_report(matrix, bundle.classes)
    mlflow.log_metrics({"test_accuracy": result.accuracy, "test_loss": result.loss})
    mlflow.log_metrics({"test_macro_f1": report["macro avg"]["f1"]})
    tracking.log_json(report, "evaluation/per_class_report.json")
    tracking.log_json(matrix.tolist(), "evaluation/confusion_matrix.json")
    with tempfile.TemporaryDirectory() as tmp:
        confidences = result.probabilities.max(axis=1) if len(result.probabilities) else np.zeros(0)
        # Only the images the grid shows are read: a streamed test split is not in memory.
        labels, predictions = bundle.test.labels, result.predictions
        wrong = np.flatnonzero(labels != predictions)
        shown = wrong[np.argsort(-confidences[wrong])][: settings.train.max_misclassified]
        figures = [
            tracking.plot_confusion_matrix(
                matrix, bundle.classes, Path(tmp) / "confusion_matrix.png"
            ),
            tracking.plot_misclassified(
                bundle.test.read(shown),
                labels[shown],
                predictions[shown],
                confidences[shown],
                bundle.classes,
                Path(tmp) / "misclassified.png",
                settings.train.max_misclassified,
            ),
        ]
        tracking.log_figures(figures)
    return result.accuracy


def run_evaluate(settings: Settings, model_uri: str) -> dict[str, float]:
    """Evaluate a logged or registered model on the configured test set (no logging).

    On ``train.device`` (resolved), in float32.
    """
    device = resolve_device(settings.train.device)
    tracking.connect(settings.tracking)
    bundle = open_data(settings.data)
    model = tracking.load_torch_model(model_uri).to(device)
    batch_size = settings.train.eval_batch_size
    test_data = batch_source(bundle.test, batch_size, settings.data, False)
    result = evaluate(model, test_data, batch_size, device=device)
    return {"test_accuracy": result.accuracy, "test_loss": result.loss}


def spec_from_metadata(metadata: dict[str, Any] | None) -> tuple[list[str], PreprocessSpec]:
    """Class names and preprocessing spec stored with a logged model."""
    if not metadata or "class_names" not in metadata or "preprocess" not in metadata:
        raise ModelError(
            "the model has no class_names/preprocess metadata; was it logged by this project?"
        )
    return list(metadata["class_names"]), PreprocessSpec.model_validate(metadata["preprocess"])
