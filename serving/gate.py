"""The upload gate: ASGI middleware that owns ``/predict`` and ``/batch_predict``.

Follow an upload from here to the model: :class:`ApiKeyGuard` checks the optional API key (401
before the body is read); :mod:`serving.uploads` reads the body within its limit and keeps the
uploaded files; :meth:`serving.runtime.ModelRuntime.prepare` decodes them into model input; the
pixels go to the API's adaptive batcher (:mod:`serving.batching`), which runs
:meth:`serving.runtime.ModelRuntime.predict`; the gate writes the JSON answer, the metrics, the
request log line and the prediction data (:mod:`serving.telemetry`). ``GET /model`` answers the
loaded model's lineage (:func:`serving.lineage.model_info`). Every client mistake ends
as a 4xx JSON :class:`serving.schema.ErrorBody`, and so do 404 and 405 on the service's routes.
``GET /docs.json`` is answered here too, with BentoML's document completed by
:mod:`serving.openapi` (every status the gate answers, every constraint it enforces).
"""

from __future__ import annotations

import hmac
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import bentoml
from loguru import logger

from serving.schema import (
    BadInputError,
    ErrorBody,
    Exchange,
    ModelInfo,
    prediction_body,
)
from serving.settings import AuthSettings, ServingConfigError
from serving.telemetry import REQUEST_LOG, PredictionRecorder
from serving.uploads import parse_multipart, read_body, select_files

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from serving.balance import ConnectionBalance, RecentClients
    from serving.batching import Batcher
    from serving.runtime import ModelRuntime

#: The gate's routes: their API (and batcher), multipart field, and whether the answer is one object.
ROUTES = {
    "/predict": ("predict", "image", True),
    "/batch_predict": ("batch_predict", "images", False),
}
#: ``GET`` answers the loaded model's lineage (:class:`serving.schema.ModelInfo`).
MODEL_PATH = "/model"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


_HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
#: Where BentoML serves the OpenAPI document (and the gate answers it instead).
DOCS_PATH = "/docs.json"


class ApiKeyGuard:
    """The optional API key check (``auth`` in ``configs/serving.yaml``), used by the gate.

    The key is read once from the environment variable the settings name; it is compared in
    constant time and never logged or echoed.
    """

    def __init__(self, settings: AuthSettings, environ: Mapping[str, str]) -> None:
        """Read the key; refuse to start when auth is on and the key is missing or short.

        Raises:
            ServingConfigError: ``auth.enabled`` without a usable key (the message names the
                variable, never its value).
        """
        self.enabled = settings.enabled
        self.header = settings.header.lower().encode("ascii")
        key = environ.get(settings.key_env, "") if settings.enabled else ""
        if settings.enabled and len(key) < settings.min_key_length:
            raise ServingConfigError(
                f"auth.enabled is true but environment variable {settings.key_env} is unset or "
                f"shorter than auth.min_key_length ({settings.min_key_length}) characters"
            )
        self._key = key.encode()
        self.paths = frozenset((*ROUTES, MODEL_PATH)) | (
            _HEALTH_PATHS if settings.protect_health else frozenset()
        )
        if settings.protect_metrics:
            self.paths |= {"/metrics"}

    def protects(self, path: str) -> bool:
        """Whether a request to ``path`` needs the key."""
        return self.enabled and path in self.paths

    def check(self, path: str, headers: Mapping[bytes, bytes]) -> None:
        """Let the request through, or raise a 401 when the key is missing or wrong.

        Raises:
            BadInputError: 401 ``unauthorized``.
        """
        if not self.protects(path):
            return
        supplied = headers.get(self.header)
        if supplied is None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            supplied = token.strip() if scheme.lower() == b"bearer" else b""
        if not hmac.compare_digest(supplied, self._key):
            raise BadInputError(
                401,
                "unauthorized",
                f"missing or wrong API key: send it in the {self.header.decode()} header "
                "(or Authorization: Bearer)",
            )


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    method: str = "GET",
) -> None:
    """Answer ``status`` with a complete JSON ``body`` (two ASGI messages; ``HEAD``: no body)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.extend(extra or ())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def method_not_allowed(
    scope: Scope, allow: str, takes: str
) -> tuple[BadInputError, list[tuple[bytes, bytes]]]:
    """The 405 for a method a gate route does not take, and its ``Allow`` header."""
    error = BadInputError(
        405, "method_not_allowed", f"{scope['path']} takes {takes}, not {scope['method']}"
    )
    return error, [(b"allow", allow.encode())]


async def send_error(
    send: Send, error: BadInputError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer ``error`` as its status with an :class:`ErrorBody`."""
    body = ErrorBody(error=str(error), kind=error.kind).model_dump_json().encode()
    await send_json(send, error.status, body, headers)


