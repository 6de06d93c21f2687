"""The benchmark's peer: the service a user would write by hand, FastAPI + uvicorn + eager torch.

Same endpoints and JSON as ``service.py`` (``POST /predict`` with file field ``image``,
``POST /batch_predict`` with repeated ``images``, ``GET /readyz``), the same registered model,
loaded from MLflow (the torch module logged beside the registered ONNX pyfunc,
``train.tracking.load_torch_model``), and the project's own decoding and
preprocessing (``common.preprocess``), so the comparison isolates the serving design: one model
call per request, no adaptive batching, FastAPI's multipart parsing, torch instead of ONNX Runtime.

``bench/suite.py`` starts it with ``python -m bench.peer_serve --workers N`` (uvicorn, see there) and:

- ``FASHION_PEER_MODEL_URI``: e.g. ``models:/fashion-classifier@champion`` (with
  ``MLFLOW_TRACKING_URI`` pointing at the project's store), or
- ``FASHION_PEER_TORCH_FILE`` + ``FASHION_PEER_META`` (a ``torch.save``'d module and a JSON file
  with ``class_names`` and ``preprocess``), used by ``--tiny`` runs that have no registry;
- ``FASHION_PEER_THREADS``: torch threads per worker (the suite passes the service's setting).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, UploadFile

from common import preprocess
from serving.settings import load_serving_settings


def serving_max_pixels(environ: Mapping[str, str] = os.environ) -> int:
    """The service's pixel limit (``limits.max_pixels`` in ``serving.yaml`` and its env override).

    :mod:`serving.settings` imports no BentoML, so the peer stays a plain FastAPI server.
    """
    return load_serving_settings(environ=environ).limits.max_pixels


MAX_PIXELS = serving_max_pixels()


def load() -> tuple[torch.nn.Module, list[str], preprocess.PreprocessSpec]:
    """The model, its class names and preprocessing, from MLflow or from files (``--tiny``)."""
    uri = os.environ.get("FASHION_PEER_MODEL_URI")
    if uri:
        import mlflow

        from train.tracking import load_torch_model

        metadata: dict[str, Any] = mlflow.models.get_model_info(uri).metadata or {}
        model = load_torch_model(uri)
    else:
        model = torch.load(os.environ["FASHION_PEER_TORCH_FILE"], weights_only=False)
        metadata = json.loads(Path(os.environ["FASHION_PEER_META"]).read_text())
    classes = [str(name) for name in metadata["class_names"]]
    return model.eval(), classes, preprocess.PreprocessSpec.model_validate(metadata["preprocess"])


torch.set_num_threads(int(os.environ.get("FASHION_PEER_THREADS", "1")))
MODEL, CLASSES, SPEC = load()
app = FastAPI(title="fashion-serve peer (FastAPI + eager torch)")


def classify(blobs: list[bytes]) -> list[dict[str, Any]]:
    """Decode, preprocess and classify the images in one torch call."""
    try:
        arrays = [
            preprocess.prepare_image(preprocess.decode_image(blob, MAX_PIXELS), SPEC)
            for blob in blobs
        ]
    except preprocess.ImageDecodeError as exc:
        raise HTTPException(status_code=415, detail=str(exc)) from exc
    with torch.inference_mode():
        logits = MODEL(torch.from_numpy(preprocess.to_model_input(arrays))).numpy()
    probabilities = preprocess.softmax(np.asarray(logits, dtype=np.float32))
    answers = []
    for row in probabilities.tolist():
        class_id = int(np.argmax(row))
        answers.append(
            {
                "label": CLASSES[class_id],
                "class_id": class_id,
                "confidence": row[class_id],
                "scores": dict(zip(CLASSES, row, strict=True)),
            }
        )
    return answers


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    """Ready once the module (and so the model) has loaded."""
    return {"status": "ok"}


@app.post("/predict")
async def predict(image: Annotated[UploadFile, File()]) -> dict[str, Any]:
    """Classify one image."""
    return classify([await image.read()])[0]


@app.post("/batch_predict")
async def batch_predict(images: Annotated[list[UploadFile], File()]) -> list[dict[str, Any]]:
    """Classify several images, in order."""
    return classify([await image.read() for image in images])
