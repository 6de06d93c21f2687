"""The BentoML service: ``POST /predict`` and ``POST /batch_predict`` on ONNX Runtime.

Serving must not import torch or MLflow; it uses :mod:`train.preprocess` (numpy, PIL, pydantic).

How a request flows:

1. :class:`UploadGate`, an ASGI middleware in front of the two routes, checks the optional API key
   (:class:`ApiKeyGuard`, ``auth`` in the settings; 401 before the body is read), reads the body (byte limit),
   parses ``multipart/form-data`` itself (python-multipart, no temp files), accepts uploaded
   files only, decodes each image from its bytes (format sniffed, EXIF, JPEG draft, pixel limit)
   and turns it into model input. Every client mistake ends here as a 4xx JSON body
   ``{"error": ..., "kind": ...}``. BentoML's own multipart parsing is bypassed on purpose: it
   treats a form value without a filename as a URL and downloads it.
2. The parsed pixels reach the API through a context variable (:class:`PredictInput` and
   :class:`BatchPredictInput` only declare the multipart schema for ``/docs.json``).
3. Both APIs are ``batchable``: BentoML's adaptive batcher joins concurrent requests of the same
   endpoint into one ONNX Runtime call (``configs/serving.yaml`` sets the batch sizes and the
   latency budgets). ``/predict`` is batched like ``/batch_predict``; its response is unwrapped to
   one object.
4. The gate writes one JSON log line per request (loguru; BentoML's stdlib logging goes to the
   same sinks: a stream and a rotated file per worker) and one JSON line per prediction for drift
   (:mod:`train.monitoring`), and the service records Prometheus metrics that BentoML serves on
   ``/metrics`` (``docs/monitoring.md`` lists them).

Settings come from ``configs/serving.yaml`` with ``FASHION_SERVE_SERVING__KEY`` overrides.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import gc
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import anyio.to_thread
import bentoml
import numpy as np
from _bentoml_sdk.io_models import IORootModel  # type: ignore[import-untyped]
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType
from loguru import logger
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import Response

from train.monitoring import (
    REFERENCE_FILE,
    DriftMonitor,
    LoggingSettings,
    Reference,
    brightness,
    load_alert_settings,
    prediction_lines,
    score_margin,
    worker_name,
)
from train.preprocess import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    prepare_image,
    softmax,
    to_model_input,
)
from train.settings_io import (
    SettingsError,
    env_overrides,
    read_yaml_mapping,
    set_nested,
    validate,
)

if TYPE_CHECKING:
    import loguru
    import onnxruntime as ort
    import prometheus_client
    from python_multipart.multipart import MultipartCallbacks
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROJECT_ROOT = Path(__file__).resolve().parent
ENV_PREFIX = "FASHION_SERVE_SERVING__"
ONNX_FILE = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# --------------------------------------------------------------------------- settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingSettings(_Strict):
    """Adaptive batching of one endpoint."""

    max_batch_size: int = Field(
        ge=1, description="Most images in one model call (1 turns batching off, for benchmarks)."
    )
    max_latency_ms: int = Field(
        gt=0, description="Queue wait + estimated batch time after which BentoML answers 503."
    )


class LimitSettings(_Strict):
    """What one request may hold."""

    max_upload_bytes: int = Field(ge=1)
    max_pixels: int = Field(ge=1, description="Width * height of one image.")
    max_images_per_batch: int = Field(ge=1)
    draft_size: int | None = Field(None, ge=1, description="JPEG reduced-size decoding target.")
    inline_decode_max_bytes: int = Field(
        ge=0, description="Bodies up to this size are decoded on the event loop."
    )


class AuthSettings(_Strict):
    """Optional API key for the prediction endpoints (off by default)."""

    enabled: bool = False
    key_env: str = Field(
        "FASHION_SERVE_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the key; the key is never in a file or a log.",
    )
    header: str = Field(
        "x-api-key",
        pattern=r"^[A-Za-z0-9-]+$",
        description="Request header carrying the key (``Authorization: Bearer`` works too).",
    )
    min_key_length: int = Field(16, ge=1, description="Shorter keys refuse to start.")
    protect_health: bool = Field(False, description="Also require the key on /livez, /readyz.")
    protect_metrics: bool = Field(False, description="Also require the key on /metrics.")


class ServingSettings(_Strict):
    """Everything ``service.py`` reads from ``configs/serving.yaml``."""

    model_tag: str
    workers: int = Field(ge=1)
    threads: int = Field(ge=1)
    onnx_intra_op_threads: int = Field(ge=1)
    onnx_inter_op_threads: int = Field(ge=1)
    onnx_memory_pattern: bool = Field(
        False,
        description="ONNX Runtime's per-input-shape memory plan cache (enable_mem_pattern). "
        "Adaptive batching sends up to max_batch_size distinct shapes, so it grows for as long "
        "as new batch sizes turn up; off costs no measurable speed (docs/soak.md).",
    )
    backend: Literal["onnx", "torch"] = Field(
        "onnx", description="onnx (the product) or torch (eager, for benchmarks; needs torch)."
    )
    torch_model_path: Path | None = Field(
        None, description="A torch.save'd nn.Module, the same model as model_tag (backend torch)."
    )
    inline_infer_max_images: int = Field(
        0,
        ge=0,
        description="Batches up to this size run on the event loop (no thread hop); larger in a "
        "worker thread so request parsing goes on meanwhile.",
    )
    predict: BatchingSettings
    batch_predict: BatchingSettings
    timeout_s: float = Field(gt=0)
    max_concurrency: int = Field(ge=1)
    limits: LimitSettings
    tracing_excluded_urls: list[str] = Field(
        description="URL patterns without OpenTelemetry spans (spans cost per request)."
    )
    logging: LoggingSettings
    access_log: bool
    auth: AuthSettings = AuthSettings()
    gc_freeze_after_load: bool = Field(
        True,
        description="gc.freeze() once the model is loaded: the garbage collector's full passes "
        "stop rescanning the objects that live as long as the worker (p99 under load).",
    )
    malloc_arena_max: int | None = Field(
        None,
        ge=1,
        description="MALLOC_ARENA_MAX for the worker processes (glibc); None leaves glibc's default.",
    )
    image_base: str | None = Field(
        None,
        description="Container base image for `bentoml build` (python3 and uv inside); "
        "None = BentoML's standard image for bentofile.yaml's python version.",
    )


#: ``configs/serving.yaml`` or an override is wrong; the message names the key.
ServingConfigError = SettingsError


def serving_config_path() -> Path:
    """``serving.yaml`` in ``FASHION_SERVE_CONFIG_DIR`` (default: the project's ``configs``)."""
    folder = os.environ.get("FASHION_SERVE_CONFIG_DIR", str(PROJECT_ROOT / "configs"))
    return Path(folder) / "serving.yaml"


def load_serving_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> ServingSettings:
    """Read the serving settings and apply ``FASHION_SERVE_SERVING__A__B=value`` overrides.

    Args:
        path: The YAML file; defaults to :func:`serving_config_path`.
        environ: Environment to read overrides from; defaults to ``os.environ``.

    Raises:
        ServingConfigError: a missing or malformed file, or an unknown key or invalid value.
    """
    file = path or serving_config_path()
    tree = read_yaml_mapping(file)
    for keys, value, name in env_overrides(ENV_PREFIX, os.environ if environ is None else environ):
        set_nested(tree, keys, value, name)
    return validate(ServingSettings, tree, f"serving config ({file}, {ENV_PREFIX}*)")


SETTINGS = load_serving_settings()

# glibc gives threads their own malloc arenas (up to 8 per core); under steady load the workers'
# memory kept growing for minutes until capped (docs/security.md, soak). `bentoml serve` imports
# this module before it spawns the workers, so they inherit the cap; an explicit environment wins.
if SETTINGS.malloc_arena_max is not None:
    os.environ.setdefault("MALLOC_ARENA_MAX", str(SETTINGS.malloc_arena_max))
#: ``configs/alerts.yaml``: the service uses its ``drift`` section for the drift gauges.
ALERTS = load_alert_settings()

# --------------------------------------------------------------------------- API models


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


class BadInputError(Exception):
    """A client mistake: answered with ``status`` and an :class:`ErrorBody`."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


_DECODE_STATUS = {
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
    handed: float = 0.0  # perf_counter() when the gate handed the request to BentoML


_EXCHANGE: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar(
    "fashion_serve_exchange", default=None
)


def _current_pixels() -> NDArray[np.float32]:
    exchange = _EXCHANGE.get()
    if exchange is None:
        # Only reachable if a route is served without the gate (a wiring mistake).
        raise InvalidArgument("images must be uploaded as multipart/form-data files")
    return exchange.pixels


def _record(predictions: Sequence[Prediction]) -> None:
    exchange = _EXCHANGE.get()
    if exchange is not None:
        exchange.predictions = list(predictions)


class PredictInput(bentoml.IODescriptor):  # type: ignore[misc]
    """``multipart/form-data`` with one image file in field ``image``."""

    image: Annotated[Path, ContentType("image/*")] = Field(
        description="PNG, JPEG, WebP, BMP, GIF or TIFF bytes (format read from the bytes)."
    )

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> PredictInput:
        """Take the pixels the gate prepared (the body is already consumed)."""
        parsed: PredictInput = cls.model_construct(image=_current_pixels())
        return parsed


class BatchPredictInput(bentoml.IODescriptor):  # type: ignore[misc]
    """``multipart/form-data`` with image files in repeated field ``images``."""

    images: list[Annotated[Path, ContentType("image/*")]] = Field(
        description="Image files; answers come back in this order."
    )

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> BatchPredictInput:
        """Take the pixels the gate prepared (the body is already consumed)."""
        parsed: BatchPredictInput = cls.model_construct(images=_current_pixels())
        return parsed


_PREDICTIONS_JSON = TypeAdapter(list[Prediction])


def prediction_body(predictions: Sequence[Prediction], single: bool) -> bytes:
    """The JSON response: one object for ``/predict``, an array for ``/batch_predict``."""
    if single:
        return predictions[0].__pydantic_serializer__.to_json(predictions[0])
    return _PREDICTIONS_JSON.dump_json(list(predictions))


def _json_response(body: bytes) -> Response:
    # One complete body: BentoML's streaming response sends an extra empty body message, and
    # every message passes five send wrappers.
    return Response(content=body, media_type="application/json")


class PredictOutput(bentoml.IODescriptor, Prediction):  # type: ignore[misc]
    """The prediction for the one image."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Any:
        """Unwrap the batched result (a list of one) into a single JSON object."""
        _record(obj)
        return _json_response(prediction_body(obj, single=True))


class BatchPredictOutput(IORootModel[list[Prediction]]):  # type: ignore[misc]
    """The predictions, in the order the images were uploaded."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Any:
        """Serialise the list of predictions as a JSON array."""
        _record(obj)
        return _json_response(prediction_body(obj, single=False))


# --------------------------------------------------------------------------- metrics and logs


@dataclass(frozen=True)
class ServiceMetrics:
    """The service's own Prometheus metrics (BentoML's are on ``/metrics`` beside them)."""

    predictions: prometheus_client.Counter
    confidence: prometheus_client.Histogram
    decode_seconds: prometheus_client.Histogram
    preprocess_seconds: prometheus_client.Histogram
    inference_seconds: prometheus_client.Histogram
    batch_size: prometheus_client.Histogram
    errors: prometheus_client.Counter
    queue_seconds: prometheus_client.Histogram
    requests: prometheus_client.Counter
    request_seconds: prometheus_client.Histogram
    drift_psi: prometheus_client.Gauge


@functools.cache
def service_metrics() -> ServiceMetrics:
    """Create the metrics once per process."""
    # Imported here: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker after importing this
    # module, and prometheus_client picks its storage mode when it is imported.
    import prometheus_client as prom

    seconds = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
    return ServiceMetrics(
        predictions=prom.Counter(
            "fashion_serve_predictions", "Predictions by predicted class.", ["label"]
        ),
        confidence=prom.Histogram(
            "fashion_serve_confidence",
            "Probability of the predicted class.",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
        ),
        decode_seconds=prom.Histogram(
            "fashion_serve_decode_seconds", "Decoding one image.", buckets=seconds
        ),
        preprocess_seconds=prom.Histogram(
            "fashion_serve_preprocess_seconds",
            "Resizing and converting one image.",
            buckets=seconds,
        ),
        inference_seconds=prom.Histogram(
            "fashion_serve_inference_seconds", "One ONNX Runtime call.", buckets=seconds
        ),
        batch_size=prom.Histogram(
            "fashion_serve_batch_size",
            "Images per ONNX Runtime call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        ),
        errors=prom.Counter(
            "fashion_serve_errors", "Failed requests by kind.", ["endpoint", "kind"]
        ),
        queue_seconds=prom.Histogram(
            "fashion_serve_queue_seconds",
            "From the gate handing a request to BentoML to its batch reaching ONNX Runtime.",
            buckets=seconds,
        ),
        requests=prom.Counter(
            "fashion_serve_requests",
            "Requests by endpoint and HTTP status.",
            ["endpoint", "status"],
        ),
        request_seconds=prom.Histogram(
            "fashion_serve_request_seconds",
            "Request latency measured by the gate (body read to response sent).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        ),
        # livemax: the worst worker wins, and a worker that exited stops counting.
        drift_psi=prom.Gauge(
            "fashion_serve_drift_psi",
            "PSI of recent predictions against the model's validation reference, by feature.",
            ["feature"],
            multiprocess_mode="livemax",
        ),
    )


def format_json_line(
    when: datetime,
    level: str,
    name: str | None,
    message: str,
    fields: Iterable[tuple[str, Any]],
    exception: str | None = None,
) -> str:
    """One log line: ``time``, ``level``, ``logger``, ``message``, the fields, any exception."""
    entry: dict[str, Any] = {
        "time": when.isoformat(),
        "level": level,
        "logger": name,
        "message": message,
    }
    entry.update(fields)
    if exception is not None:
        entry["exception"] = exception
    return json.dumps(entry, default=str)


def _json_line(record: loguru.Record) -> str:
    extra = record["extra"]
    return format_json_line(
        record["time"],
        record["level"].name,
        extra.get("logger", record["name"]),
        record["message"],
        ((k, v) for k, v in extra.items() if k not in ("logger", "json")),
        None if record["exception"] is None else repr(record["exception"].value),
    )


def _cached_json_line(record: loguru.Record) -> str:
    # The stream and the file sink see the same ``extra``: serialise each record once.
    line: str | None = record["extra"].get("json")
    if line is None:
        line = record["extra"]["json"] = _json_line(record)
    return line


def _file_format(record: loguru.Record) -> str:
    # loguru formats the returned template with the record, so the JSON travels in ``extra``.
    _cached_json_line(record)
    return "{extra[json]}\n"


def _is_prediction_data(record: loguru.Record) -> bool:
    return "prediction_data" in record["extra"]


def _is_log(record: loguru.Record) -> bool:
    return "prediction_data" not in record["extra"] and _BATCH_KEY not in record["extra"]


_BATCH_KEY = "_batched_lines"


class LineBatcher:
    """Log lines collected in memory and written to their files in one message per interval.

    A loguru file sink checks its size (``seek`` + ``tell``) and writes (line-buffered) for every
    record: three system calls and a lock per line, in the request, on the event loop. Here the
    request only appends its formatted line to a list; a daemon thread hands each file its lines
    as one record every ``flush_interval_s``, so loguru's rotation, retention and compression
    still apply, per batch. A ``kill -9`` loses at most one interval of lines; a normal exit
    writes everything (``atexit``).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, list[str]] = {}
        self._lock = threading.Lock()  # appends vs taking a batch (held for microseconds)
        self._writing = threading.Lock()  # one batch written at a time, in order
        self._wake = threading.Event()
        self._interval = 0.0
        self._thread: threading.Thread | None = None

    def open(self, target: str) -> None:
        """Collect lines for the file sink bound to ``target`` (see :meth:`add`)."""
        with self._lock:
            self._buffers.setdefault(target, [])

    def sink(self, target: str) -> Callable[[loguru.Message], None]:
        """A loguru sink that keeps log records, as JSON lines, for ``target``'s file sink."""
        self.open(target)
        lines = self._buffers[target]
        lock = self._lock

        def keep(message: loguru.Message) -> None:
            line = _cached_json_line(message.record)
            with lock:
                lines.append(line)

        return keep

    def add(self, target: str, line: str) -> bool:
        """Keep an already formatted ``line`` for ``target``; False if it is not batched here."""
        with self._lock:
            lines = self._buffers.get(target)
            if lines is None:
                return False
            lines.append(line)
        return True

    def start(self, interval: float) -> None:
        """Write every ``interval`` seconds from now on (one thread per process)."""
        self._interval = interval
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="log-lines", daemon=True)
            self._thread.start()
        self._wake.set()  # a waiting thread takes the new interval now

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write every collected line now (the writer thread, ``atexit`` and tests may race)."""
        with self._writing:
            with self._lock:
                batches = [(target, lines[:]) for target, lines in self._buffers.items() if lines]
                for lines in self._buffers.values():
                    lines.clear()
            for target, lines in batches:
                lines.append("")  # the batch ends with a newline
                logger.bind(**{_BATCH_KEY: target}).opt(raw=True).info("\n".join(lines))

    def reset(self) -> None:
        """Write what is left and forget the targets (before the sinks are reconfigured)."""
        self.flush()
        with self._lock:
            self._buffers.clear()


LINES = LineBatcher()
atexit.register(LINES.flush)


class RequestLog:
    """The gate's per-request JSON line, formatted once and handed to the service's own sinks.

    Through loguru the line cost a bound logger, a record (frame lookup, level, time) and every
    handler's filter: ``python -m bench.profile_request --costs`` timed it as the largest
    per-request item after the model and the PNG decode. When the stream and the file sink are
    ones this module configured (the file batched, or off) the line skips loguru and is built by
    :func:`format_json_line`, as loguru records are; otherwise (a line-by-line file) it is an
    ordinary loguru record. Sinks added elsewhere with ``logger.add`` do not see direct lines.
    """

    LOGGER = "fashion_serve.request"

    def __init__(self) -> None:
        self.direct = False
        self.enabled = True
        self._write: Callable[[str], object] | None = None
        self._file = False

    def configure(self, stream: Any | None, settings: LoggingSettings) -> None:
        """Go direct when every sink the line reaches is a stream or a batched file."""
        self.enabled = logger.level("INFO").no >= logger.level(settings.level).no
        self.direct = not settings.file.enabled or settings.file.flush_interval_s > 0
        self._write = stream.write if stream is not None else None
        self._file = settings.file.enabled

    def write(self, message: str, fields: dict[str, Any]) -> None:
        """Log one request: ``message`` and ``fields`` as loguru would show them."""
        if not self.direct:
            logger.bind(logger=self.LOGGER, **fields).info("{}", message)
            return
        if not self.enabled:
            return
        # Local time with its offset, as loguru's record time.
        now = datetime.now().astimezone()
        line = format_json_line(now, "INFO", self.LOGGER, message, fields.items())
        if self._write is not None:
            self._write(line + "\n")
        if self._file:
            LINES.add("log", line)


REQUEST_LOG = RequestLog()


def flush_logs() -> None:
    """Write every log and prediction-data line still held in memory (tests, shutdown)."""
    LINES.flush()
    logger.complete()


class _InterceptHandler(logging.Handler):
    """Send stdlib log records (BentoML, uvicorn) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).bind(logger=record.name).log(
            level, record.getMessage()
        )


