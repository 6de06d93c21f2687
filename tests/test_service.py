"""The BentoML service: direct calls, the app in-process, and a real ``bentoml serve`` process.

One tiny model (``resnet_small``, width 4, random weights, 3 classes) is imported into a BentoML
store under a temporary folder. The in-process app and the served process both see test limits
(small uploads, pixels and batches) so that every bad-input class is cheap to send.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest
import torch
from bentoml.exceptions import InvalidArgument
from numpy.typing import NDArray
from starlette.testclient import TestClient

import service
from serving import gate
from serving.balance import RecentClients
from serving.runtime import ModelRuntime
from serving.schema import (
    DECODE_STATUS,
    BadInputError,
    BatchPredictInput,
    PredictInput,
    Prediction,
)
from serving.uploads import Upload
from tests import serving_helpers
from tests.serving_fixtures import JPEG, PNG, bomb_png, expected_scores, image_bytes
from tests.serving_fixtures import bento_home as bento_home
from tests.serving_fixtures import log_files as log_files
from tests.serving_fixtures import restore_logging as restore_logging
from tests.serving_fixtures import svc as svc
from tests.serving_fixtures import tiny_model as tiny_model
from tests.serving_helpers import bentoml_serve, run_ok

ROOT = Path(__file__).resolve().parent.parent
CLASSES = serving_helpers.TINY_CLASSES
SPEC = serving_helpers.TINY_SPEC
LIMITS = {
    "max_upload_bytes": 200_000,
    "max_pixels": 1_000_000,
    "max_images_per_batch": 4,
    "inline_decode_max_bytes": 2_000,
}
#: The bentoml.Service that ``@bentoml.service`` made of the class (mypy sees the plain class).
CLASSIFIER: Any = service.Classifier


# --------------------------------------------------------------------------- images


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inprocess(bento_home: Path) -> Iterator[Any]:
    """The whole BentoML app (middlewares, batching) in this process, with the test limits."""
    with TestClient(CLASSIFIER.to_asgi()) as client:
        runtime: ModelRuntime = bentoml.get_current_service().runtime
        runtime.limits = runtime.limits.model_copy(update=LIMITS)
        yield client


@dataclass
class Served:
    """A running ``bentoml serve`` process."""

    url: str
    log: Path


@pytest.fixture(scope="module")
def served(bento_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``bentoml serve service:Classifier`` on a free port, one worker, test limits."""
    log = tmp_path_factory.mktemp("served") / "server.log"
    env = {
        **os.environ,
        "BENTOML_HOME": str(bento_home),
        "BENTOML_DO_NOT_TRACK": "True",
        "FASHION_SERVE_SERVING__WORKERS": "1",
        **{f"FASHION_SERVE_SERVING__LIMITS__{k.upper()}": str(v) for k, v in LIMITS.items()},
    }
    with bentoml_serve(env, log) as url:
        yield Served(url, log)


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client


