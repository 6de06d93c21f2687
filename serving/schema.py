"""The API's data: request and response models, the error body, and what the gate hands the API.

The IO descriptors only *declare* the multipart inputs and JSON outputs for the OpenAPI schema;
the upload gate (:mod:`serving.gate`) parses every request and writes every response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from bentoml.validators import ContentType
from numpy.typing import NDArray
from pydantic import BaseModel, Field, PrivateAttr, TypeAdapter
from starlette.responses import Response

from serving.bentoml_bridge import GateFedInput, JsonArrayOutput, JsonObjectOutput


class Prediction(BaseModel):
    """One image's prediction."""

    label: str = Field(description="The most likely class.")
    class_id: int = Field(description="Index of ``label`` in the model's classes.")
    confidence: float = Field(description="Probability of ``label``.")
    scores: dict[str, float] = Field(description="Probability of every class.")
    # perf_counter() when this prediction's batch reached ONNX Runtime (queue-time metric).
    _batch_started: float = PrivateAttr(default=0.0)


class ErrorBody(BaseModel):
    """The JSON body of every 4xx answer from the upload gate."""

    error: str = Field(description="What is wrong, in words.")
    kind: str = Field(description="A stable code, e.g. too_many_pixels, not_an_image.")


class ModelInfo(BaseModel):
    """``GET /model``: the loaded model and where it came from in the MLflow registry."""

    registered_model: str | None = Field(description="MLflow registered model name.")
    version: str | None = Field(description="Registered model version.")
    alias: str | None = Field(
        description="Registry alias it was imported through (None: an explicit version)."
    )
    run_id: str | None = Field(description="MLflow run that trained it.")
    bento_tag: str = Field(description="The BentoML model that is loaded (name:version).")
    imported_at: str = Field(description="When it was imported into the store (ISO 8601, UTC).")
    git_commit: str | None = Field(None, description="The code's commit at training time.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="The training run's final metrics."
    )
    class_names: list[str] = Field(default_factory=list, description="Output classes, in order.")


class BadInputError(Exception):
    """A client mistake: answered with ``status`` and an :class:`ErrorBody`."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


DECODE_STATUS = {
    "empty": 400,
    "not_an_image": 415,
    "unsupported_format": 415,
    "too_many_pixels": 413,
    "corrupt": 422,
}


@dataclass
class Exchange:
    """One request as the gate parsed it, and what the API answered."""

    request_id: str
    endpoint: str
    pixels: NDArray[np.float32]
    sizes: list[tuple[int, int]]
    predictions: list[Prediction] = field(default_factory=list)
    handed: float = 0.0  # perf_counter() when the gate handed the pixels to the batcher


_PREDICTIONS_JSON = TypeAdapter(list[Prediction])


def prediction_body(predictions: Sequence[Prediction], single: bool) -> bytes:
    """The JSON response: one object for ``/predict``, an array for ``/batch_predict``."""
    if single:
        return predictions[0].__pydantic_serializer__.to_json(predictions[0])
    return _PREDICTIONS_JSON.dump_json(list(predictions))


def _json_response(predictions: Sequence[Prediction], single: bool) -> Response:
    # One complete body: BentoML's streaming response sends an extra empty body message.
    return Response(content=prediction_body(predictions, single), media_type="application/json")


class PredictInput(GateFedInput):
    """``multipart/form-data`` with one image file in field ``image``."""

    image: Annotated[Path, ContentType("image/*")] = Field(
        description="PNG, JPEG, WebP, BMP, GIF or TIFF bytes (format read from the bytes)."
    )


class BatchPredictInput(GateFedInput):
    """``multipart/form-data`` with image files in repeated field ``images``."""

    images: list[Annotated[Path, ContentType("image/*")]] = Field(
        min_length=1, description="Image files; answers come back in this order."
    )


class PredictOutput(JsonObjectOutput, Prediction):
    """The prediction for the one image."""

    @classmethod
    def render(cls, obj: Any) -> Response:
        """The batched result (a list of one) as a single JSON object."""
        return _json_response(obj, single=True)


class BatchPredictOutput(JsonArrayOutput[list[Prediction]]):
    """The predictions, in the order the images were uploaded."""

    @classmethod
    def render(cls, obj: Any) -> Response:
        """The list of predictions as a JSON array."""
        return _json_response(obj, single=False)