def configure_logging(settings: LoggingSettings, worker: str | None = None) -> None:
    """JSON log lines to the stream and the worker's log file; prediction data to its own file.

    Stdlib loggers keep BentoML's levels (root at WARNING, ``bentoml`` at ``settings.level``), so
    uvicorn's access log stays off. Files are per worker process (``{worker}`` in the path):
    BentoML's workers are separate processes, each with its own loguru, and loguru's rotation
    is only safe with one writer per file. A file with ``flush_interval_s`` > 0 gets its lines in
    batches from :class:`LineBatcher`; 0 writes each line in the request (line-buffered).
    """
    worker = worker or worker_name()
    LINES.reset()
    logger.remove()
    stream = {"stdout": sys.stdout, "stderr": sys.stderr}.get(settings.stream)
    if stream is not None:

        def write(message: loguru.Message) -> None:
            stream.write(_cached_json_line(message.record) + "\n")

        # format="{message}": the JSON is built from the record, loguru's own text is unused.
        logger.add(write, level=settings.level, filter=_is_log, format="{message}")
    intervals = []
    for target, spec, level, keep in (
        ("log", settings.file, settings.level, _is_log),
        ("predictions", settings.predictions, 0, _is_prediction_data),
    ):
        if not spec.enabled:
            continue
        path = spec.for_worker(worker)
        path.parent.mkdir(parents=True, exist_ok=True)
        batched = spec.flush_interval_s > 0
        if batched:
            intervals.append(spec.flush_interval_s)
            if keep is _is_log:
                logger.add(LINES.sink(target), level=level, filter=keep, format="{message}")
            else:  # prediction data is final JSON: record_predictions hands it to LINES.add
                LINES.open(target)
        logger.add(
            path,
            level=0 if batched else level,
            filter=_batch_of(target) if batched else keep,
            # A str format gets loguru's "\n{exception}" appended: no newline of our own.
            format=_file_format if keep is _is_log and not batched else "{message}",
            rotation=spec.rotation,
            retention=spec.retention,
            compression=spec.compression,
        )
    if intervals:
        LINES.start(min(intervals))
    REQUEST_LOG.configure(stream, settings)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("bentoml", "uvicorn", "circus")):
            named = logging.getLogger(name)
            named.handlers = []
            named.propagate = True
    logging.getLogger("bentoml").setLevel(settings.level)


