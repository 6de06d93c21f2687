"""The service's OpenAPI document: BentoML's, completed with what the upload gate really answers.

BentoML 1.4 builds ``/docs.json`` from the service definition (``bentoml.Service.openapi_spec``)
and gives every API the same fixed responses (200 plus BentoML's own 400, 404 and 500 bodies);
there is no public hook to change them, and it drops the field constraints of multipart inputs
(``minItems`` of ``images``). :func:`api_document` takes BentoML's document as plain JSON and
puts in what the gate (:mod:`serving.gate`) answers: every status with its
:class:`~serving.schema.ErrorBody`, the constraints it enforces, and which statuses can happen
only with auth on. The gate serves the result on ``GET /docs.json`` and
``scripts/export_openapi.py`` writes the same document to ``docs/openapi.json``. No private
BentoML name is used; a BentoML whose document lacks an API's operation fails loudly here
(:class:`OpenAPIShapeError`) and in ``tests/test_openapi_contract.py``.

Operations the gate answers itself (not BentoML APIs) are added in :func:`gate_paths`, and the
pydantic models they need in :data:`GATE_MODELS`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from serving.schema import BatchPredictInput, ErrorBody, ModelInfo, PredictInput

REF = "#/components/schemas/{model}"


class TrafficErrorBody(BaseModel):
    """The JSON body of BentoML's own traffic answers (429 and 504), sent before the gate runs."""

    error: str = Field(description="What happened, in words.")


#: Models whose schemas go into ``components/schemas``.
GATE_MODELS: list[type[BaseModel]] = [ErrorBody, TrafficErrorBody, ModelInfo]

#: The gate's API routes and their input models (the request constraints come from these).
API_INPUTS: dict[str, type[BaseModel]] = {
    "/predict": PredictInput,
    "/batch_predict": BatchPredictInput,
}

#: Every error status of ``/predict`` and ``/batch_predict``: (description, body model).
API_ERRORS: dict[int, tuple[str, type[BaseModel]]] = {
    400: (
        "A malformed request: no file, an empty file, a text value, an unknown field, a "
        "broken multipart body (`kind` says which).",
        ErrorBody,
    ),
    401: ("Missing or wrong API key; only when `auth.enabled` is on.", ErrorBody),
    413: (
        "Too large: the body (`upload_too_large`), the pixels (`too_many_pixels`) or the "
        "number of files (`too_many_images`).",
        ErrorBody,
    ),
    415: (
        "Not an image in a format the service reads (`not_an_image`, `unsupported_format`), or "
        "a body that is not multipart/form-data (`unsupported_media_type`).",
        ErrorBody,
    ),
    422: (
        "Corrupt or truncated image data (`corrupt`), or an image that cannot be converted to "
        "the model's colour mode (`unconvertible`).",
        ErrorBody,
    ),
    429: (
        "More than `max_concurrency` requests in flight; answered by BentoML, retry later.",
        TrafficErrorBody,
    ),
    500: (
        "A fault in the server while running the model (`server_error`); details only in the "
        "server log.",
        ErrorBody,
    ),
    503: ("The adaptive batcher is overloaded (`overloaded`); retry later.", ErrorBody),
    504: ("Not answered within `timeout_s`; answered by BentoML.", TrafficErrorBody),
}

#: The statuses that only an API key check answers (documented where the key is checked).
AUTH_ERRORS = (401,)

#: The media types a file part may declare (the gate reads the format from the bytes, not this).
IMAGE_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/bmp, image/gif, image/tiff"


class OpenAPIShapeError(RuntimeError):
    """BentoML's OpenAPI document is not laid out the way :func:`api_document` completes it."""


def gate_paths() -> dict[str, dict[str, Any]]:
    """Operations the gate answers itself, beyond BentoML's APIs, as OpenAPI path items."""
    return {
        "/model": {
            "get": {
                "summary": "The model being served",
                "description": "Registered model, version, alias, run and BentoML tag of the "
                "model this service loaded (the current import of the configured alias).",
                "operationId": "model",
                "tags": ["Service APIs"],
                "responses": {
                    "200": error_response("What is loaded.", ModelInfo),
                    "401": error_response(API_ERRORS[401][0], ErrorBody),
                    "405": error_response("A method other than GET.", ErrorBody),
                },
            }
        }
    }


