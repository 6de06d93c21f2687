"""Telemetry: Prometheus metrics, JSON log lines, and prediction data for drift.

Nothing here blocks the event loop: request and prediction-data lines are appended to memory
and written to their files by one background thread per process (:class:`LineBatcher`).
Prometheus metrics are served by BentoML on ``/metrics`` beside its own
(``docs/monitoring.md`` lists them).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np
from loguru import logger

from common.drift import DriftMonitor, brightness, prediction_lines, score_margin
from serving.schema import Exchange
from serving.settings import LoggingSettings

if TYPE_CHECKING:
    import loguru
    import prometheus_client


def worker_name() -> str:
    """``worker-<BentoML worker id>``, or ``pid-<pid>`` outside a BentoML worker process."""
    index = bentoml.server_context.worker_index
    return f"worker-{index}" if index is not None else f"pid-{os.getpid()}"


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
            atexit.register(self.flush)  # a normal exit writes what is still held
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


class RequestLog:
    """The gate's per-request JSON line, formatted once and handed to the service's own sinks.

    Through loguru each line costs a bound logger, a record and every handler's filter. When the
    stream and the file sink are ones this module configured (the file batched, or off) the line
    skips loguru and is built by :func:`format_json_line`, as loguru records are; otherwise (a
    line-by-line file) it is an ordinary loguru record. Sinks added elsewhere with
    ``logger.add`` do not see direct lines.
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


@dataclass
class PredictionRecorder:
    """After each response: the queue-time metric, prediction-data lines and the drift window.

    The queue time is recorded at once (the request log line carries it). Prediction data and
    drift are recorded for every request answered in the same turn of the event loop together,
    on the loop's next turn: one brightness computation, one drift write and one batch of lines
    per model batch instead of per request, where numpy's per-call cost dominated.
    """

    metrics: ServiceMetrics
    prediction_data: bool
    drift: DriftMonitor | None = None
    drift_min_predictions: int = 1
    _pending: list[Exchange] = field(default_factory=list, init=False, repr=False)

    def record(self, exchange: Exchange) -> float | None:
        """Record one answered request (its prediction data and drift: see the class).

        Returns:
            The request's queue time in seconds (None if its batch start is unknown).
        """
        predictions = exchange.predictions
        if not predictions:
            return None
        batch_started = predictions[0]._batch_started
        queued = batch_started - exchange.handed if batch_started >= exchange.handed else None
        if queued is not None:
            self.metrics.queue_seconds.observe(queued)
        if not self.prediction_data and self.drift is None:
            return queued
        self._pending.append(exchange)
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop (a script or a test): record now
                self.flush()
        return queued

    def flush(self) -> None:
        """Record the prediction data and drift of every request recorded since the last flush."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        predictions = [p for exchange in pending for p in exchange.predictions]
        margins = [score_margin(p.scores.values()) for p in predictions]
        pixels = [exchange.pixels for exchange in pending]
        lights = brightness(pixels[0] if len(pixels) == 1 else np.concatenate(pixels)).tolist()
        if self.prediction_data:
            now = datetime.now(UTC).isoformat()
            start = 0
            requests = []
            for exchange in pending:
                stop = start + len(exchange.predictions)
                requests.append(
                    prediction_lines(
                        now,
                        exchange.request_id,
                        exchange.endpoint,
                        (
                            (p.label, p.class_id, p.confidence, margin, light, size)
                            for p, margin, light, size in zip(
                                exchange.predictions,
                                margins[start:stop],
                                lights[start:stop],
                                exchange.sizes,
                                strict=True,
                            )
                        ),
                    )
                )
                start = stop
            lines = "\n".join(requests)
            # Straight to the batched file when there is one (the lines are final JSON: loguru's
            # record building is pure cost).
            if not LINES.add("predictions", lines):
                logger.bind(prediction_data=True).info("{}", lines)
        drift = self.drift
        if drift is not None:
            drift.add_many(
                [p.class_id for p in predictions],
                [p.confidence for p in predictions],
                margins,
                lights,
            )
            if drift.due() and drift.count >= self.drift_min_predictions:
                for feature, value in drift.scores().items():
                    self.metrics.drift_psi.labels(feature=feature).set(value)