def _batch_of(target: str) -> Callable[[loguru.Record], bool]:
    def accepts(record: loguru.Record) -> bool:
        return record["extra"].get(_BATCH_KEY) == target

    return accepts


def record_predictions(exchange: Exchange, runtime: ModelRuntime) -> float | None:
    """Queue time, one prediction-data line per image, and the drift window, after a response.

    Returns:
        The request's queue time in seconds (None if its batch start is unknown).
    """
    predictions = exchange.predictions
    if not predictions:
        return None
    batch_started = predictions[0]._batch_started
    queued = batch_started - exchange.handed if batch_started >= exchange.handed else None
    if queued is not None:
        runtime.metrics.queue_seconds.observe(queued)
    if not runtime.prediction_data and runtime.drift is None:
        return queued
    margins = [score_margin(p.scores.values()) for p in predictions]
    lights = brightness(exchange.pixels).tolist()
    if runtime.prediction_data:
        lines = prediction_lines(
            datetime.now(UTC).isoformat(),
            exchange.request_id,
            exchange.endpoint,
            (
                (p.label, p.class_id, p.confidence, margin, light, size)
                for p, margin, light, size in zip(
                    predictions, margins, lights, exchange.sizes, strict=True
                )
            ),
        )
        # One message per request for all of its images; straight to the batched file when
        # there is one (the lines are final JSON: loguru's record building would be pure cost).
        if not LINES.add("predictions", lines):
            logger.bind(prediction_data=True).info("{}", lines)
    drift = runtime.drift
    if drift is not None:
        drift.add_many(
            [p.class_id for p in predictions], [p.confidence for p in predictions], margins, lights
        )
        if drift.due() and drift.count >= ALERTS.rules.drift.min_predictions:
            for feature, value in drift.scores().items():
                runtime.metrics.drift_psi.labels(feature=feature).set(value)
    return queued


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Upload:
    """One part of a multipart body."""

    name: str
    filename: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str, field_name: str) -> list[Upload]:
    """Split a ``multipart/form-data`` body into its parts (all in memory; the body is bounded).

    Raises:
        BadInputError: another media type (415) or a malformed body (400).
    """
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1") or "no content type"
        raise BadInputError(
            415,
            "unsupported_media_type",
            f"send multipart/form-data with the image in file field '{field_name}' (got "
            f"{shown}); JSON and urlencoded bodies are not accepted and URLs are never fetched",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadInputError(
            400, "malformed_multipart", "the multipart content type lacks a boundary"
        )
    parts: list[Upload] = []
    state: dict[str, Any] = {"ended": False}

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition"))
        filename = disposition.get(b"filename")
        parts.append(
            Upload(
                name=disposition.get(b"name", b"").decode("utf-8", "replace"),
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                data=b"".join(state["data"]),
            )
        )

    def on_end() -> None:
        state["ended"] = True

    callbacks: MultipartCallbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadInputError(
            400, "malformed_multipart", f"the multipart body is malformed: {exc}"
        ) from exc
    if not state["ended"]:
        raise BadInputError(
            400, "malformed_multipart", "the multipart body ends before its last part"
        )
    return parts


def select_files(
    parts: Sequence[Upload], field_name: str, single: bool, max_images: int
) -> list[Upload]:
    """Keep the uploaded files of ``field_name``; refuse anything else.

    Raises:
        BadInputError: a text value where a file belongs (it is never fetched as a URL or read as a
            path), an unexpected or missing field, or too many files.
    """
    for part in parts:
        if part.name != field_name:
            raise BadInputError(
                400,
                "unexpected_field",
                f"unexpected form field '{part.name}'; upload image files in field '{field_name}'",
            )
        if part.filename is None:
            raise BadInputError(
                400,
                "not_a_file",
                f"form field '{field_name}' holds a text value, not an uploaded file; URLs and "
                "server paths are never fetched, upload the image bytes instead",
            )
    if not parts:
        raise BadInputError(400, "missing_field", f"no image file in form field '{field_name}'")
    if single and len(parts) > 1:
        raise BadInputError(
            400,
            "too_many_images",
            f"/predict takes one file in field '{field_name}', got {len(parts)}; "
            "use /batch_predict for several",
        )
    if len(parts) > max_images:
        raise BadInputError(
            413,
            "too_many_images",
            f"{len(parts)} images in one request; at most {max_images} are accepted",
        )
    return list(parts)


# --------------------------------------------------------------------------- model


Logits = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def onnx_session_options(settings: ServingSettings) -> ort.SessionOptions:
    """ONNX Runtime's session options from the serving settings."""
    # Imported here, in the worker: `bentoml serve`'s arbiter imports this module too, only to
    # read the service definition, and every 0.1 s of import there is cold start.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.onnx_intra_op_threads
    options.inter_op_num_threads = settings.onnx_inter_op_threads
    options.enable_mem_pattern = settings.onnx_memory_pattern
    return options


def onnx_logits(onnx_path: Path, settings: ServingSettings) -> Logits:
    """An ONNX Runtime session on the CPU, as a function from pixels to logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(onnx_path),
        sess_options=onnx_session_options(settings),
        providers=["CPUExecutionProvider"],
    )

    def run(pixels: NDArray[np.float32]) -> NDArray[np.float32]:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return np.asarray(logits, dtype=np.float32)

    return run


def torch_logits(module_path: Path, settings: ServingSettings) -> Logits:
    """Eager torch on the CPU (``backend: torch``, for the ONNX-vs-torch benchmark only).

    torch is imported here and only here: the product (``backend: onnx``) and its container never
    import it.
    """
    import torch

    torch.set_num_threads(settings.onnx_intra_op_threads)
    with contextlib.suppress(RuntimeError):  # settable once per process
        torch.set_num_interop_threads(settings.onnx_inter_op_threads)
    module = torch.load(module_path, map_location="cpu", weights_only=False).eval()

    def run(pixels: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.inference_mode():
            logits: NDArray[np.float32] = module(torch.from_numpy(pixels)).float().numpy()
        return logits

    return run


class ModelRuntime:
    """The model with its classes and preprocessing: bytes in, predictions out."""

    def __init__(
        self,
        onnx_path: Path,
        class_names: Sequence[str],
        spec: PreprocessSpec,
        settings: ServingSettings,
    ) -> None:
        if settings.backend == "torch":
            if settings.torch_model_path is None:
                raise ServingConfigError("backend torch needs torch_model_path")
            self.logits = torch_logits(settings.torch_model_path, settings)
        else:
            self.logits = onnx_logits(onnx_path, settings)
        self.backend = settings.backend
        self.class_names = list(class_names)
        self.spec = spec
        self.limits = settings.limits
        self.inline_max = settings.inline_infer_max_images
        self.metrics = service_metrics()
        # Monitoring: prediction-data lines, and the drift window (needs the model's reference).
        self.prediction_data = settings.logging.predictions.enabled
        self.drift: DriftMonitor | None = None
        # Only batches that fit this many run inline; the rest go to a thread, one at a time.
        self._thread_limiter = anyio.CapacityLimiter(settings.threads)
        # The first run allocates; do it before the first request.
        self.logits(self.blank(1))

    @classmethod
    def from_bento_model(cls, model: bentoml.Model, settings: ServingSettings) -> ModelRuntime:
        """Load a model that :func:`train.export.import_to_bento` stored."""
        metadata = model.info.metadata
        return cls(
            Path(model.path_of(ONNX_FILE)),
            [str(name) for name in cast(list[Any], metadata["class_names"])],
            PreprocessSpec.model_validate(metadata["preprocess"]),
            settings,
        )

    def blank(self, count: int) -> NDArray[np.float32]:
        """``count`` black images in model-input form."""
        side = self.spec.image_size
        return np.zeros((count, self.spec.channels, side, side), dtype=np.float32)

    def prepare(
        self,
        files: Sequence[Upload],
        field_name: str,
        sizes: list[tuple[int, int]] | None = None,
    ) -> NDArray[np.float32]:
        """Decode and convert uploaded files into one model-input array.

        Args:
            files: The uploaded files.
            field_name: Their form field, for error messages.
            sizes: If given, receives each image's decoded (width, height), for drift data.

        Raises:
            BadInputError: a file that is empty, not an accepted image, truncated or too large.
        """

        def where(index: int, upload: Upload) -> str:
            return f"{field_name}[{index}]" + (f" ({upload.filename})" if upload.filename else "")

        arrays = []
        for index, upload in enumerate(files):
            started = time.perf_counter()
            try:
                image = decode_image(upload.data, self.limits.max_pixels, self.limits.draft_size)
            except ImageDecodeError as exc:
                raise BadInputError(
                    _DECODE_STATUS.get(exc.kind, 422), exc.kind, f"{where(index, upload)}: {exc}"
                ) from exc
            decoded = time.perf_counter()
            if sizes is not None:
                sizes.append(image.size)
            try:
                arrays.append(prepare_image(image, self.spec))
            except Exception as exc:
                raise BadInputError(
                    422,
                    "unconvertible",
                    f"{where(index, upload)}: cannot convert {image.mode} image: {exc}",
                ) from exc
            self.metrics.decode_seconds.observe(decoded - started)
            self.metrics.preprocess_seconds.observe(time.perf_counter() - decoded)
        return to_model_input(arrays)

    def predict(self, pixels: NDArray[np.float32]) -> list[Prediction]:
        """Run the model on ``float32 [N, C, H, W]`` pixels and describe each result."""
        started = time.perf_counter()
        logits = self.logits(pixels)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(pixels))
        probabilities = softmax(logits)
        class_ids = probabilities.argmax(axis=1)
        names = self.class_names
        predictions = []
        confidence = self.metrics.confidence
        # model_construct: the values are ours and already typed, so validation is pure cost on
        # the hot path; the class still documents the response in the OpenAPI schema.
        construct = Prediction.model_construct
        for row, class_id in zip(probabilities.tolist(), class_ids.tolist(), strict=True):
            prediction = construct(
                label=names[class_id],
                class_id=class_id,
                confidence=row[class_id],
                scores=dict(zip(names, row, strict=True)),
            )
            prediction._batch_started = started
            predictions.append(prediction)
            confidence.observe(row[class_id])
        # One counter update per predicted class in the batch, not one per image.
        for class_id, count in enumerate(np.bincount(class_ids, minlength=len(names)).tolist()):
            if count:
                self.metrics.predictions.labels(label=names[class_id]).inc(count)
        return predictions

    async def predict_async(self, pixels: NDArray[np.float32]) -> list[Prediction]:
        """:meth:`predict` inline for small batches, in a worker thread for large ones.

        A thread hop costs a GIL hand-over and a loop wake-up each way (measured: the largest
        item of a single request's server time after BentoML itself, see docs/performance.md);
        a small model call is cheaper than that. A large batch runs in the thread, where the
        model releases the GIL and the event loop goes on parsing the next requests.
        """
        if len(pixels) <= self.inline_max:
            return self.predict(pixels)
        return await anyio.to_thread.run_sync(self.predict, pixels, limiter=self._thread_limiter)


# --------------------------------------------------------------------------- HTTP edge

_ROUTES = {"/predict": ("image", True), "/batch_predict": ("images", False)}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


async def read_body(receive: Receive, headers: Mapping[bytes, bytes], limit: int) -> bytes:
    """Read the whole request body, refusing it as soon as it passes ``limit`` bytes.

    Raises:
        BadInputError: the declared or actual size is over the limit (413), or a bad length (400).
    """
    too_large = BadInputError(
        413, "upload_too_large", f"the request body is over the limit of {limit} bytes"
    )
    declared = headers.get(b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadInputError(
                400, "bad_content_length", "the Content-Length header is not a number"
            )
        if int(declared) > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise BadInputError(
                400, "incomplete_body", "the client went away before the body ended"
            )
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


_HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})


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
        self.paths = frozenset(_ROUTES) | (
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


#: Built at import, so ``bentoml serve`` stops at once when auth is on without a key.
API_KEY_GUARD = ApiKeyGuard(SETTINGS.auth, os.environ)


ApiCall = Callable[[NDArray[np.float32]], Coroutine[Any, Any, list[Prediction]]]


def find_api_call(app: Any, name: str) -> ApiCall | None:
    """BentoML's own call of API ``name`` for the gate: its adaptive batcher when batchable.

    BentoML's route endpoint for an API is a ``functools.partial`` of its app factory's
    ``api_endpoint_wrapper``; the factory owns the batchers (``batch_infer``) and the service
    instance. Going through them directly keeps BentoML's batching and the API method and drops
    the rest of its per-request path (routing, request object, IO descriptors, response
    object), measured in docs/performance.md. ``None`` where the app is not laid out that way;
    the gate then hands the request to the full endpoint.
    """
    for route in getattr(app, "routes", ()):
        endpoint = getattr(route, "endpoint", None)
        if getattr(route, "name", None) == name and isinstance(endpoint, functools.partial):
            factory = getattr(endpoint.func, "__self__", None)
            if name in getattr(factory, "dispatchers", {}):
                return _batched_call(factory, name)
            instance = getattr(factory, "_service_instance", None)
            method = getattr(getattr(instance, name, None), "local", None)
            return cast(ApiCall, method) if method is not None else None
    return None


def service_error(status: int, message: str) -> BadInputError:
    """The answer to a failed model call (a BentoML error's status; 500 for anything else).

    503 is BentoML's batcher shedding load (kind ``overloaded``); any other 5xx is a 500
    ``server_error`` with its details only in the server log; a 4xx keeps ``http_<status>``.
    """
    if status == 503:
        return BadInputError(503, "overloaded", message or "the service is overloaded")
    if status >= 500:
        return BadInputError(500, "server_error", "an unexpected error, see the server log")
    return BadInputError(status, f"http_{status}", message)


def _batched_call(factory: Any, name: str) -> ApiCall:
    async def call(pixels: NDArray[np.float32]) -> list[Prediction]:
        result: list[Prediction] = await factory.batch_infer(name, (pixels,), {})
        return result

    return call


async def send_json(send: Send, status: int, body: bytes) -> None:
    """Answer ``status`` with a complete JSON ``body`` (two ASGI messages)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: BadInputError) -> None:
    """Answer ``error`` as its status with an :class:`ErrorBody`."""
    body = ErrorBody(error=str(error), kind=error.kind).model_dump_json().encode()
    await send_json(send, error.status, body)


class UploadGate:
    """ASGI middleware that owns ``/predict`` and ``/batch_predict``: parse, call, log."""

    def __init__(self, app: ASGIApp, guard: ApiKeyGuard | None = None) -> None:
        self.app = app
        self.guard = guard or API_KEY_GUARD
        self._calls: dict[str, ApiCall | None] = {}

    def api_call(self, scope: Scope, endpoint: str) -> ApiCall | None:
        """The direct call for ``endpoint`` (looked up once; see :func:`find_api_call`)."""
        if endpoint not in self._calls:
            self._calls[endpoint] = find_api_call(scope.get("app"), endpoint.lstrip("/"))
        return self._calls[endpoint]

    async def answer(
        self, call: ApiCall, exchange: Exchange, single: bool, send: Send
    ) -> BadInputError | None:
        """Run the API on the parsed pixels and send its JSON; the error sent, if any."""
        error = None
        try:
            exchange.predictions = await call(exchange.pixels)
        except BentoMLException as exc:
            error = service_error(exc.error_code.value, str(exc))
        except Exception:  # noqa: BLE001 - the edge: answer 500 and log, as BentoML would
            logger.bind(logger="fashion_serve", request_id=exchange.request_id).exception(
                "{} failed", exchange.endpoint
            )
            error = service_error(500, "")
        if error is None:
            await send_json(send, 200, prediction_body(exchange.predictions, single))
        else:
            await send_error(send, error)
        return error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Parse and validate the upload, run the API on it (BentoML's batcher), log it.

        Without a direct call (see :func:`find_api_call`) the pixels go to BentoML's endpoint.
        """
        route = _ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            if scope["type"] == "http":
                try:
                    self.guard.check(scope["path"], dict(scope["headers"]))
                except BadInputError as exc:
                    await send_error(send, exc)
                    return
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        endpoint = scope["path"]
        headers = dict(scope["headers"])
        incoming_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming_id if _REQUEST_ID.match(incoming_id) else uuid.uuid4().hex
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        runtime: ModelRuntime = bentoml.get_current_service().runtime
        field_name, single = route
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
        call = self.api_call(scope, endpoint) if exchange is not None else None
        if exchange is not None:
            exchange.handed = time.perf_counter()
        if exchange is not None and call is not None:
            error = await self.answer(call, exchange, single, send_with_id)
        elif exchange is not None:
            token = _EXCHANGE.set(exchange)
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                _EXCHANGE.reset(token)
        latency = time.perf_counter() - started
        kind = error.kind if error else (f"http_{status}" if status >= 400 else None)
        if kind is not None:
            runtime.metrics.errors.labels(endpoint=endpoint, kind=kind).inc()
        runtime.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        runtime.metrics.request_seconds.observe(latency)
        predictions = exchange.predictions if exchange else []
        queued = None if exchange is None else record_predictions(exchange, runtime)
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


# --------------------------------------------------------------------------- service


def service_image(settings: ServingSettings) -> bentoml.images.Image | None:
    """The image ``bentoml build`` describes: BentoML's standard one, or ``image_base`` as is.

    ``distro="none"`` adds nothing to a custom base: BentoML's Debian layer (build-essential,
    git) would double the image and needs Debian's network at build time.
    """
    if not settings.image_base:
        return None
    return bentoml.images.Image(base_image=settings.image_base, distro="none")


def batching(settings: BatchingSettings) -> dict[str, Any]:
    """``@bentoml.api`` arguments: adaptive batching, or none when ``max_batch_size`` is 1.

    BentoML refuses a batch size of 1; without ``batchable`` every request is one model call
    (the "batching off" benchmark), with the same input and output as when batched.
    """
    if settings.max_batch_size == 1:
        return {"batchable": False}
    return {
        "batchable": True,
        "max_batch_size": settings.max_batch_size,
        "max_latency_ms": settings.max_latency_ms,
    }


@bentoml.service(
    image=service_image(SETTINGS),
    workers=SETTINGS.workers,
    threads=SETTINGS.threads,
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    logging={"access": {"enabled": SETTINGS.access_log}},
    tracing={"excluded_urls": SETTINGS.tracing_excluded_urls},
)
class Classifier:
    """Image classifier: the imported champion on ONNX Runtime."""

    model_ref = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        configure_logging(SETTINGS.logging)
        stored = cast(bentoml.Model, self.model_ref)
        self.runtime = ModelRuntime.from_bento_model(stored, SETTINGS)
        reference_path = Path(stored.path_of(REFERENCE_FILE))
        if reference_path.exists():
            self.runtime.drift = DriftMonitor(Reference.load(reference_path), ALERTS.drift)
        else:
            logger.bind(logger="fashion_serve").warning(
                "{} has no {}: drift gauges are off (python -m train reference adds one)",
                stored.tag,
                REFERENCE_FILE,
            )
        logger.bind(logger="fashion_serve", model=str(stored.tag)).info(
            "serving {} ({} classes)", stored.tag, len(self.runtime.class_names)
        )
        if SETTINGS.gc_freeze_after_load:
            # Everything alive now (BentoML, ONNX Runtime, pydantic models, the model) lives
            # for the whole process; frozen, the full collections stop rescanning it.
            gc.collect()
            gc.freeze()

    @bentoml.api(  # type: ignore[untyped-decorator]
        **batching(SETTINGS.predict),
        input_spec=PredictInput,
        output_spec=PredictOutput,
    )
    async def predict(self, image: NDArray[np.float32]) -> list[Prediction]:
        """Classify one image (multipart file field ``image``); concurrent calls are batched."""
        return await self.runtime.predict_async(image)

    @bentoml.api(  # type: ignore[untyped-decorator]
        **batching(SETTINGS.batch_predict),
        input_spec=BatchPredictInput,
        output_spec=BatchPredictOutput,
    )
    async def batch_predict(self, images: NDArray[np.float32]) -> list[Prediction]:
        """Classify several images (repeated multipart file field ``images``), in order."""
        return await self.runtime.predict_async(images)


# The decorator made Classifier a bentoml.Service, which mypy cannot see.
Classifier.add_asgi_middleware(UploadGate)  # type: ignore[attr-defined]