def model_schemas(models: Iterable[type[BaseModel]]) -> dict[str, Any]:
    """``components/schemas`` entries for ``models`` (nested models hoisted beside them)."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF, mode="serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def error_response(description: str, model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI response with a JSON body of ``model``."""
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
    }


def _request_schema(request: dict[str, Any], path: str) -> dict[str, Any]:
    try:
        schema: dict[str, Any] = request["content"]["multipart/form-data"]["schema"]
    except KeyError as exc:
        raise OpenAPIShapeError(f"POST {path} has no multipart/form-data request schema") from exc
    return schema


def _complete_request(
    request: dict[str, Any], path: str, model: type[BaseModel], max_images: int
) -> None:
    """What the gate enforces on a request body, which BentoML's document leaves out.

    The body is required (no body is a 415); a field the model does not declare is a 400
    ``unexpected_field``; an empty file is a 400 ``empty``; ``minItems`` (BentoML drops the model's field constraints) and the batch
    limit ``maxItems`` (over it: 413 ``too_many_images``); every part is an image file.
    """
    schema = _request_schema(request, path)
    request["required"] = True
    schema["additionalProperties"] = False
    declared = model.model_json_schema(mode="serialization")["properties"]
    encoding = {}
    for name, prop in schema.get("properties", {}).items():
        for keyword in ("minItems", "maxItems"):
            if keyword in declared.get(name, {}):
                prop[keyword] = declared[name][keyword]
        if prop.get("type") == "array":
            prop["maxItems"] = min(prop.get("maxItems", max_images), max_images)
        file_schema = prop.get("items", prop)
        if file_schema.get("format") == "binary":
            file_schema["minLength"] = 1  # an empty file is a 400 `empty`
        encoding[name] = {"contentType": IMAGE_MEDIA_TYPES}
    request["content"]["multipart/form-data"]["encoding"] = encoding


def api_document(
    bentoml_document: dict[str, Any],
    *,
    max_images: int,
    auth_paths: Iterable[str] = tuple(API_INPUTS),
) -> dict[str, Any]:
    """BentoML's OpenAPI document (plain JSON) completed with the gate's answers.

    Args:
        bentoml_document: ``bentoml.Service.openapi_spec.asdict()`` after a JSON round trip.
        max_images: ``limits.max_images_per_batch`` (``maxItems`` of the file arrays).
        auth_paths: the paths that answer 401 without the API key.

    Raises:
        OpenAPIShapeError: an API's ``POST`` operation or its multipart schema is missing.
    """
    document = copy.deepcopy(bentoml_document)
    paths: dict[str, Any] = document.setdefault("paths", {})
    auth = set(auth_paths)
    for path, model in API_INPUTS.items():
        operation = paths.get(path, {}).get("post")
        if not isinstance(operation, dict) or "200" not in operation.get("responses", {}):
            raise OpenAPIShapeError(f"BentoML's document has no POST {path} with a 200 response")
        _complete_request(operation.get("requestBody", {}), path, model, max_images)
        responses = {"200": operation["responses"]["200"]}
        for status, (description, body) in sorted(API_ERRORS.items()):
            if status not in AUTH_ERRORS or path in auth:
                responses[str(status)] = error_response(description, body)
        operation["responses"] = responses
    for path in sorted(auth - set(API_INPUTS)):
        for operation in paths.get(path, {}).values():
            operation.setdefault("responses", {})["401"] = error_response(
                API_ERRORS[401][0], ErrorBody
            )
    paths.update(gate_paths())
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(model_schemas(GATE_MODELS))
    return document


def service_document(
    service: Any, *, max_images: int, auth_paths: Iterable[str] = tuple(API_INPUTS)
) -> dict[str, Any]:
    """The document of ``service`` (a ``bentoml.Service``), as ``GET /docs.json`` answers it.

    ``service.openapi_spec`` is BentoML's public property; a JSON round trip turns its tuples into
    lists, exactly as the HTTP answer does.
    """
    bentoml_document: dict[str, Any] = json.loads(json.dumps(service.openapi_spec.asdict()))
    return api_document(bentoml_document, max_images=max_images, auth_paths=auth_paths)
