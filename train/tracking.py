"""MLflow run lifecycle: connect, start or resume a run, log params, metrics, plots and the models.

The embedded default is a sqlite store with an artifact folder inside the project, so nothing has
to be started; ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` selects a server instead.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
from loguru import logger
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.models import ModelSignature, infer_signature
from mlflow.types.schema import Array, ColSpec, DataType, Schema, TensorSpec
from numpy.typing import NDArray
from torch import nn

from common.preprocess import PreprocessSpec, to_model_input
from train import onnx_pyfunc
from train.config import ExportConfig, TrackingConfig, resolve_path
from train.onnx_pyfunc import CLASS_NAMES_ARTIFACT, ONNX_ARTIFACT, PREPROCESS_ARTIFACT

MODEL_URI_TAG = "model_uri"
#: The registered model: the ONNX pyfunc (:mod:`train.onnx_pyfunc`).
MODEL_ARTIFACT_NAME = "model"
#: The torch module beside it, for ``evaluate`` and the parity check at ``import``.
TORCH_MODEL_ARTIFACT_NAME = "torch_model"
TORCH_MODEL_URI_TAG = "torch_model_uri"
#: Set instead of an ONNX pyfunc when the model did not export (or failed parity) at fit time.
ONNX_ERROR_TAG = "onnx_export_error"
#: Key of the pyfunc's metadata that holds the torch model's URI.
TORCH_MODEL_KEY = "torch_model"


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


def finished_runs(cfg: TrackingConfig, max_results: int, also: Sequence[str] = ()) -> list[Run]:
    """The configured experiment's finished runs (connecting first), newest first.

    ``also`` names more experiments to search; those that do not exist yet are skipped.
    """
    experiment_ids = [connect(cfg)]
    for name in also:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None and experiment.experiment_id not in experiment_ids:
            experiment_ids.append(experiment.experiment_id)
    runs: list[Run] = mlflow.search_runs(
        experiment_ids=experiment_ids,
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
    images: NDArray[np.uint8],
    torch_version: str,
    export_cfg: ExportConfig,
) -> str:
    """Log the portable ONNX pyfunc (``model``) and the torch module (``torch_model``); the URI.

    ``model`` is what gets registered and served: the ONNX graph exported here (parity-checked
    against torch on ``images``), run by :mod:`train.onnx_pyfunc` without this project or torch.
    ``torch_model`` (pickle: loading it needs this project's ``train`` package) is what
    ``evaluate`` and ``import`` load (:func:`load_torch_model`); ``model``'s metadata names it.

    Args:
        model: The trained classifier (switched to eval mode, on the CPU).
        classes: Class names in logit order.
        spec: The preprocessing spec the model was trained with.
        images: A few example images, ``uint8 [N, H, W, C]`` at the model's size: the input
            example and the fit-time parity batch.
        torch_version: Pinned in the torch model's requirements.
        export_cfg: ONNX opset and parity tolerance.
    """
    from train.export import ExportError, check_parity, export_onnx, file_sha256

    model.eval()
    import torch

    batch = to_model_input(list(images))
    with torch.inference_mode():
        logits = model(torch.from_numpy(batch)).numpy()
    metadata: dict[str, Any] = {"class_names": classes, "preprocess": spec.model_dump(mode="json")}
    torch_info = mlflow.pytorch.log_model(
        pytorch_model=model,
        name=TORCH_MODEL_ARTIFACT_NAME,
        # pickle keeps a plain nn.Module (pt2 loads as an ExportedProgram, no .eval()/ONNX path).
        serialization_format="pickle",
        signature=infer_signature(batch, logits),
        pip_requirements=[f"torch=={torch_version.split('+')[0]}", "timm", "numpy"],
        metadata=metadata,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            onnx_path = export_onnx(model, spec, folder / ONNX_ARTIFACT, export_cfg.opset)
            diff = check_parity(model, onnx_path, batch, export_cfg.parity_atol)
        except ExportError as exc:
            # The trained run is kept: its torch model is registered instead, and `import`
            # (which exports again) says what is wrong with it.
            logger.warning("no ONNX pyfunc, the torch model is the run's model: {}", exc)
            mlflow.set_tags(
                {
                    MODEL_URI_TAG: torch_info.model_uri,
                    TORCH_MODEL_URI_TAG: torch_info.model_uri,
                    ONNX_ERROR_TAG: str(exc)[:500],
                }
            )
            return str(torch_info.model_uri)
        files = {
            ONNX_ARTIFACT: onnx_path,
            CLASS_NAMES_ARTIFACT: _write_json(folder / CLASS_NAMES_ARTIFACT, classes),
            PREPROCESS_ARTIFACT: _write_json(
                folder / PREPROCESS_ARTIFACT, spec.model_dump(mode="json")
            ),
        }
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_NAME,
            python_model=onnx_pyfunc.__file__,  # model from code: no pickle of project classes
            artifacts={key: str(path) for key, path in files.items()},
            signature=pyfunc_signature(spec),
            input_example=images,
            pip_requirements=[
                f"onnxruntime=={ort.__version__}",
                f"mlflow=={mlflow.__version__}",
                "numpy",
                "pandas",
            ],
            metadata={
                **metadata,
                TORCH_MODEL_KEY: torch_info.model_uri,
                "onnx": {
                    "file": ONNX_ARTIFACT,
                    "sha256": file_sha256(onnx_path),
                    "opset": export_cfg.opset,
                    "parity_max_abs_diff": diff,
                    "parity_images": len(images),
                },
            },
        )
        for name in (CLASS_NAMES_ARTIFACT, PREPROCESS_ARTIFACT):
            mlflow.log_artifact(str(files[name]), artifact_path="model_metadata")
    mlflow.set_tags({MODEL_URI_TAG: info.model_uri, TORCH_MODEL_URI_TAG: torch_info.model_uri})
    return str(info.model_uri)


def pyfunc_signature(spec: PreprocessSpec) -> ModelSignature:
    """``uint8 [N, H, W, C]`` images in; label, class id, confidence and scores out."""
    side = spec.image_size
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, side, side, spec.channels))]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.long, "class_id"),
                ColSpec(DataType.double, "confidence"),
                ColSpec(Array(DataType.double), "scores"),
            ]
        ),
    )


def _write_json(path: Path, content: Any) -> Path:
    path.write_text(json.dumps(content, indent=2))
    return path


def load_torch_model(model_uri: str) -> nn.Module:
    """The torch module behind a logged or registered model, on the CPU.

    The model at ``model_uri`` is either this project's ONNX pyfunc (its metadata names the torch
    model logged beside it) or, for runs logged before it, a ``pytorch`` model itself.

    Raises:
        TrackingError: the model is neither (it names no torch model).
        mlflow.exceptions.MlflowException: the URI or the torch model cannot be loaded.
    """
    info = mlflow.models.get_model_info(model_uri)
    if "pytorch" in info.flavors:
        source = model_uri
    else:
        source = str((info.metadata or {}).get(TORCH_MODEL_KEY) or "")
        if not source:
            raise TrackingError(f"{model_uri} names no torch model ({TORCH_MODEL_KEY} metadata)")
    module: nn.Module = mlflow.pytorch.load_model(source, map_location="cpu")
    return module


def download_onnx(model_uri: str, folder: Path) -> Path | None:
    """Download the ONNX graph of an ONNX pyfunc model into ``folder``; None for other models."""
    info = mlflow.models.get_model_info(model_uri)
    artifacts: dict[str, dict[str, str]] = info.flavors.get("python_function", {}).get(
        "artifacts", {}
    )
    if ONNX_ARTIFACT not in artifacts:
        return None
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder))
    return Path(local) / artifacts[ONNX_ARTIFACT]["path"]


def artifact_dir(cfg: TrackingConfig) -> Path:
    """The embedded artifact root (for messages and cleaning up)."""
    return resolve_path(cfg.store_dir) / "artifacts"
