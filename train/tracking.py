"""MLflow run lifecycle: connect, start or resume a run, log params, metrics, plots and the model.

The embedded default is a sqlite store with an artifact folder inside the project, so nothing has
to be started; ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` selects a server instead.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.models import infer_signature
from torch import nn

from common.preprocess import PreprocessSpec
from train.config import TrackingConfig, resolve_path

MODEL_URI_TAG = "model_uri"
MODEL_ARTIFACT_NAME = "model"


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message names the URI."""


def connect(cfg: TrackingConfig) -> str:
    """Point MLflow at the configured store and check it answers. Returns the experiment id.

    Raises:
        TrackingError: a server that does not answer within ``connect_timeout_s``.
    """
    uri = cfg.resolved_uri()
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=cfg.connect_timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(
                        f"tracking server {uri} answered {response.status} on /health"
                    )
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(f"tracking server {uri} is unreachable: {exc}") from exc
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    artifact_location = cfg.artifact_location()
    user_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; left there it would read as the user's
    # choice next time and send a later store's artifacts to ./mlruns.
    if user_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(mlflow.create_experiment(cfg.experiment_name, artifact_location=artifact_location))


def finished_runs(cfg: TrackingConfig, max_results: int) -> list[Run]:
    """The configured experiment's finished runs (connecting first), newest first."""
    experiment_id = connect(cfg)
    runs: list[Run] = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        max_results=max_results,
        output_format="list",
    )
    return runs


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested settings into ``section.key`` -> string, for ``log_params``."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat


def log_json(data: Any, artifact_file: str) -> None:
    """Log a JSON document as a run artifact."""
    mlflow.log_dict(data, artifact_file)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]``."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_report(matrix: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class, plus the macro average."""
    report: dict[str, dict[str, float]] = {}
    for i, name in enumerate(classes):
        tp = float(matrix[i, i])
        predicted = float(matrix[:, i].sum())
        actual = float(matrix[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    report["macro avg"] = {
        key: float(np.mean([report[c][key] for c in classes]))
        for key in ("precision", "recall", "f1")
    } | {"support": float(matrix.sum())}
    return report


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """Save a labelled confusion-matrix heat map."""
    size = max(6.0, 0.6 * len(classes))
    fig = Figure(figsize=(size, size))  # no pyplot: no global backend switch
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if value > threshold else "black",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_misclassified(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    confidences: np.ndarray,
    classes: list[str],
    path: Path,
    limit: int,
) -> Path:
    """Save a grid of the most confidently misclassified images (``images``: ``[N, H, W, C]``)."""
    wrong = np.flatnonzero(labels != predictions)
    wrong = wrong[np.argsort(-confidences[wrong])][:limit]
    cols = 6
    rows = max(1, (len(wrong) + cols - 1) // cols)
    fig = Figure(figsize=(cols * 1.8, rows * 2.0))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong, strict=False):
        img = images[index]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray")
        ax.set_title(
            f"{classes[labels[index]]}\n→ {classes[predictions[index]]} {confidences[index]:.2f}",
            fontsize=7,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def log_figures(paths: list[Path]) -> None:
    """Log image files under ``plots/``."""
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path="plots")


def log_model(
    model: nn.Module,
    classes: list[str],
    spec: PreprocessSpec,
    example: np.ndarray,
    torch_version: str,
) -> str:
    """Log the model (MLflow 3 ``name=`` form) with signature, example and metadata; return its URI."""
    model.eval()
    import torch

    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        pytorch_model=model,
        name=MODEL_ARTIFACT_NAME,
        # pickle keeps a plain nn.Module (pt2 loads as an ExportedProgram, no .eval()/ONNX path);
        # loading needs this project's `train` package, which every consumer here has.
        serialization_format="pickle",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[f"torch=={torch_version.split('+')[0]}", "timm", "numpy"],
        metadata={"class_names": classes, "preprocess": spec.model_dump(mode="json")},
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in (
            ("class_names.json", classes),
            ("preprocess.json", spec.model_dump(mode="json")),
        ):
            file = Path(tmp) / name
            file.write_text(json.dumps(content, indent=2))
            mlflow.log_artifact(str(file), artifact_path="model_metadata")
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return str(info.model_uri)


def artifact_dir(cfg: TrackingConfig) -> Path:
    """The embedded artifact root (for messages and cleaning up)."""
    return resolve_path(cfg.store_dir) / "artifacts"