class Listener:
    """A loopback TCP listener that records every connection it gets (it must get none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(params=["inprocess", "served"])
def client(request: pytest.FixtureRequest) -> Any:
    """Each HTTP test runs against the in-process app and the served process."""
    return request.getfixturevalue("inprocess" if request.param == "inprocess" else "http")


# --------------------------------------------------------------------------- bad input

BOUNDARY = "testboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass(frozen=True)
class BadCase:
    """A client mistake and the answer it must get."""

    name: str
    endpoint: str
    request: Callable[[Listener], dict[str, Any]]
    status: int
    kind: str


def one(
    field: str, data: bytes, filename: str = "x.png", ctype: str = "image/png"
) -> dict[str, Any]:
    return {"files": [(field, (filename, data, ctype))]}


BAD_CASES = [
    BadCase("empty file", "/predict", lambda _: one("image", b""), 400, "empty"),
    BadCase(
        "random bytes",
        "/predict",
        lambda _: one("image", np.random.default_rng(0).bytes(2048)),
        415,
        "not_an_image",
    ),
    BadCase(
        "truncated png",
        "/predict",
        lambda _: one("image", image_bytes((64, 64))[:2500]),
        422,
        "corrupt",
    ),
    BadCase(
        "unsupported format",
        "/predict",
        lambda _: one("image", image_bytes(fmt="PPM"), "x.ppm"),
        415,
        "unsupported_format",
    ),
    BadCase("wrong field name", "/predict", lambda _: one("file", PNG), 400, "unexpected_field"),
    BadCase(
        "batch field on predict", "/predict", lambda _: one("images", PNG), 400, "unexpected_field"
    ),
    BadCase(
        "missing field",
        "/predict",
        lambda _: {
            "content": f"--{BOUNDARY}--\r\n".encode(),
            "headers": {"content-type": MULTIPART},
        },
        400,
        "missing_field",
    ),
    BadCase(
        "json body",
        "/predict",
        lambda lst: {"json": {"image": f"http://127.0.0.1:{lst.port}/x.png"}},
        415,
        "unsupported_media_type",
    ),
    BadCase(
        "urlencoded body",
        "/batch_predict",
        lambda _: {"data": {"images": "/etc/passwd"}},
        415,
        "unsupported_media_type",
    ),
    BadCase(
        "url in a multipart text field",
        "/predict",
        lambda lst: {
            "content": (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"\r\n\r\n'
                f"http://127.0.0.1:{lst.port}/x.png\r\n--{BOUNDARY}--\r\n"
            ).encode(),
            "headers": {"content-type": MULTIPART},
        },
        400,
        "not_a_file",
    ),
    BadCase(
        "server path in a multipart text field",
        "/batch_predict",
        lambda _: {
            "content": (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"\r\n\r\n'
                f"/etc/passwd\r\n--{BOUNDARY}--\r\n"
            ).encode(),
            "headers": {"content-type": MULTIPART},
        },
        400,
        "not_a_file",
    ),
    BadCase(
        "multipart without boundary",
        "/predict",
        lambda _: {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
        400,
        "malformed_multipart",
    ),
    BadCase(
        "unterminated multipart",
        "/predict",
        lambda _: {
            "content": (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; '
                'filename="x.png"\r\n\r\n'
            ).encode()
            + PNG,
            "headers": {"content-type": MULTIPART},
        },
        400,
        "malformed_multipart",
    ),
    BadCase(
        "garbage multipart",
        "/predict",
        lambda _: {"content": b"not a multipart body", "headers": {"content-type": MULTIPART}},
        400,
        "malformed_multipart",
    ),
    BadCase(
        "two images on predict",
        "/predict",
        lambda _: {"files": [("image", ("a.png", PNG, "image/png"))] * 2},
        400,
        "too_many_images",
    ),
    BadCase(
        "too many images",
        "/batch_predict",
        lambda _: {"files": [("images", ("a.png", PNG, "image/png"))] * 5},
        413,
        "too_many_images",
    ),
    BadCase(
        "too large upload",
        "/batch_predict",
        lambda _: one("images", bytes(250_000)),
        413,
        "upload_too_large",
    ),
    BadCase(
        "decompression bomb", "/predict", lambda _: one("image", bomb_png()), 413, "too_many_pixels"
    ),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.name for c in BAD_CASES])
def test_bad_input_is_a_4xx_naming_the_problem(
    client: Any, listener: Listener, case: BadCase
) -> None:
    request = {k: v for k, v in case.request(listener).items() if v is not None}
    response = client.post(case.endpoint, **request)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert body["kind"] == case.kind
    assert isinstance(body["error"], str) and body["error"]
    assert listener.connections == 0
    # ... and the server keeps serving.
    assert client.post("/predict", **one("image", PNG)).status_code == 200


def test_get_on_an_api_route_is_not_parsed(client: Any) -> None:
    assert client.get("/predict").status_code == 405


# --------------------------------------------------------------------------- predictions


def test_predict_trusts_the_bytes_not_the_name(client: Any, tiny_model: torch.nn.Module) -> None:
    response = client.post("/predict", **one("image", PNG, "photo.jpg", "image/jpeg"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"label", "class_id", "confidence", "scores"}
    expected = expected_scores(tiny_model, [PNG])[0]
    assert body["class_id"] == int(expected.argmax())
    assert body["label"] == CLASSES[body["class_id"]]
    assert body["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert list(body["scores"]) == CLASSES
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_batch_predict_answers_in_request_order(client: Any, tiny_model: torch.nn.Module) -> None:
    images = [image_bytes(seed=s) for s in range(3)] + [JPEG]
    files = [
        ("images", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)
    ]
    response = client.post("/batch_predict", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = expected_scores(tiny_model, images)
    assert [p["class_id"] for p in body] == expected.argmax(axis=1).tolist()
    for prediction, scores in zip(body, expected, strict=True):
        assert list(prediction["scores"].values()) == pytest.approx(scores.tolist(), abs=1e-5)


def test_request_id_is_echoed(client: Any) -> None:
    response = client.post("/predict", headers={"x-request-id": "abc-123"}, **one("image", PNG))
    assert response.headers["x-request-id"] == "abc-123"
    generated = client.post("/predict", headers={"x-request-id": "no spaces!"}, **one("image", PNG))
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])


# --------------------------------------------------------------------------- the gate and the batcher


def test_gate_answers_through_the_batcher_not_bentomls_endpoint(
    inprocess: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate hands the pixels to the API's batcher; BentoML's IO descriptors are not on the path."""

    def not_on_the_path(cls: Any, request: Any, serde: Any) -> Any:
        raise AssertionError("BentoML's endpoint parsed a request the gate had answered")

    for descriptor in (PredictInput, BatchPredictInput):
        monkeypatch.setattr(descriptor, "from_http_request", classmethod(not_on_the_path))
    response = inprocess.post("/predict", **one("image", PNG))
    assert response.status_code == 200, response.text
    batch = inprocess.post("/batch_predict", files=[("images", ("a.png", PNG, "image/png"))] * 2)
    assert batch.status_code == 200, batch.text
    assert [p["class_id"] for p in batch.json()] == [response.json()["class_id"]] * 2


