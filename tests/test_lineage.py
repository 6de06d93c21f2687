"""Which stored model is served (serving.lineage) and ``GET /model`` in the gate, without a server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bentoml
import pytest

from serving.bentoml_bridge import model_store_at
from serving.gate import ApiKeyGuard, UploadGate
from serving.lineage import ServedModelError, choose_served, model_info, served_tag, store_entries
from serving.settings import AuthSettings, load_serving_settings

NAME = "fashion-classifier"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    with model_store_at(tmp_path):
        yield tmp_path


def entry(version: str | None, alias: str | None, **metadata: Any) -> str:
    """A stored entry with lineage labels (no files; the resolver reads labels only)."""
    labels = {"run_id": f"run-{version}"}
    if version is not None:
        labels |= {"registered_model": NAME, "registered_version": version}
    if alias is not None:
        labels["alias"] = alias
    with bentoml.models.create(NAME, labels=labels, metadata=metadata) as model:
        return str(model.tag)


def test_the_newest_import_of_the_alias_is_served_not_the_newest_entry(store: Path) -> None:
    v1 = entry("1", "champion")
    v2 = entry("2", "champion")
    challenger = entry("3", "challenger")  # newest entry of all, another alias
    pinned = entry("4", None)  # an explicit-version import
    entries = store_entries(NAME)
    assert len(entries) == 4
    assert choose_served(entries, NAME, "champion") == v2
    assert choose_served(entries, NAME, "challenger") == challenger
    rollback = entry("1", "champion")  # import after promote --version 1
    assert choose_served(store_entries(NAME), NAME, "champion") == rollback
    assert rollback not in (v1, v2, pinned)


def test_served_tag_reads_the_settings(store: Path) -> None:
    champion = entry("1", "champion")
    challenger = entry("2", "challenger")
    assert served_tag(load_serving_settings(environ={})) == champion
    env = {"FASHION_SERVE_SERVING__MODEL_ALIAS": "challenger"}
    assert served_tag(load_serving_settings(environ=env)) == challenger
    env = {"FASHION_SERVE_SERVING__MODEL_TAG": champion, "FASHION_SERVE_SERVING__MODEL_ALIAS": "x"}
    assert served_tag(load_serving_settings(environ=env)) == champion  # a pin wins


def test_a_labelled_store_without_the_alias_is_an_error(store: Path) -> None:
    entry("1", "challenger")
    with pytest.raises(ServedModelError, match=r"@champion .*found: @challenger.*train import"):
        choose_served(store_entries(NAME), NAME, "champion")


def test_stores_without_alias_labels_serve_the_newest_as_before(store: Path) -> None:
    assert choose_served([], NAME, "champion") == f"{NAME}:latest"
    entry(None, None)
    assert choose_served(store_entries(NAME), NAME, "champion") == f"{NAME}:latest"


def test_model_info_reports_the_lineage(store: Path) -> None:
    tag = entry(
        "2",
        "champion",
        class_names=["a", "b"],
        lineage={"metrics": {"best_val_accuracy": 0.93}, "git_commit": "abc"},
    )
    info = model_info(bentoml.models.get(tag))
    assert (info.registered_model, info.version, info.alias, info.run_id) == (
        NAME,
        "2",
        "champion",
        "run-2",
    )
    assert info.bento_tag == tag
    assert info.metrics == {"best_val_accuracy": 0.93}
    assert info.git_commit == "abc" and info.class_names == ["a", "b"]
    assert info.imported_at.startswith(str(bentoml.models.get(tag).creation_time.year))


# --------------------------------------------------------------------------- GET /model


def call_gate(
    method: str, monkeypatch: pytest.MonkeyPatch, auth: AuthSettings | None = None, **headers: str
) -> tuple[int, dict[str, str], Any]:
    """One request to the gate for ``/model``; (status, headers, JSON body)."""
    info = model_info_stub()
    # The gate reads the running service's lineage (bentoml.get_current_service().lineage).
    monkeypatch.setattr(bentoml, "get_current_service", lambda: SimpleNamespace(lineage=info))
    environ = {"FASHION_SERVE_API_KEY": "k" * 16}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the gate must answer /model itself")

    messages: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "path": "/model",
        "method": method,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }
    upload_gate = UploadGate(app, ApiKeyGuard(auth or AuthSettings(), environ))
    asyncio.run(upload_gate(scope, receive, send))
    start, body = messages
    head = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], head, json.loads(body["body"])


def model_info_stub() -> Any:
    from serving.schema import ModelInfo

    return ModelInfo(
        registered_model=NAME,
        version="1",
        alias="champion",
        run_id="r1",
        bento_tag=f"{NAME}:abc",
        imported_at="2026-01-01T00:00:00+00:00",
    )


def test_get_model_answers_the_loaded_lineage(monkeypatch: pytest.MonkeyPatch) -> None:
    status, headers, body = call_gate("GET", monkeypatch)
    assert status == 200 and headers["content-type"] == "application/json"
    assert {
        k: body[k] for k in ("registered_model", "version", "alias", "run_id", "bento_tag")
    } == {
        "registered_model": NAME,
        "version": "1",
        "alias": "champion",
        "run_id": "r1",
        "bento_tag": f"{NAME}:abc",
    }


def test_other_methods_on_model_are_a_json_405(monkeypatch: pytest.MonkeyPatch) -> None:
    status, headers, body = call_gate("POST", monkeypatch)
    assert status == 405 and headers["allow"] == "GET"
    assert body["kind"] == "method_not_allowed" and "GET" in body["error"]


def test_model_needs_the_api_key_when_auth_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = AuthSettings(enabled=True)
    status, _, body = call_gate("GET", monkeypatch, auth)
    assert (status, body["kind"]) == (401, "unauthorized")
    status, _, body = call_gate("GET", monkeypatch, auth, x_api_key="k" * 16)
    assert status == 200 and body["version"] == "1"
