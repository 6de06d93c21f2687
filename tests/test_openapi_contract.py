"""The OpenAPI document without a server: what :mod:`serving.openapi` adds to BentoML's.

The live document and the fuzzing are in ``tests/test_api_fuzz.py``; these tests fail fast when a
BentoML upgrade changes the document's layout or an edit drops a status or constraint.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from scripts.export_openapi import openapi_schema
from serving.gate import ApiKeyGuard, UploadGate
from serving.openapi import API_ERRORS, OpenAPIShapeError, api_document
from serving.settings import AuthSettings
from tests.serving_helpers import ROOT

ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_schema()


@pytest.mark.parametrize("path", ["/predict", "/batch_predict"])
def test_both_apis_document_every_error_status_with_the_error_body(
    document: dict[str, Any], path: str
) -> None:
    responses = document["paths"][path]["post"]["responses"]
    for status in (400, 401, 413, 415, 422, 500, 503):
        assert responses[str(status)]["content"]["application/json"]["schema"] == ERROR_BODY
    # BentoML's 404 cannot happen on a POST the gate owns.
    assert set(responses) == {"200", *(str(status) for status in API_ERRORS)}
    assert document["components"]["schemas"]["ErrorBody"]["required"] == ["error", "kind"]


def test_the_request_constraints_the_gate_enforces_are_stated(document: dict[str, Any]) -> None:
    for path, field in (("/predict", "image"), ("/batch_predict", "images")):
        body = document["paths"][path]["post"]["requestBody"]
        form = body["content"]["multipart/form-data"]
        assert body["required"] is True
        assert form["schema"]["additionalProperties"] is False
        assert form["encoding"][field]["contentType"].startswith("image/png")
    images = document["paths"]["/batch_predict"]["post"]["requestBody"]["content"][
        "multipart/form-data"
    ]["schema"]["properties"]["images"]
    assert (images["minItems"], images["maxItems"], images["items"]["minLength"]) == (1, 64, 1)


def test_committed_file_is_the_exported_document(document: dict[str, Any]) -> None:
    assert json.loads((ROOT / "docs" / "openapi.json").read_text()) == document


def test_401_is_documented_only_where_the_key_is_checked(document: dict[str, Any]) -> None:
    assert "401" not in document["paths"]["/metrics"]["get"]["responses"]
    bentoml_document = json.loads(json.dumps(document))
    guarded = api_document(
        bentoml_document, max_images=8, auth_paths=["/predict", "/batch_predict", "/metrics"]
    )
    assert guarded["paths"]["/metrics"]["get"]["responses"]["401"]["content"]
    unguarded = api_document(bentoml_document, max_images=8, auth_paths=[])
    assert "401" not in unguarded["paths"]["/predict"]["post"]["responses"]


def test_a_bentoml_document_without_the_apis_fails_loudly(document: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(document))
    del broken["paths"]["/batch_predict"]
    with pytest.raises(OpenAPIShapeError, match="/batch_predict"):
        api_document(broken, max_images=64)
    del broken["paths"]["/predict"]["post"]["requestBody"]
    with pytest.raises(OpenAPIShapeError, match="/predict"):
        api_document(broken, max_images=64)


def test_the_gate_answers_docs_json_with_the_completed_document() -> None:
    async def bentoml_app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("GET /docs.json reached BentoML")

    seen: list[frozenset[str]] = []

    def openapi(auth_paths: frozenset[str]) -> dict[str, Any]:
        seen.append(auth_paths)
        return {"openapi": "3.0.2", "paths": {}}

    gate = UploadGate(bentoml_app, guard=ApiKeyGuard(AuthSettings(), {}), openapi=openapi)
    messages: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        messages.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/docs.json", "headers": []}
    asyncio.run(gate(scope, receive, send))
    asyncio.run(gate(scope, receive, send))
    assert messages[0]["status"] == 200
    assert json.loads(messages[1]["body"]) == {"openapi": "3.0.2", "paths": {}}
    assert seen == [frozenset({"/predict", "/batch_predict", "/model"})]  # built once
