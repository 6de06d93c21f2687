"""Security settings: the optional API key, the request timeout and ``make mlflow``'s binding.

The API key is tested twice: :class:`ApiKeyGuard` and :class:`UploadGate` on
their own (fast), and a real ``bentoml serve`` with ``auth.enabled`` (401 without or with a wrong
key, 200 with it, health open, metrics protected, and the key never in the log). URLs and paths in
text fields are covered by ``tests/test_hostile_inputs.py`` (a loopback listener must see no
request).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pytest

import service
from serving.gate import ApiKeyGuard, UploadGate
from serving.schema import BadInputError
from serving.settings import AuthSettings, ServingConfigError, load_serving_settings
from tests.serving_helpers import (
    ROOT,
    TINY_CLASSES,
    bentoml_serve,
    free_port,
    import_tiny,
    run_ok,
    serve_env,
    tiny_model,
)
from tests.test_hostile_inputs import files, noise, png

KEY_ENV = "FASHION_SERVE_TEST_KEY"


def guard(environ: dict[str, str] | None = None, **auth: Any) -> ApiKeyGuard:
    settings = AuthSettings(**{"enabled": True, "key_env": KEY_ENV, **auth})
    return ApiKeyGuard(settings, environ if environ is not None else {KEY_ENV: "k" * 20})


def refused(check: ApiKeyGuard, path: str, headers: dict[bytes, bytes]) -> bool:
    try:
        check.check(path, headers)
    except BadInputError as exc:
        assert (exc.status, exc.kind) == (401, "unauthorized")
        assert "k" * 20 not in str(exc)
        return True
    return False


# --------------------------------------------------------------------------- the guard alone


def test_auth_is_off_by_default() -> None:
    default = load_serving_settings(ROOT / "configs" / "serving.yaml", environ={})
    assert default.auth.enabled is False
    off = ApiKeyGuard(default.auth, {})
    assert not off.protects("/predict")
    assert not refused(off, "/predict", {})


def test_enabled_auth_needs_a_long_enough_key_and_never_shows_it() -> None:
    with pytest.raises(ServingConfigError, match=KEY_ENV):
        guard({})
    with pytest.raises(ServingConfigError, match="min_key_length") as caught:
        guard({KEY_ENV: "short-secret"})
    assert "short-secret" not in str(caught.value)


def test_the_key_is_checked_on_the_prediction_routes() -> None:
    check = guard()
    key = b"k" * 20
    for path in ("/predict", "/batch_predict"):
        assert refused(check, path, {})
        assert refused(check, path, {b"x-api-key": b"wrong"})
        assert refused(check, path, {b"x-api-key": key + b"x"})
        assert refused(check, path, {b"authorization": b"Basic " + key})
        assert not refused(check, path, {b"x-api-key": key})
        assert not refused(check, path, {b"authorization": b"Bearer " + key})
    assert not refused(check, "/readyz", {})
    assert not refused(check, "/metrics", {})
    assert not refused(check, "/docs.json", {})


def test_health_and_metrics_protection_is_configurable() -> None:
    check = guard(protect_health=True, protect_metrics=True, header="x-token")
    for path in ("/livez", "/readyz", "/healthz", "/metrics"):
        assert refused(check, path, {})
        assert refused(check, path, {b"x-api-key": b"k" * 20})
        assert not refused(check, path, {b"x-token": b"k" * 20})


def test_gate_answers_401_json_on_a_protected_non_api_route() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = UploadGate(app, guard=guard(protect_metrics=True))

    def call(path: str, headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
        asyncio.run(gate(scope, receive, send))
        return sent

    denied = call("/metrics", [])
    assert denied[0]["status"] == 401
    assert b'"kind":"unauthorized"' in denied[1]["body"]
    assert seen == []
    assert call("/metrics", [(b"x-api-key", b"k" * 20)])[0]["status"] == 200
    assert call("/readyz", [])[0]["status"] == 200
    assert seen == ["/metrics", "/readyz"]


def test_request_timeout_and_limits_come_from_the_config() -> None:
    settings = load_serving_settings(ROOT / "configs" / "serving.yaml", environ={})
    config: dict[str, Any] = service.Classifier.config  # type: ignore[attr-defined]
    assert config["traffic"]["timeout"] == settings.timeout_s > 0
    assert config["traffic"]["max_concurrency"] == settings.max_concurrency
    limits = settings.limits
    assert 0 < limits.max_upload_bytes <= 64 * 2**20
    assert 0 < limits.max_pixels <= 100_000_000
    assert 0 < limits.max_images_per_batch <= 256


def test_the_only_model_is_the_configured_one_from_the_bentoml_store() -> None:
    """No endpoint or setting loads a model from elsewhere (a path, a URL, a pickle)."""
    settings = load_serving_settings(ROOT / "configs" / "serving.yaml", environ={})
    models = service.Classifier.models  # type: ignore[attr-defined]
    assert [(type(m).__name__, m.tag.name) for m in models] == [("BentoModel", settings.model_name)]
    routes = set(service.Classifier.apis)  # type: ignore[attr-defined]
    assert routes == {"predict", "batch_predict"}


# --------------------------------------------------------------------------- a served process


@pytest.fixture(scope="module")
def bento_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml")
    import_tiny(tiny_model(), home)
    return home


@pytest.fixture(scope="module")
def api_key() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def secured(
    bento_home: Path, api_key: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """``bentoml serve`` with the API key on, ``/metrics`` protected, health open."""
    env = serve_env(
        bento_home,
        workers=1,
        logging={"level": "DEBUG"},
        access_log=True,
        auth={"enabled": True, "key_env": KEY_ENV, "protect_metrics": True},
    )
    env[KEY_ENV] = api_key
    log = tmp_path_factory.mktemp("secured") / "server.log"
    with bentoml_serve(env, log) as url:
        yield url, log


@pytest.mark.slow
def test_served_api_key(secured: tuple[str, Path], api_key: str) -> None:
    url, log = secured
    image = files("/predict", png(noise((28, 28), "L")))
    wrong = secrets.token_urlsafe(24)
    with httpx.Client(base_url=url, timeout=30) as client:
        for headers in ({}, {"x-api-key": wrong}, {"authorization": f"Bearer {wrong}"}):
            response = client.post("/predict", headers=headers, **image)
            assert response.status_code == 401, response.text
            assert response.json()["kind"] == "unauthorized"
        batch = files("/batch_predict", png(noise((28, 28), "L")))
        assert client.post("/batch_predict", **batch).status_code == 401
        ok = client.post("/predict", headers={"x-api-key": api_key}, **image)
        assert ok.status_code == 200 and ok.json()["label"] in TINY_CLASSES
        bearer = client.post(
            "/batch_predict", headers={"authorization": f"Bearer {api_key}"}, **batch
        )
        assert bearer.status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 401
        metrics = client.get("/metrics", headers={"x-api-key": api_key})
        assert metrics.status_code == 200
        assert re.search(
            r'fashion_serve_errors_total\{endpoint="/predict",kind="unauthorized"\} 3', metrics.text
        )
    image_path = log.parent / "shirt.png"
    image_path.write_bytes(png(noise((28, 28), "L")))
    with bentoml.SyncHTTPClient(url, token=api_key) as sync_client:
        assert sync_client.predict(image=image_path)["label"] in TINY_CLASSES
    time.sleep(1.0)  # let the workers flush their log lines
    text = log.read_text(errors="replace")
    assert '"error_kind": "unauthorized"' in text
    assert api_key not in text and wrong not in text


@pytest.mark.slow
def test_serve_refuses_to_start_without_the_key(bento_home: Path) -> None:
    env = serve_env(bento_home, workers=1, auth={"enabled": True, "key_env": KEY_ENV})
    env.pop(KEY_ENV, None)
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    command = [str(bentoml_cli), "serve", "service:Classifier", "--port", str(free_port())]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert KEY_ENV in result.stdout + result.stderr


# --------------------------------------------------------------------------- mlflow server


def make_mlflow_command(port: int, store: Path) -> list[str]:
    """The ``mlflow server`` command ``make mlflow`` runs (dry run, with our port and store)."""
    printed = run_ok(
        ["make", "-n", "-s", "mlflow", f"MLFLOW_PORT={port}", f"MLFLOW_STORE={store}"], timeout=60
    ).stdout
    joined = printed.replace("\\\n", " ")
    (line,) = [x for x in joined.splitlines() if "mlflow server" in x]
    return shlex.split(line)


@pytest.mark.slow
def test_make_mlflow_binds_loopback_and_refuses_foreign_hosts(tmp_path: Path) -> None:
    port = free_port()
    command = make_mlflow_command(port, tmp_path / "store")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--allowed-hosts" in command
    command[0] = str(Path(sys.executable).parent / "mlflow")
    process = subprocess.Popen(
        [*command, "--workers", "1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "mlflow server exited"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(f"{url}{search}", timeout=10).status_code == 200
        rebinding = httpx.get(f"{url}{search}", headers={"host": "evil.example"}, timeout=10)
        assert rebinding.status_code in (400, 403)
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
