"""The registry's portable model: an MLflow pyfunc that runs the served ONNX graph, no torch.

``train.tracking.log_model`` logs this file as MLflow "model from code": MLflow copies the file
into the model and runs it at load time, so ``mlflow.pyfunc.load_model(uri)`` works anywhere
with ``mlflow``, ``numpy``, ``pandas`` and ``onnxruntime`` installed, without this project. It
therefore imports nothing from this project (``common``, ``train``, ``serving``).

Input: a ``uint8`` array ``[N, H, W, C]`` of images already at the model's size and colour mode
(``preprocess.json``: ``image_size``, ``channels``), e.g. what
``common.preprocess.prepare_image`` returns, stacked. Output: a DataFrame with one row per image:
``label``, ``class_id``, ``confidence`` and ``scores`` (the probabilities in class order), as
``POST /batch_predict`` answers. Scaling and normalisation are inside the graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext

#: Artifact keys of the pyfunc (``context.artifacts``); the logged files keep these names.
ONNX_ARTIFACT = "model.onnx"
PREPROCESS_ARTIFACT = "preprocess.json"
CLASS_NAMES_ARTIFACT = "class_names.json"
#: Graph tensor names; the same as ``common.model_format`` (not imported: this file travels alone).
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

#: A bare ``np.ndarray`` hint tells MLflow to leave validation to the logged tensor signature
#: (a parametrised hint would make it try, and fail, to infer a schema from the hint).
ImageBatch = np.ndarray


class OnnxImageClassifier(PythonModel):
    """Images in, labels and probabilities out, through ONNX Runtime on the CPU."""

    def load_context(self, context: PythonModelContext) -> None:
        """Open the ONNX session and read the class names and preprocessing spec."""
        artifacts: dict[str, str] = context.artifacts
        self.class_names: list[str] = json.loads(Path(artifacts[CLASS_NAMES_ARTIFACT]).read_text())
        self.preprocess: dict[str, Any] = json.loads(
            Path(artifacts[PREPROCESS_ARTIFACT]).read_text()
        )
        self.session = ort.InferenceSession(
            artifacts[ONNX_ARTIFACT], providers=["CPUExecutionProvider"]
        )

    def predict(
        self,
        context: PythonModelContext,
        model_input: ImageBatch,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Classify ``uint8 [N, H, W, C]`` images (see the module docstring).

        Raises:
            ValueError: the batch is not ``[N, image_size, image_size, channels]``.
        """
        images = np.asarray(model_input)
        side, channels = int(self.preprocess["image_size"]), int(self.preprocess["channels"])
        if images.ndim != 4 or images.shape[1:] != (side, side, channels):
            raise ValueError(
                f"expected images of shape [N, {side}, {side}, {channels}], got {images.shape}"
            )
        batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        logits = np.asarray(logits, dtype=np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        class_ids = probabilities.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": [self.class_names[i] for i in class_ids],
                "class_id": class_ids.astype(np.int64),
                "confidence": probabilities.max(axis=1),
                "scores": list(probabilities),
            }
        )


mlflow.models.set_model(OnnxImageClassifier())
