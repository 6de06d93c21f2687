"""The registered model is portable: an ONNX pyfunc that loads and predicts without this project.

A tiny ``fit`` is registered, then ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` runs
in a fresh interpreter whose ``sys.path`` is the standard library and site-packages only (``-I
-S``: no cwd, no ``PYTHONPATH``, no ``.pth`` files, so not even this project's editable install)
and must give the in-repo torch model's labels. Import then serves the registry's ONNX bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import bentoml
import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.model import PythonModelContext

from common.model_format import ONNX_FILE
from common.preprocess import PreprocessSpec, softmax, to_model_input
from serving.bentoml_bridge import model_store_at
from tests.conftest import MakeSettings
from train import export, tracking
from train.config import Settings
from train.data import load_data
from train.export import ExportError, export_onnx, import_champion, onnx_logits
from train.onnx_pyfunc import (
    CLASS_NAMES_ARTIFACT,
    ONNX_ARTIFACT,
    PREPROCESS_ARTIFACT,
    OnnxImageClassifier,
)
from train.pipeline import run_fit
from train.tiny import TINY_CLASSES, tiny_model
from train.tracking import TrackingError

#: Runs in the fresh interpreter: argv = site-packages, model URI, images .npy, output .json.
LOAD_ELSEWHERE = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])
for package in ("train", "common", "serving"):
    assert importlib.util.find_spec(package) is None, package + " is importable"
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[2])
result = model.predict(np.load(sys.argv[3]))
torch_loaded = "torch" in sys.modules
json.dump({"labels": result["label"].tolist(), "torch": torch_loaded}, open(sys.argv[4], "w"))
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_registered_model_loads_anywhere_and_import_serves_its_onnx(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = make_settings("export.parity_batch=8")
    outcome = run_fit(settings)
    name = settings.tracking.registered_model_name
    version = mlflow.register_model(outcome.model_uri, name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    bundle = load_data(settings.data)
    images = bundle.test.images[:12]
    with torch.inference_mode():
        logits = tracking.load_torch_model(outcome.model_uri)(
            torch.from_numpy(to_model_input(list(images)))
        )
    expected = [bundle.classes[i] for i in logits.argmax(dim=1).tolist()]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    np.save(elsewhere / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "COVERAGE"))}
    env["MLFLOW_TRACKING_URI"] = settings.tracking.resolved_uri()
    subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            LOAD_ELSEWHERE,
            sysconfig.get_paths()["purelib"],
            f"models:/{name}/{version}",
            "images.npy",
            "result.json",
        ],
        cwd=elsewhere,
        env=env,
        check=True,
        timeout=300,
    )
    result = json.loads((elsewhere / "result.json").read_text())
    assert result == {"labels": expected, "torch": False}
    # The signature refuses what the model cannot take: model input (float32 NCHW), wrong size.
    pyfunc = mlflow.pyfunc.load_model(outcome.model_uri)
    for wrong in (to_model_input(list(images)), images[:, :20]):
        with pytest.raises(MlflowException, match="Failed to enforce schema"):
            pyfunc.predict(wrong)

    with model_store_at(tmp_path / "bento"):
        tag = import_champion(settings)
        served = Path(bentoml.models.get(tag).path_of(ONNX_FILE))
        stored: dict[str, Any] = dict(bentoml.models.get(tag).info.metadata)
    onnx_metadata = stored["onnx"]
    registry_copy = tracking.download_onnx(f"models:/{name}/{version}", tmp_path / "registry")
    assert registry_copy is not None
    assert sha256(served) == sha256(registry_copy) == onnx_metadata["sha256"]
    assert onnx_metadata["source"] == "registry"
    logged = mlflow.models.get_model_info(outcome.model_uri).metadata or {}
    assert logged["onnx"]["sha256"] == sha256(served)


def register_torch_champion(settings: Settings) -> str:
    """A small ``pytorch``-flavoured model (the earlier format) as ``@champion``; its URI."""
    experiment = tracking.connect(settings.tracking)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3)).eval()
    metadata = {"class_names": ["a", "b", "c"], "preprocess": {}}
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", metadata=metadata
        )
    name = settings.tracking.registered_model_name
    version = mlflow.register_model(info.model_uri, name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    return str(info.model_uri)


def test_a_model_logged_before_the_pyfunc_is_still_evaluated_and_imported(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    """A registered ``pytorch`` model (the earlier format) loads for torch and is exported."""
    settings = make_settings("export.parity_batch=8")
    uri = register_torch_champion(settings)
    assert isinstance(tracking.load_torch_model(uri), torch.nn.Sequential)
    assert tracking.download_onnx(uri, tmp_path) is None
    with model_store_at(tmp_path / "bento"):
        tag = import_champion(settings)
        stored: dict[str, Any] = dict(bentoml.models.get(tag).info.metadata)
    assert stored["onnx"]["source"] == "exported at import"


def test_a_pyfunc_without_a_torch_model_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    info = SimpleNamespace(flavors={"python_function": {}}, metadata={})
    monkeypatch.setattr(mlflow.models, "get_model_info", lambda uri: info)
    with pytest.raises(TrackingError, match="names no torch model"):
        tracking.load_torch_model("models:/elsewhere/1")


def test_the_pyfunc_names_a_wrong_image_shape() -> None:
    model = OnnxImageClassifier()
    model.preprocess = {"image_size": 28, "channels": 1}
    with pytest.raises(ValueError, match=r"\[N, 28, 28, 1\], got \(2, 28, 28\)"):
        model.predict(cast(PythonModelContext, None), np.zeros((2, 28, 28), np.uint8))


def test_the_pyfunc_answers_like_onnx_runtime_on_the_exported_graph(tmp_path: Path) -> None:
    """In-process (the logged copy of the file runs outside coverage): labels, ids, scores."""
    spec = PreprocessSpec()
    onnx_path = export_onnx(tiny_model(), spec, tmp_path / ONNX_ARTIFACT, opset=17)
    (tmp_path / CLASS_NAMES_ARTIFACT).write_text(json.dumps(TINY_CLASSES))
    (tmp_path / PREPROCESS_ARTIFACT).write_text(spec.model_dump_json())
    artifacts = {
        name: str(tmp_path / name)
        for name in (ONNX_ARTIFACT, CLASS_NAMES_ARTIFACT, PREPROCESS_ARTIFACT)
    }
    context = cast(PythonModelContext, SimpleNamespace(artifacts=artifacts))
    model = OnnxImageClassifier()
    model.load_context(context)
    images = np.random.default_rng(3).integers(0, 256, size=(5, 28, 28, 1), dtype=np.uint8)
    result = model.predict(context, images)
    probabilities = softmax(onnx_logits(onnx_path, to_model_input(list(images))))
    ids = probabilities.argmax(axis=1)
    assert result["class_id"].tolist() == ids.tolist()
    assert result["label"].tolist() == [TINY_CLASSES[i] for i in ids]
    np.testing.assert_allclose(np.stack(result["scores"].tolist()), probabilities, atol=1e-6)
    np.testing.assert_allclose(result["confidence"], probabilities.max(axis=1), atol=1e-6)


def test_a_model_that_does_not_export_keeps_its_run_with_the_torch_model(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings()
    experiment = tracking.connect(settings.tracking)

    def refuse(*args: Any, **kwargs: Any) -> Path:
        raise ExportError("ONNX export (opset 17) failed: unsupported operator")

    monkeypatch.setattr(export, "export_onnx", refuse)
    with mlflow.start_run(experiment_id=experiment) as run:
        images = np.zeros((2, 28, 28, 1), np.uint8)
        uri = tracking.log_model(
            tiny_model(), TINY_CLASSES, PreprocessSpec(), images, torch.__version__, settings.export
        )
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert uri == tags[tracking.MODEL_URI_TAG] == tags[tracking.TORCH_MODEL_URI_TAG]
    assert "unsupported operator" in tags[tracking.ONNX_ERROR_TAG]
    assert isinstance(tracking.load_torch_model(uri), torch.nn.Module)


def test_import_names_a_registry_model_it_cannot_load_or_download(
    make_settings: MakeSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings("export.parity_batch=8")
    register_torch_champion(settings)

    def no_torch_model(uri: str) -> torch.nn.Module:
        raise TrackingError(f"{uri} names no torch model (torch_model metadata)")

    def no_download(uri: str, folder: Path) -> Path:
        raise MlflowException("artifact store unreachable")

    with model_store_at(tmp_path / "bento"):
        with monkeypatch.context() as patch:
            patch.setattr(tracking, "load_torch_model", no_torch_model)
            with pytest.raises(ExportError, match=r"cannot load .* names no torch model"):
                import_champion(settings)
        monkeypatch.setattr(tracking, "download_onnx", no_download)
        with pytest.raises(ExportError, match=r"cannot download the ONNX graph .* unreachable"):
            import_champion(settings)
    assert not list((tmp_path / "bento").rglob(ONNX_FILE))  # nothing was imported