PLAIN_ERRORS = {404: "not_found", 405: "method_not_allowed"}


def json_not_found(scope: Scope, send: Send) -> Send:
    """``send`` with Starlette's plain-text 404 and 405 answers turned into JSON error bodies."""
    replaced: dict[str, Any] = {}

    async def send_json_errors(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] in PLAIN_ERRORS:
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if not content_type.startswith(b"application/json"):
                replaced["start"] = message
                return
        if message["type"] == "http.response.body" and "start" in replaced:
            start = replaced.pop("start")
            status = start["status"]
            kept = [
                (name, value)
                for name, value in start.get("headers", [])
                if name.lower() not in (b"content-type", b"content-length")
            ]
            error = BadInputError(
                status,
                PLAIN_ERRORS[status],
                f"{scope['method']} {scope['path']}: "
                + ("no such route" if status == 404 else "method not allowed"),
            )
            await send_error(send, error, kept)
            return
        await send(message)

    return send_json_errors


class UploadGate:
    """ASGI middleware that owns ``/predict`` and ``/batch_predict``: parse, call, log."""

    def __init__(
        self,
        app: ASGIApp,
        guard: ApiKeyGuard,
        openapi: Callable[[frozenset[str]], dict[str, Any]] | None = None,
    ) -> None:
        """Wrap ``app``; ``openapi(auth_paths)`` is the OpenAPI document ``GET /docs.json`` answers.

        Without ``openapi`` BentoML's own document is served.
        """
        self.app = app
        self.guard = guard
        self.openapi = openapi
        self._document: bytes | None = None

    async def send_document(self, method: str, send: Send) -> None:
        """Answer ``GET /docs.json`` (``HEAD``: its headers) with the completed document."""
        if self._document is None:
            assert self.openapi is not None
            self._document = json.dumps(self.openapi(self.guard.paths)).encode()
        await send_json(send, 200, self._document, method=method)

    async def answer(
        self, batcher: Batcher, exchange: Exchange, single: bool, send: Send, alone: bool = False
    ) -> BadInputError | None:
        """Run the API's batcher on the parsed pixels and send its JSON; the error sent, if any."""
        error = None
        try:
            exchange.predictions = await batcher(exchange.pixels, alone)
        except BadInputError as exc:  # 503 overloaded
            error = exc
        except Exception:  # noqa: BLE001 - the edge: answer 500, details only in the log
            logger.bind(logger="fashion_serve", request_id=exchange.request_id).exception(
                "{} failed", exchange.endpoint
            )
            error = BadInputError(500, "server_error", "an unexpected error, see the server log")
        if error is None:
            await send_json(send, 200, prediction_body(exchange.predictions, single))
        else:
            await send_error(send, error)
        return error

    async def model(self, scope: Scope, send: Send) -> None:
        """``GET /model``: the lineage the service instance loaded; 405 for other methods."""
        try:
            self.guard.check(scope["path"], dict(scope["headers"]))
        except BadInputError as exc:
            await send_error(send, exc)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_error(send, *method_not_allowed(scope, "GET", "GET"))
            return
        lineage: ModelInfo = bentoml.get_current_service().lineage
        await send_json(send, 200, lineage.model_dump_json().encode(), method=scope["method"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Parse and validate the upload, run the API's batcher on it, answer, log it.

        ``GET /model`` and ``GET /docs.json`` are answered here too; every other route goes to
        BentoML's app.
        """
        if scope["type"] == "http" and scope.get("path") == MODEL_PATH:
            await self.model(scope, send)
            return
        route = ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            if scope["type"] == "http":
                try:
                    self.guard.check(scope["path"], dict(scope["headers"]))
                except BadInputError as exc:
                    await send_error(send, exc)
                    return
                if route is not None:
                    takes = "POST (multipart/form-data)"
                    await send_error(send, *method_not_allowed(scope, "POST", takes))
                    return
                if (
                    scope["path"] == DOCS_PATH
                    and scope["method"] in ("GET", "HEAD")
                    and self.openapi is not None
                ):
                    await self.send_document(scope["method"], send)
                    return
                send = json_not_found(scope, send)
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        endpoint = scope["path"]
        headers = dict(scope["headers"])
        incoming_id = headers.get(b"x-request-id", b"").decode("latin-1")
        # 32 random hex digits, as uuid4().hex but without building a UUID per request.
        request_id = incoming_id if _REQUEST_ID.match(incoming_id) else os.urandom(16).hex()
        status = 500

        current = bentoml.get_current_service()
        runtime: ModelRuntime = current.runtime
        recorder: PredictionRecorder = current.recorder
        balance: ConnectionBalance | None = current.balance
        clients: RecentClients = current.clients

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if balance is None:
                    clients.note(scope.get("client"))
                elif balance.should_close(scope.get("client")):
                    headers.append((b"connection", b"close"))  # reconnect to a freer worker
                message["headers"] = headers
            await send(message)

        api, field_name, single = route
        exchange: Exchange | None = None
        error: BadInputError | None = None
        try:
            self.guard.check(endpoint, headers)
            body = await read_body(receive, headers, runtime.limits.max_upload_bytes)
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            parts = parse_multipart(body, content_type, field_name)
            files = select_files(parts, field_name, single, runtime.limits.max_images_per_batch)
            sizes: list[tuple[int, int]] = []
            if len(body) <= runtime.limits.inline_decode_max_bytes:
                pixels = runtime.prepare(files, field_name, sizes)
            else:
                pixels = await anyio.to_thread.run_sync(runtime.prepare, files, field_name, sizes)
            exchange = Exchange(request_id, endpoint, pixels, sizes)
        except BadInputError as exc:
            error = exc
            await send_error(send_with_id, exc)
        if exchange is not None:
            exchange.handed = time.perf_counter()
            # HTTP/1.1 carries one request per connection at a time: with one client connection
            # no other request can join a batch, so it need not wait a turn of the loop for one.
            # Without a client address (a Unix socket) connections cannot be told apart.
            alone = scope.get("client") is not None and len(clients) <= 1
            batcher = runtime.batchers[api]
            error = await self.answer(batcher, exchange, single, send_with_id, alone)
        latency = time.perf_counter() - started
        kind = error.kind if error else (f"http_{status}" if status >= 400 else None)
        if kind is not None:
            runtime.metrics.errors.labels(endpoint=endpoint, kind=kind).inc()
        runtime.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        runtime.metrics.request_seconds.observe(latency)
        predictions = exchange.predictions if exchange else []
        queued = None if exchange is None else recorder.record(exchange)
        REQUEST_LOG.write(
            f"{endpoint} {status} {error or 'ok'}",
            {
                "request_id": request_id,
                "endpoint": endpoint,
                "status": status,
                "latency_ms": round(latency * 1000, 3),
                "queue_ms": None if queued is None else round(queued * 1000, 3),
                "images": 0 if exchange is None else len(exchange.pixels),
                "labels": [p.label for p in predictions],
                "confidences": [round(p.confidence, 4) for p in predictions],
                "error_kind": kind,
            },
        )
