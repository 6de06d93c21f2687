"""The BentoML service: direct calls, the app in-process, and a real ``bentoml serve`` process.

One tiny model (``resnet_small``, width 4, random weights, 3 classes) is imported into a BentoML
store under a temporary folder. The in-process app and the served process both see test limits
(small uploads, pixels and batches) so that every bad-input class is cheap to send.
"""

from __future__ import annotations

import asyncio
import io
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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest
import torch
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models.model import ModelStore
from bentoml.exceptions import InternalServerError, InvalidArgument, NotFound, ServiceUnavailable
from loguru import logger
from numpy.typing import NDArray
from PIL import Image
from starlette.testclient import TestClient

import service
from common.preprocess import prepare_image, softmax, to_model_input
from serving import gate, telemetry
from serving import runtime as runtime_module
from serving.gate import UploadGate
from serving.runtime import ModelRuntime, onnx_session_options
from serving.schema import (
    DECODE_STATUS,
    BadInputError,
    BatchPredictInput,
    Exchange,
    PredictInput,
    Prediction,
)
from serving.settings import (
    BatchingSettings,
    LoggingSettings,
    ServingConfigError,
    load_serving_settings,
)
from serving.telemetry import LINES, REQUEST_LOG, PredictionRecorder, configure_logging, flush_logs
from serving.uploads import Upload, parse_multipart, read_body, select_files
from tests import serving_helpers
from tests.serving_helpers import bentoml_serve

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