@pytest.mark.parametrize(
    ("raised", "status", "kind", "hidden"),
    [
        (BadInputError(503, "overloaded", "the service is overloaded"), 503, "overloaded", None),
        (RuntimeError("secret /internal/path"), 500, "server_error", "secret"),
        (ValueError("secret state"), 500, "server_error", "secret"),
    ],
)
def test_gate_answers_model_call_failures_as_json(
    inprocess: Any,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    status: int,
    kind: str,
    hidden: str | None,
) -> None:
    async def failing(pixels: NDArray[np.float32], alone: bool = False) -> list[Prediction]:
        raise raised

    runtime: ModelRuntime = bentoml.get_current_service().runtime
    monkeypatch.setitem(runtime.batchers, "predict", failing)
    response = inprocess.post("/predict", **one("image", PNG))
    assert response.status_code == status
    assert response.json()["kind"] == kind
    if hidden is not None:
        assert hidden not in response.text
    monkeypatch.undo()
    assert inprocess.post("/predict", **one("image", PNG)).status_code == 200


def record_alone_hand_overs(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each /predict from now on is handed to the batcher as alone; fresh client counts."""
    current = bentoml.get_current_service()
    runtime: ModelRuntime = current.runtime
    batcher = runtime.batchers["predict"]
    handed: list[bool] = []

    async def spy(pixels: NDArray[np.float32], alone: bool = False) -> list[Prediction]:
        handed.append(alone)
        return await batcher(pixels, alone)

    monkeypatch.setitem(runtime.batchers, "predict", spy)
    monkeypatch.setattr(current, "clients", RecentClients(window_s=60.0))
    return handed


def test_a_request_is_handed_over_alone_only_while_the_worker_has_one_client(
    inprocess: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client connection cannot fill a batch; a second one within the window can."""
    handed = record_alone_hand_overs(monkeypatch)
    assert inprocess.post("/predict", **one("image", PNG)).status_code == 200
    assert inprocess.post("/predict", **one("image", PNG)).status_code == 200  # same client
    bentoml.get_current_service().clients.note(("192.0.2.7", 40000))  # another connection, now
    assert inprocess.post("/predict", **one("image", PNG)).status_code == 200
    assert handed == [True, True, False]


def test_without_a_client_address_a_request_is_never_taken_as_alone(
    inprocess: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Unix socket gives no client address, so its connections cannot be counted."""
    handed = record_alone_hand_overs(monkeypatch)
    app = inprocess.app

    async def without_address(scope: Any, receive: Any, send: Any) -> None:
        await app({**scope, "client": None}, receive, send)

    unix_client = TestClient(without_address)  # the app is already started by `inprocess`
    for _ in range(2):
        assert unix_client.post("/predict", **one("image", PNG)).status_code == 200
    assert handed == [False, False]


# --------------------------------------------------------------------------- served process only


def test_health_docs_and_metrics(served: Served, http: httpx.Client) -> None:
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    spec = http.get("/docs.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    single = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(single["properties"]) == {"label", "class_id", "confidence", "scores"}
    batch = spec["paths"]["/batch_predict"]["post"]["responses"]["200"]["content"]
    assert batch["application/json"]["schema"]["items"]["$ref"].endswith("/Prediction")
    assert set(spec["components"]["schemas"]["Prediction"]["properties"]) == set(
        single["properties"]
    )

    http.post("/predict", **one("image", PNG))
    http.post("/predict", **one("image", b""))
    metrics = http.get("/metrics").text
    for name in (
        "fashion_serve_predictions_total",
        "fashion_serve_confidence_bucket",
        "fashion_serve_decode_seconds_count",
        "fashion_serve_preprocess_seconds_count",
        "fashion_serve_inference_seconds_count",
        "fashion_serve_batch_size_bucket",
    ):
        assert name in metrics
    assert re.search(
        r'fashion_serve_errors_total\{endpoint="/predict",kind="empty"\} [1-9]', metrics
    )


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label set contains ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            sample, _, value = line.rpartition(" ")
            if sample.split("{")[0] == name:
                total += float(value)
    return total


def test_concurrent_predicts_are_batched_without_503(served: Served, http: httpx.Client) -> None:
    before = http.get("/metrics").text
    requests = 64

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=requests)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=limits) as session:
            responses = await asyncio.gather(
                *(session.post("/predict", **one("image", PNG)) for _ in range(requests))
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(burst())
    assert statuses == [200] * requests
    after = http.get("/metrics").text
    images = metric(after, "fashion_serve_batch_size_sum") - metric(
        before, "fashion_serve_batch_size_sum"
    )
    batches = metric(after, "fashion_serve_batch_size_count") - metric(
        before, "fashion_serve_batch_size_count"
    )
    singles = metric(after, "fashion_serve_batch_size_bucket", 'le="1.0"') - metric(
        before, "fashion_serve_batch_size_bucket", 'le="1.0"'
    )
    assert images == requests
    assert batches < requests, "no /predict requests were batched together"
    assert batches - singles >= 1


def test_json_request_log_without_image_bytes(served: Served, http: httpx.Client) -> None:
    http.post("/predict", headers={"x-request-id": "log-check-1"}, **one("image", PNG))
    http.post("/predict", headers={"x-request-id": "log-check-2"}, **one("image", b"\x89PNG junk"))
    deadline = time.monotonic() + 10
    entries: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(entries) < 2:
        for line in served.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and "log-check-" in line:
                entry = json.loads(line)
                entries[entry["request_id"]] = entry
        time.sleep(0.2)
    ok, bad = entries["log-check-1"], entries["log-check-2"]
    assert ok["logger"] == "fashion_serve.request"
    assert ok["endpoint"] == "/predict" and ok["status"] == 200 and ok["images"] == 1
    assert ok["labels"][0] in CLASSES and 0 < ok["confidences"][0] <= 1
    assert ok["latency_ms"] > 0 and ok["error_kind"] is None
    assert bad["status"] == 415 and bad["error_kind"] == "not_an_image"
    assert "IHDR" not in served.log.read_text(errors="replace")


def test_bentoml_clients(served: Served, tmp_path: Path) -> None:
    image = tmp_path / "shirt.png"
    image.write_bytes(PNG)
    with bentoml.SyncHTTPClient(served.url) as sync_client:
        single = sync_client.predict(image=image)
        several = sync_client.batch_predict(images=[image, image])
    assert single["label"] in CLASSES
    assert [p["label"] for p in several] == [single["label"]] * 2

    async def call() -> Any:
        async with bentoml.AsyncHTTPClient(served.url) as async_client:
            return await async_client.predict(image=image)

    assert asyncio.run(call()) == single


# --------------------------------------------------------------------------- direct calls


def test_service_methods_directly(svc: Any, tiny_model: torch.nn.Module) -> None:
    images = [PNG, JPEG, image_bytes((40, 30), "RGBA", seed=2)]
    files = [Upload("images", f"{i}", data) for i, data in enumerate(images)]
    pixels = svc.runtime.prepare(files, "images")
    assert pixels.shape == (3, 1, 28, 28)
    batch = asyncio.run(svc.batch_predict(pixels))
    single = asyncio.run(svc.predict(pixels[:1]))
    assert [p.class_id for p in batch] == expected_scores(tiny_model, images).argmax(
        axis=1
    ).tolist()
    # Compared by content: the private batch start time differs between the two calls.
    assert [p.model_dump() for p in single] == [p.model_dump() for p in batch[:1]]
    assert all(isinstance(p, Prediction) for p in batch)
    assert svc.runtime.class_names == CLASSES


@pytest.mark.parametrize("freeze", [True, False])
def test_worker_freezes_the_heap_after_loading_the_model(
    bento_home: Path, monkeypatch: pytest.MonkeyPatch, freeze: bool
) -> None:
    import gc

    monkeypatch.setattr(
        service, "SETTINGS", service.SETTINGS.model_copy(update={"gc_freeze_after_load": freeze})
    )
    gc.unfreeze()
    try:
        CLASSIFIER()
        assert (gc.get_freeze_count() > 0) is freeze
    finally:
        gc.unfreeze()


def test_input_spec_needs_the_gate() -> None:
    with pytest.raises(InvalidArgument):
        asyncio.run(PredictInput.from_http_request(None, None))


# --------------------------------------------------------------------------- settings and logs


# --------------------------------------------------------------------------- README and build


def readme_blocks(language: str) -> list[str]:
    """The fenced ``language`` blocks of README.md's "Calling it" section."""
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", text.split("### Calling it", 1)[1], maxsplit=1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_readme_examples(served: Served, tmp_path: Path) -> None:
    """Every curl and Python client example in the README runs against a live server."""
    (tmp_path / "shirt.png").write_bytes(PNG)
    (tmp_path / "boot.jpg").write_bytes(JPEG)
    shell, python = readme_blocks("bash"), readme_blocks("python")
    assert len(shell) == 1 and len(python) == 2
    readme_url = "http://127.0.0.1:3000"
    for command in shell[0].strip().splitlines():
        out = subprocess.run(
            ["bash", "-c", command.replace(readme_url, served.url)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        body = json.loads(out)
        labels = [body["label"]] if isinstance(body, dict) else [p["label"] for p in body]
        assert labels and all(label in CLASSES for label in labels)
    for code in python:
        result = run_ok([sys.executable, "-c", code.replace(readme_url, served.url)], cwd=tmp_path)
        assert result.stdout.split()[0] in CLASSES


def test_bentoml_build_packages_the_model_without_torch(bento_home: Path, tmp_path: Path) -> None:
    """``bentoml build`` makes a Bento holding the served model and no torch/MLflow requirement."""
    env = {**os.environ, "BENTOML_HOME": str(bento_home), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml_cli = str(Path(sys.executable).parent / "bentoml")
    built = run_ok(
        [bentoml_cli, "build", "-f", "bentofile.yaml", "--output", "tag", "."], env, timeout=600
    )
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = run_ok([bentoml_cli, "get", tag, "-o", "json"], env)
    bento = json.loads(info.stdout)
    # BentoML 1.4 lists a new-style service's models under its service entry.
    served_models = [m["tag"] for svc in bento["services"] for m in svc["models"]]
    assert [t.split(":")[0] for t in served_models] == ["fashion-classifier"]
    assert (bento_home / "models" / served_models[0].replace(":", "/") / "model.onnx").exists()
    bento_dir = bento_home / "bentos" / tag.replace(":", "/")
    files = {p.relative_to(bento_dir / "src").as_posix() for p in (bento_dir / "src").rglob("*.py")}
    assert {"service.py", "common/preprocess.py", "common/settings.py"} <= files
    assert "train/models.py" not in files
    # The container BentoML generates runs as its own unprivileged user, never as root.
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^USER (\S+)", dockerfile, flags=re.M)[-1] == "bentoml"
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements
    assert "torch" not in requirements and "mlflow" not in requirements


# --------------------------------------------------------------------------- OpenAPI schema


def stable_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without the fields that change with the BentoML version, not with our API."""
    info = {k: v for k, v in schema["info"].items() if k not in {"description", "version"}}
    return {**schema, "info": info}


def test_openapi_file_matches_the_live_service(http: httpx.Client, tmp_path: Path) -> None:
    """``docs/openapi.json`` is what ``make openapi`` writes now, and what the server answers.

    The served process runs with the test limits, which the document states (``maxItems``), so
    it is compared with an export under the same limits.
    """

    def export(name: str, env: dict[str, str]) -> dict[str, Any]:
        exported = tmp_path / name
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "export_openapi.py"),
                "--output",
                str(exported),
            ],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        return stable_schema(json.loads(exported.read_text()))

    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_SERVE_SERVING__")}
    stale = "docs/openapi.json is stale: run make openapi"
    assert export("default.json", clean) == stable_schema(committed), stale
    limits = {f"FASHION_SERVE_SERVING__LIMITS__{k.upper()}": str(v) for k, v in LIMITS.items()}
    live = http.get("/docs.json")
    assert live.status_code == 200
    assert stable_schema(live.json()) == export("served.json", {**clean, **limits})
    assert {"/predict", "/batch_predict", "/model"} <= set(committed["paths"])
    assert committed["info"]["title"] == "Classifier"


def test_api_reference_lists_every_error_kind() -> None:
    """Each (status, kind) the gate can answer has its row in docs/api.md's error table."""
    source = "".join(path.read_text() for path in sorted((ROOT / "serving").glob("*.py")))
    raised = set(re.findall(r'BadInputError\(\s*(\d{3}),\s*"(\w+)"', source))
    raised |= {(str(status), kind) for status, kind in gate.PLAIN_ERRORS.items()}
    decoded = {(str(status), kind) for kind, status in DECODE_STATUS.items()}
    assert len(raised) >= 10 and len(decoded) == 5
    reference = (ROOT / "docs" / "api.md").read_text()
    rows = set(re.findall(r"^\| (\d{3}) \| `(\w+)` \|", reference, flags=re.M))
    assert raised | decoded == rows


# --------------------------------------------------------------------------- monitoring


def test_serving_does_not_import_torch_or_mlflow(bento_home: Path) -> None:
    code = (
        "import sys, service; "
        "assert not {'torch', 'mlflow'} & set(sys.modules), 'torch or mlflow imported'"
    )
    env = {**os.environ, "BENTOML_HOME": str(bento_home)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)


def test_a_busier_worker_asks_the_client_to_reconnect(
    inprocess: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate adds ``Connection: close`` when the balance says this worker has too many."""

    class Crowded:
        def __init__(self, close: bool) -> None:
            self.close = close
            self.clients: list[Any] = []

        def should_close(self, client: Any) -> bool:
            self.clients.append(client)
            return self.close

    current = bentoml.get_current_service()
    for close in (True, False):
        crowded = Crowded(close)
        monkeypatch.setattr(current, "balance", crowded, raising=False)
        response = inprocess.post("/predict", **one("image", PNG))
        assert response.status_code == 200
        assert (response.headers.get("connection") == "close") is close
        assert len(crowded.clients) == 1