def image_bytes(
    size: tuple[int, int] = (28, 28), mode: str = "L", fmt: str = "PNG", seed: int = 0
) -> bytes:
    """A noise image of ``size`` (width, height) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A 1200x1000 black PNG: a few kB that decode to more pixels than the test limit."""
    buffer = io.BytesIO()
    Image.new("L", (1200, 1000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


PNG = image_bytes()
JPEG = image_bytes((64, 48), "RGB", "JPEG", seed=1)


def expected_scores(model: torch.nn.Module, images: list[bytes]) -> NDArray[np.float32]:
    """Softmax of the torch model on the same preprocessing, for comparison."""
    arrays = [prepare_image(Image.open(io.BytesIO(data)), SPEC) for data in images]
    with torch.inference_mode():
        logits = model(torch.from_numpy(to_model_input(arrays))).numpy()
    return softmax(logits)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return serving_helpers.tiny_model(seed=0)


@pytest.fixture(scope="module")
def bento_home(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: torch.nn.Module
) -> Iterator[Path]:
    """A BentoML home holding the tiny model, made BentoML's store for this module."""
    home = tmp_path_factory.mktemp("bentoml")
    serving_helpers.import_tiny(tiny_model, home)
    with BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        yield home


@pytest.fixture(scope="module", autouse=True)
def restore_logging() -> Iterator[None]:
    """The service reconfigures logging for the process; put it back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    # Lines still held for the service's files go there now, not to this stderr sink at exit.
    LINES.reset()
    logger.remove()
    logger.add(sys.stderr)


@pytest.fixture(scope="module", autouse=True)
def log_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Service instances made here write their log files below a temporary folder."""
    folder = tmp_path_factory.mktemp("logs")
    original = service.SETTINGS
    logging_settings = original.logging.model_copy(
        update={
            "file": original.logging.file.model_copy(
                update={"path": str(folder / "service.{worker}.jsonl")}
            ),
            "predictions": original.logging.predictions.model_copy(
                update={"path": str(folder / "predictions.{worker}.jsonl")}
            ),
        }
    )
    service.SETTINGS = original.model_copy(update={"logging": logging_settings})
    yield folder
    service.SETTINGS = original


@pytest.fixture(scope="module")
def svc(bento_home: Path) -> Any:
    """A service instance, as BentoML creates one in a worker."""
    return CLASSIFIER()


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


# --------------------------------------------------------------------------- the gate's direct call


def test_gate_calls_the_api_without_bentomls_request_path(
    inprocess: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate answers through BentoML's batcher; the IO descriptors are not on the path."""

    def not_on_the_path(cls: Any, request: Any, serde: Any) -> Any:
        raise AssertionError("BentoML's endpoint parsed a request the gate had answered")

    for descriptor in (PredictInput, BatchPredictInput):
        monkeypatch.setattr(descriptor, "from_http_request", classmethod(not_on_the_path))
    response = inprocess.post("/predict", **one("image", PNG))
    assert response.status_code == 200, response.text
    batch = inprocess.post("/batch_predict", files=[("images", ("a.png", PNG, "image/png"))] * 2)
    assert batch.status_code == 200, batch.text
    assert [p["class_id"] for p in batch.json()] == [response.json()["class_id"]] * 2


def test_gate_falls_back_to_bentomls_endpoint(
    inprocess: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a direct call (another BentoML layout) the full endpoint gives the same answers."""
    direct = inprocess.post("/predict", **one("image", PNG)).json()
    direct_batch = inprocess.post("/batch_predict", files=[("images", ("a", JPEG, "image/jpeg"))])
    monkeypatch.setattr(UploadGate, "api_call", lambda self, scope, endpoint: None)
    fallback = inprocess.post("/predict", **one("image", PNG))
    assert fallback.status_code == 200, fallback.text
    assert fallback.json() == direct
    batch = inprocess.post("/batch_predict", files=[("images", ("a", JPEG, "image/jpeg"))])
    assert batch.json() == direct_batch.json()


@pytest.mark.parametrize(
    ("raised", "status", "kind", "hidden"),
    [
        (ServiceUnavailable("process is overloaded"), 503, "overloaded", None),
        (RuntimeError("secret /internal/path"), 500, "server_error", "secret"),
        (InternalServerError("secret state"), 500, "server_error", "secret"),
        (NotFound("no such thing"), 404, "http_404", None),
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
    async def failing(pixels: NDArray[np.float32]) -> list[Prediction]:
        raise raised

    monkeypatch.setattr(UploadGate, "api_call", lambda self, scope, endpoint: failing)
    response = inprocess.post("/predict", **one("image", PNG))
    assert response.status_code == status
    assert response.json()["kind"] == kind
    if hidden is not None:
        assert hidden not in response.text
    monkeypatch.undo()
    assert inprocess.post("/predict", **one("image", PNG)).status_code == 200


# --------------------------------------------------------------------------- served process only


def test_health_docs_and_metrics(http: httpx.Client) -> None:
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
    assert metric(metrics, "fashion_serve_request_path", 'path="direct"') == 1
    assert metric(metrics, "fashion_serve_request_path", 'path="endpoint"') == 0


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
    bentoml_batches = 'method_name="predict"'
    assert metric(after, "bentoml_service_adaptive_batch_size_sum", bentoml_batches) > metric(
        after, "bentoml_service_adaptive_batch_size_count", bentoml_batches
    )


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


def test_small_batches_run_inline_large_ones_in_a_thread(
    svc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime: ModelRuntime = svc.runtime
    pixels = runtime.blank(3)
    threads: list[str] = []
    real = runtime.logits

    def spy(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        threads.append(threading.current_thread().name)
        return real(batch)

    monkeypatch.setattr(runtime, "logits", spy)
    for inline_max in (3, 2):
        monkeypatch.setattr(runtime, "inline_max", inline_max)
        assert len(asyncio.run(runtime.predict_async(pixels))) == 3
    main = threading.main_thread().name
    assert threads[0] == main and threads[1] != main


def test_torch_backend_matches_onnx(
    svc: Any, tiny_model: torch.nn.Module, bento_home: Path, tmp_path: Path
) -> None:
    module_path = tmp_path / "module.pt"
    torch.save(tiny_model, module_path)
    stored = bentoml.models.get(service.SETTINGS.model_tag)
    settings = service.SETTINGS.model_copy(
        update={"backend": "torch", "torch_model_path": module_path}
    )
    threads = torch.get_num_threads()
    try:
        torch_runtime = ModelRuntime.from_bento_model(stored, settings)
    finally:  # the backend sets torch's thread count for the process; later tests keep theirs
        torch.set_num_threads(threads)
    assert torch_runtime.backend == "torch"
    pixels = to_model_input([prepare_image(Image.open(io.BytesIO(PNG)), SPEC)] * 2)
    onnx_scores = [p.scores for p in svc.runtime.predict(pixels)]
    for got, want in zip(torch_runtime.predict(pixels), onnx_scores, strict=True):
        assert got.scores == pytest.approx(want, abs=1e-5)
    with pytest.raises(ServingConfigError, match="torch_model_path"):
        ModelRuntime.from_bento_model(
            stored, settings.model_copy(update={"torch_model_path": None})
        )


def test_prepare_names_the_file(svc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadInputError, match=r"images\[1\] \(b.png\)") as caught:
        svc.runtime.prepare(
            [Upload("images", "a.png", PNG), Upload("images", "b.png", b"xx")],
            "images",
        )
    assert caught.value.status == 415

    def cannot_convert(*args: Any) -> None:
        raise ValueError("odd mode")

    monkeypatch.setattr(runtime_module, "prepare_image", cannot_convert)
    with pytest.raises(BadInputError, match="cannot convert") as caught:
        svc.runtime.prepare([Upload("image", None, PNG)], "image")
    assert (caught.value.status, caught.value.kind) == (422, "unconvertible")


def test_input_spec_needs_the_gate() -> None:
    with pytest.raises(InvalidArgument):
        asyncio.run(PredictInput.from_http_request(None, None))


def test_read_body_limits() -> None:
    def receiver(*messages: dict[str, Any]) -> Callable[[], Any]:
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        return receive

    chunk = {"type": "http.request", "body": b"12345", "more_body": True}
    last = {"type": "http.request", "body": b"6", "more_body": False}
    assert asyncio.run(read_body(receiver(chunk, last), {}, 6)) == b"123456"
    cases = [
        (receiver(chunk, chunk), {}, "upload_too_large"),
        (receiver(), {b"content-length": b"99"}, "upload_too_large"),
        (receiver(), {b"content-length": b"-1"}, "bad_content_length"),
        (receiver({"type": "http.disconnect"}), {}, "incomplete_body"),
    ]
    for receive, headers, kind in cases:
        with pytest.raises(BadInputError) as caught:
            asyncio.run(read_body(receive, headers, 6))
        assert caught.value.kind == kind


def test_multipart_parts_keep_names_and_filenames() -> None:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\nAAA\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename=""\r\n\r\n'
        f"\r\n--{BOUNDARY}--\r\n"
    ).encode()
    parts = parse_multipart(body, MULTIPART, "images")
    assert parts == [
        Upload("images", "a.png", b"AAA"),
        Upload("images", "", b""),
    ]
    assert select_files(parts, "images", single=False, max_images=2) == parts


# --------------------------------------------------------------------------- settings and logs


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "2"),  # configs/serving.yaml's malloc_arena_max
        ({"FASHION_SERVE_SERVING__MALLOC_ARENA_MAX": "null"}, "unset"),
        ({"MALLOC_ARENA_MAX": "4"}, "4"),  # an explicit environment wins
    ],
)
def test_malloc_arena_cap_reaches_the_worker_environment(
    environ: dict[str, str], expected: str
) -> None:
    """Importing the service (what `bentoml serve` does before spawning workers) sets the cap."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    code = "import os, service; print(os.environ.get('MALLOC_ARENA_MAX', 'unset'))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, **environ},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == expected


def test_settings_file_and_env_overrides(tmp_path: Path) -> None:
    default = load_serving_settings(ROOT / "configs" / "serving.yaml", environ={})
    assert default.model_tag == "fashion-classifier:latest"
    env = {
        "FASHION_SERVE_SERVING__PREDICT__MAX_BATCH_SIZE": "8",
        "FASHION_SERVE_SERVING__MODEL_TAG": "other:v1",
        "UNRELATED": "x",
    }
    custom = load_serving_settings(ROOT / "configs" / "serving.yaml", environ=env)
    assert (custom.predict.max_batch_size, custom.model_tag) == (8, "other:v1")
    assert custom.batch_predict == default.batch_predict

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1")
    problems: list[tuple[Path, dict[str, str], str]] = [
        (tmp_path / "missing.yaml", {}, "not found"),
        (bad_yaml, {}, "not valid YAML"),
        (not_mapping, {}, "must hold a mapping"),
        (ROOT / "configs" / "serving.yaml", {"FASHION_SERVE_SERVING__WORKERS": "0"}, "workers"),
        (ROOT / "configs" / "serving.yaml", {"FASHION_SERVE_SERVING__NOPE": "1"}, "nope"),
        (
            ROOT / "configs" / "serving.yaml",
            {"FASHION_SERVE_SERVING__WORKERS__X": "1"},
            "not a section",
        ),
        (ROOT / "configs" / "serving.yaml", {"FASHION_SERVE_SERVING__WORKERS": "[1"}, "YAML"),
    ]
    for path, environ, message in problems:
        with pytest.raises(ServingConfigError, match=message):
            load_serving_settings(path, environ=environ)


def test_onnx_memory_pattern_is_off_unless_configured() -> None:
    """Per-shape memory plans grow with every new batch size; the default turns them off."""
    config = ROOT / "configs" / "serving.yaml"
    default = load_serving_settings(config, environ={})
    assert onnx_session_options(default).enable_mem_pattern is False
    assert default.onnx_intra_op_threads == onnx_session_options(default).intra_op_num_threads
    turned_on = load_serving_settings(
        config, environ={"FASHION_SERVE_SERVING__ONNX_MEMORY_PATTERN": "true"}
    )
    assert onnx_session_options(turned_on).enable_mem_pattern is True


def test_config_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "serving.yaml").write_text("model_tag: elsewhere:1\n")
    monkeypatch.setenv("FASHION_SERVE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ServingConfigError, match=str(tmp_path / "serving.yaml")):
        load_serving_settings()


def test_stdlib_logging_becomes_json(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    configure_logging(
        service.SETTINGS.logging.model_copy(
            update={
                "level": "INFO",
                "stream": "stderr",
                "file": service.SETTINGS.logging.file.model_copy(update={"enabled": False}),
            }
        )
    )
    logging.getLogger("bentoml.serve").info("hello %s", "world")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("bentoml").exception("failed")
    logging.getLogger("bentoml").setLevel(1)
    logging.getLogger("bentoml").log(5, "a level loguru does not know")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    hello = next(entry for entry in lines if entry["message"] == "hello world")
    assert hello["logger"] == "bentoml.serve" and hello["level"] == "INFO"
    failed = next(entry for entry in lines if entry["message"] == "failed")
    assert "boom" in failed["exception"]


# --------------------------------------------------------------------------- README and build


def readme_blocks(language: str) -> list[str]:
    """The fenced ``language`` blocks of README.md's "Calling it" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Calling it", 1)[1].split("\n### ", 1)[0]
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
        result = subprocess.run(
            [sys.executable, "-c", code.replace(readme_url, served.url)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split()[0] in CLASSES


def test_bentoml_build_packages_the_model_without_torch(bento_home: Path, tmp_path: Path) -> None:
    """``bentoml build`` makes a Bento holding the served model and no torch/MLflow requirement."""
    env = {**os.environ, "BENTOML_HOME": str(bento_home), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml_cli = str(Path(sys.executable).parent / "bentoml")
    built = subprocess.run(
        [bentoml_cli, "build", "-f", "bentofile.yaml", "--output", "tag", "."],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run(
        [bentoml_cli, "get", tag, "-o", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
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
    """``docs/openapi.json`` is what ``make openapi`` writes now, and what the server answers."""
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    exported = tmp_path / "openapi.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_openapi.py"), "--output", str(exported)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    stale = "docs/openapi.json is stale: run make openapi"
    assert stable_schema(json.loads(exported.read_text())) == stable_schema(committed), stale
    live = http.get("/docs.json")
    assert live.status_code == 200
    assert stable_schema(live.json()) == stable_schema(committed), stale
    assert {"/predict", "/batch_predict"} <= set(committed["paths"])
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


def test_prediction_data_and_drift_gauge(svc: Any, log_files: Path) -> None:
    """Each image gets a prediction-data line; a shifted window moves the PSI gauge."""
    import prometheus_client

    from common.drift import DriftMonitor, build_reference

    runtime: ModelRuntime = svc.runtime
    recorder: PredictionRecorder = svc.recorder
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 30, size=(300, 1, 28, 28)).astype(np.float32)
    probabilities = np.array([list(p.scores.values()) for p in runtime.predict(dark)])
    reference = build_reference(
        probabilities, np.zeros(300, dtype=np.int64), dark, CLASSES, {"28x28": 300}, "dark", 300
    )
    uploads = [Upload("images", f"{i}.png", image_bytes(seed=i)) for i in range(8)]
    sizes: list[tuple[int, int]] = []
    pixels = runtime.prepare(uploads, "images", sizes)
    assert sizes == [(28, 28)] * 8

    def send(request_id: str, handed_after_batch: bool = False) -> float | None:
        exchange = Exchange(request_id, "/batch_predict", pixels, sizes)
        exchange.predictions = runtime.predict(pixels)
        exchange.handed = exchange.predictions[0]._batch_started + (1 if handed_after_batch else 0)
        queued = recorder.record(exchange)
        return queued

    recorder.drift = DriftMonitor(reference, service.ALERTS.drift)
    try:
        for i in range(service.ALERTS.rules.drift.min_predictions // 8 + 1):
            send(f"drift-{i}")
        recorder.drift, recorder.prediction_data = None, False
        assert send("unrecorded") == 0.0
        assert send("unrecorded", handed_after_batch=True) is None  # not a real queue time
    finally:
        recorder.drift, recorder.prediction_data = None, True
    brightness_psi = prometheus_client.REGISTRY.get_sample_value(
        "fashion_serve_drift_psi", {"feature": "brightness"}
    )
    assert brightness_psi is not None
    assert brightness_psi > service.ALERTS.rules.drift.psi_threshold
    flush_logs()  # the file sinks get their lines in batches
    lines = [
        json.loads(line)
        for path in log_files.glob("predictions.*.jsonl")
        for line in path.read_text().splitlines()
    ]
    first = [entry for entry in lines if entry["request_id"] == "drift-0"]
    assert len(first) == 8
    assert {(e["width"], e["height"]) for e in first} == {(28, 28)}
    assert all(0.3 < e["brightness"] < 0.7 and 0 <= e["margin"] <= 1 for e in first)
    assert not any(entry["request_id"] == "unrecorded" for entry in lines)


def _file_logging(
    folder: Path, flush_interval_s: float, rotation: str = "100 MB"
) -> LoggingSettings:
    """The service's logging settings with the request log (only) in ``folder``."""
    logging_settings = service.SETTINGS.logging
    return logging_settings.model_copy(
        update={
            "stream": "stdout",
            "file": logging_settings.file.model_copy(
                update={
                    "path": str(folder / "service.{worker}.jsonl"),
                    "rotation": rotation,
                    "flush_interval_s": flush_interval_s,
                }
            ),
            "predictions": logging_settings.predictions.model_copy(update={"enabled": False}),
        }
    )


@pytest.mark.parametrize("flush_interval_s", [0.0, 600.0])
def test_log_files_rotate_and_are_read_back_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flush_interval_s: float
) -> None:
    """Rotation splits the worker's file (per line, or per batch); readers glob every piece."""
    from train.monitoring import expand, request_entries

    settings = _file_logging(tmp_path, flush_interval_s, rotation="2 KB")
    configure_logging(settings, worker="worker-7")
    for i in range(40):
        logger.bind(logger="fashion_serve.request", request_id=f"rot-{i}", status=200).info("x")
        if i % 8 == 7:
            flush_logs()  # a batch per 8 lines when batched; a no-op line by line
    files = expand([settings.file.pattern()])
    assert len(files) > 2 and all(f.name.startswith("service.worker-7.") for f in files)
    ids = sorted(int(e["request_id"].split("-")[1]) for e in request_entries(files))
    assert ids == list(range(40))
    streamed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["request_id"] for e in streamed] == [f"rot-{i}" for i in range(40)]


def test_batched_log_lines_reach_the_file_from_the_writer_thread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The request only keeps its line; the writer thread appends it within the interval."""
    settings = _file_logging(tmp_path, flush_interval_s=0.05)
    configure_logging(settings, worker="worker-3")
    path = settings.file.for_worker("worker-3")
    logger.bind(logger="fashion_serve.request", request_id="batched-1", status=200).info("x")
    assert "batched-1" in capsys.readouterr().out  # the stream is written at once
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "batched-1" not in (
        path.read_text() if path.exists() else ""
    ):
        time.sleep(0.01)
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == [
        "batched-1"
    ]
    # Reconfiguring (a new worker setup) writes what is still held before the sinks change.
    logger.bind(logger="fashion_serve.request", request_id="batched-2", status=200).info("x")
    configure_logging(_file_logging(tmp_path, flush_interval_s=0.0), worker="worker-4")
    assert "batched-2" in path.read_text()


REQUEST_FIELDS: dict[str, Any] = {
    "request_id": "rl-1",
    "endpoint": "/predict",
    "status": 200,
    "latency_ms": 1.5,
    "queue_ms": None,
    "images": 1,
    "labels": ["Bag"],
    "confidences": [0.9],
    "error_kind": None,
}


def test_request_log_line_is_the_same_direct_and_through_loguru(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batched file sends the gate's line past loguru; a line-by-line file through it; same line."""
    lines: dict[float, tuple[str, str]] = {}
    for interval in (600.0, 0.0):
        settings = _file_logging(tmp_path / str(interval), flush_interval_s=interval)
        configure_logging(settings, worker="worker-9")
        assert REQUEST_LOG.direct is (interval > 0)
        REQUEST_LOG.write("/predict 200 ok", dict(REQUEST_FIELDS))
        flush_logs()
        streamed = capsys.readouterr().out.strip()
        lines[interval] = (streamed, settings.file.for_worker("worker-9").read_text().strip())
    (direct, direct_file), (through, through_file) = lines[600.0], lines[0.0]
    assert direct == direct_file and through == through_file
    as_logged = [json.loads(line) for line in (direct, through)]
    times = [datetime.fromisoformat(entry.pop("time")) for entry in as_logged]
    assert all(t.tzinfo is not None for t in times) and abs(times[0] - times[1]) < timedelta(1)
    assert list(as_logged[0]) == list(as_logged[1])  # same keys, same order
    assert as_logged[0] == as_logged[1]
    assert as_logged[0]["logger"] == "fashion_serve.request" and as_logged[0]["level"] == "INFO"


def test_request_log_direct_obeys_level_and_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Above INFO nothing is written; with stream none only the file gets the line."""
    quiet = _file_logging(tmp_path / "quiet", 600.0).model_copy(update={"level": "WARNING"})
    configure_logging(quiet, worker="worker-9")
    REQUEST_LOG.write("/predict 200 ok", dict(REQUEST_FIELDS))
    flush_logs()
    assert capsys.readouterr().out == ""
    quiet_file = quiet.file.for_worker("worker-9")  # loguru creates it when the sink is added
    assert not quiet_file.exists() or quiet_file.read_text() == ""
    silent = _file_logging(tmp_path / "silent", 600.0).model_copy(update={"stream": "none"})
    configure_logging(silent, worker="worker-9")
    REQUEST_LOG.write("/predict 200 ok", dict(REQUEST_FIELDS))
    flush_logs()
    assert capsys.readouterr().out == ""
    written = silent.file.for_worker("worker-9").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in written] == ["rl-1"]


@pytest.mark.parametrize("flush_interval_s", [0.0, 600.0])
def test_prediction_data_lines_by_line_and_batched(
    svc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_interval_s: float
) -> None:
    """Batched prediction data skips loguru (LineBatcher.add); line by line goes through it."""
    logging_settings = service.SETTINGS.logging
    settings = logging_settings.model_copy(
        update={
            "stream": "none",
            "file": logging_settings.file.model_copy(update={"enabled": False}),
            "predictions": logging_settings.predictions.model_copy(
                update={
                    "path": str(tmp_path / "predictions.{worker}.jsonl"),
                    "flush_interval_s": flush_interval_s,
                }
            ),
        }
    )
    configure_logging(settings, worker="worker-5")
    runtime: ModelRuntime = svc.runtime
    pixels = runtime.blank(2)
    exchange = Exchange("pd-1", "/batch_predict", pixels, [(28, 28)] * 2)
    exchange.predictions = runtime.predict(pixels)
    exchange.handed = exchange.predictions[0]._batch_started
    bound: list[dict[str, Any]] = []

    class Spy:
        def bind(self, **extra: Any) -> Any:
            bound.append(extra)
            return logger.bind(**extra)

    recorder: PredictionRecorder = svc.recorder
    drift, recorder.drift = recorder.drift, None
    monkeypatch.setattr(telemetry, "logger", Spy())
    try:
        recorder.record(exchange)
    finally:
        recorder.drift = drift
        monkeypatch.undo()
    assert bound == ([] if flush_interval_s > 0 else [{"prediction_data": True}])
    assert LINES.add("log", "{}") is False  # the request log file is off here
    path = settings.predictions.for_worker("worker-5")
    held = not path.exists() or "pd-1" not in path.read_text()
    assert held is (flush_interval_s > 0)
    flush_logs()
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["request_id"] for e in entries] == ["pd-1", "pd-1"]
    assert [e["class_id"] for e in entries] == [p.class_id for p in exchange.predictions]


def test_serving_does_not_import_torch_or_mlflow(bento_home: Path) -> None:
    code = (
        "import sys, service; "
        "assert not {'torch', 'mlflow'} & set(sys.modules), 'torch or mlflow imported'"
    )
    env = {**os.environ, "BENTOML_HOME": str(bento_home)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)


def test_batch_size_one_turns_batching_off() -> None:
    off = BatchingSettings(max_batch_size=1, max_latency_ms=100)
    assert off.api_options() == {"batchable": False}
    on = service.SETTINGS.predict.api_options()
    assert on["batchable"] is True
    assert on["max_batch_size"] == service.SETTINGS.predict.max_batch_size
