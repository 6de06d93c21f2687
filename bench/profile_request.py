"""Where one ``/predict`` request spends the server's CPU: the whole ASGI app in one process.

``python -m bench.profile_request`` builds the service's real ASGI app (``Classifier.to_asgi()``:
BentoML's middlewares, the upload gate, the adaptive batcher, the API, the response), runs its
lifespan, and calls it directly with prebuilt Fashion-MNIST PNG uploads, one request at a time
(concurrency 1), with no sockets and no HTTP parser. It prints:

- the mean server CPU time per request (``time.process_time``) over ``--requests`` calls, which
  is steadier than wall-clock latency on a shared machine;
- with ``--profile``, a ``cProfile`` of the same loop, grouped into phases (multipart parsing,
  decoding, preprocessing, inference, response building, logging, metrics, BentoML's own
  machinery), the figures ``docs/performance.md`` quotes;
- with ``--costs``, each per-request operation timed on its own, in the worker's configuration
  (Prometheus in multiprocess mode, the service's log sinks), and what they add up to per
  ``/predict`` at a given mean batch size (``--batch``): the profiler inflates pure-Python code
  such as ``prometheus_client``, so these are the figures to weigh a change by.

The model comes from ``BENTOML_HOME`` (tag from ``configs/serving.yaml``), or ``--tiny`` imports
a random ``simple_cnn`` into a temporary store.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.runtime import ModelRuntime
from serving.telemetry import REQUEST_LOG

#: Phases of a request, matched against ``file:function`` of every profiled function; the first
#: match wins, and a function's *own* time is counted (so nothing is counted twice).
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("inference (ONNX Runtime / torch)", ("onnxruntime", "torch/", "logits")),
    ("decode (PIL)", ("decode_image", "PIL/", "ImageOps")),
    ("preprocess (resize, to float)", ("prepare_image", "to_model_input", "_flatten")),
    ("multipart parsing + body", ("multipart", "parse_multipart", "select_files", "read_body")),
    ("predictions + JSON response", ("softmax", "Prediction", "pydantic", "to_http_response")),
    ("metrics (prometheus)", ("prometheus_client",)),
    ("request log (loguru JSON)", ("loguru", "_json_sink", "json/")),
    ("batcher (BentoML dispatcher)", ("dispatcher.py",)),
    ("BentoML + Starlette request machinery", ("bentoml", "starlette", "anyio", "opentelemetry")),
    ("asyncio event loop", ("asyncio/",)),
)


@dataclass(frozen=True)
class Measurement:
    """Mean CPU and wall time per request."""

    requests: int
    cpu_ms: float
    wall_ms: float


def _scope(path: str, content_type: str, length: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", content_type.encode()),
            (b"content-length", str(length).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 3000),
        "state": {},
    }


async def _call(app: Any, path: str, body: bytes, content_type: str) -> int:
    """One request through the ASGI app; returns the status."""
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await app(_scope(path, content_type, len(body)), receive, send)
    return status


async def drive(
    app: Any,
    bodies: Sequence[bytes],
    content_type: str,
    requests: int,
    warmup: int,
    profile: cProfile.Profile | None = None,
) -> Measurement:
    """Start the app's lifespan, send ``warmup`` then ``requests`` sequential requests.

    With ``profile``, another ``requests`` calls run under it afterwards (same app, same loop).
    """
    started_up = asyncio.Event()
    stop = asyncio.Event()
    events = iter([{"type": "lifespan.startup"}])

    async def lifespan_receive() -> dict[str, Any]:
        for event in events:
            return event
        await stop.wait()
        return {"type": "lifespan.shutdown"}

    async def lifespan_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started_up.set()
        elif message["type"] == "lifespan.startup.failed":
            raise RuntimeError(message.get("message", "startup failed"))

    lifespan = asyncio.create_task(
        app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            lifespan_receive,
            lifespan_send,
        )
    )
    await asyncio.wait_for(started_up.wait(), 120)
    for index in range(warmup):
        status = await _call(app, "/predict", bodies[index % len(bodies)], content_type)
        if status != 200:
            raise RuntimeError(f"/predict answered {status}")
    cpu, wall = time.process_time(), time.perf_counter()
    for index in range(requests):
        await _call(app, "/predict", bodies[index % len(bodies)], content_type)
    measured = Measurement(
        requests,
        1000 * (time.process_time() - cpu) / requests,
        1000 * (time.perf_counter() - wall) / requests,
    )
    if profile is not None:
        profile.enable()
        for index in range(requests):
            await _call(app, "/predict", bodies[index % len(bodies)], content_type)
        profile.disable()
    stop.set()
    await lifespan
    return measured


def _phase_of(function: tuple[str, int, str]) -> str | None:
    where = f"{function[0]}:{function[2]}"
    return next((name for name, keys in PHASES if any(k in where for k in keys)), None)


def phase_table(stats: pstats.Stats, requests: int) -> list[tuple[str, float]]:
    """Own CPU time per phase in microseconds per request, largest first.

    A function that matches no phase (a builtin such as ``getattr``, a stdlib helper) is charged
    to the phases of its direct callers, in proportion to the time spent under each caller.
    """
    totals: dict[str, float] = {name: 0.0 for name, _ in PHASES}
    totals["other"] = 0.0
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for function, (_, _, own, _, callers) in raw.items():
        phase = _phase_of(function)
        if phase is not None:
            totals[phase] += own
            continue
        edges = {caller: edge[2] for caller, edge in callers.items()}
        spread = sum(edges.values())
        if spread <= 0:
            totals["other"] += own
            continue
        for caller, share in edges.items():
            totals[_phase_of(caller) or "other"] += own * share / spread
    return sorted(((k, 1e6 * v / requests) for k, v in totals.items()), key=lambda kv: -kv[1])


def served_runtime(service: Any) -> Any:
    """The served model's :class:`ModelRuntime`, with the service's session settings."""
    import bentoml

    stored = bentoml.models.get(service.SERVED_TAG)
    return ModelRuntime.from_bento_model(stored, service.SETTINGS)


def model_cpu_ms(service: Any, calls: int = 300) -> float:
    """CPU milliseconds of one model call on one image, with the service's session settings."""
    runtime = served_runtime(service)
    pixels = runtime.blank(1)
    for _ in range(20):
        runtime.logits(pixels)
    started = time.process_time()
    for _ in range(calls):
        runtime.logits(pixels)
    return 1000 * (time.process_time() - started) / calls


@dataclass(frozen=True)
class Cost:
    """One operation of the request path, timed alone."""

    name: str
    micros: float  # CPU µs per call
    per_request: float  # calls per /predict request


def _cpu_micros(operation: Callable[[], object], calls: int) -> float:
    """Best of three: CPU µs per call (the machine's noise only ever adds time)."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(calls):
            operation()
        best = min(best, (time.process_time() - started) / calls)
    return 1e6 * best


def operation_costs(service: Any, image: bytes, batch: float, calls: int = 3000) -> list[Cost]:
    """Per-call CPU cost of the request path's pieces, and how often a ``/predict`` pays each.

    Args:
        service: The imported ``service`` module, its logging configured as in a worker.
        image: One encoded upload (a Fashion-MNIST PNG).
        batch: Mean images per model call under the load in question (``/metrics``'
            ``fashion_serve_batch_size``; about 16 at concurrency 64 with two workers).
        calls: Calls per timing.
    """
    import prometheus_client as prom

    from common.preprocess import decode_image, prepare_image

    registry = prom.CollectorRegistry()  # fresh names; values still go to the mmap files
    histogram = prom.Histogram("cost_seconds", "h", registry=registry)
    labelled = prom.Histogram("cost_labelled_seconds", "h", ["endpoint"], registry=registry)
    counter = prom.Counter("cost", "c", ["endpoint", "status"], registry=registry)
    gauge = prom.Gauge(
        "cost_gauge", "g", ["endpoint"], registry=registry, multiprocess_mode="livesum"
    )

    def in_progress() -> None:
        with gauge.labels(endpoint="/predict").track_inprogress():
            pass

    fields = {
        "request_id": "0" * 32,
        "endpoint": "/predict",
        "status": 200,
        "latency_ms": 1.234,
        "queue_ms": 0.5,
        "images": 1,
        "labels": ["Sneaker"],
        "confidences": [0.9876],
        "error_kind": None,
    }

    def request_log() -> None:  # what the gate writes after each response
        REQUEST_LOG.write("/predict 200 ok", dict(fields))

    runtime = served_runtime(service)
    one, many = runtime.blank(1), runtime.blank(max(1, round(batch)))
    spec = runtime.spec
    limits = runtime.limits
    return [
        Cost(
            "model call, 1 image", _cpu_micros(lambda: runtime.logits(one), calls // 10), 1 / batch
        ),
        Cost(
            f"model, per image in a batch of {len(many)}",
            _cpu_micros(lambda: runtime.logits(many), calls // 10) / len(many),
            1 - 1 / batch,
        ),
        Cost(
            "decode + prepare one PNG",
            _cpu_micros(
                lambda: prepare_image(
                    decode_image(image, limits.max_pixels, limits.draft_size), spec
                ),
                calls,
            ),
            1,
        ),
        # Ours per request: decode, preprocess, queue, latency, confidence; per batch: inference
        # time and batch size. BentoML's per request: duration (labelled); per batch: batch size.
        Cost(
            "Prometheus histogram observe",
            _cpu_micros(lambda: histogram.observe(0.003), calls),
            5 + 3 / batch,
        ),
        Cost(
            "Prometheus labelled histogram observe",
            _cpu_micros(lambda: labelled.labels(endpoint="/predict").observe(0.003), calls),
            1,
        ),
        # Ours: requests by status; predictions by class once per class per batch (≤ 1 each).
        # BentoML's: request total, and its last-request timestamp gauge (a labelled set).
        Cost(
            "Prometheus labelled counter inc",
            _cpu_micros(lambda: counter.labels(endpoint="/predict", status="200").inc(), calls),
            3 + min(1.0, 10 / batch),
        ),
        Cost("Prometheus in-progress gauge (BentoML)", _cpu_micros(in_progress, calls), 1),
        Cost(
            "request log line (the gate's, to the configured sinks)",
            _cpu_micros(request_log, calls),
            1,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure (and optionally profile) sequential ``/predict`` calls."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile_request", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile by phase")
    parser.add_argument("--top", type=int, default=0, help="also print the top N functions")
    parser.add_argument("--tiny", action="store_true", help="random simple_cnn in a temp store")
    parser.add_argument("--costs", action="store_true", help="also time each operation alone")
    parser.add_argument("--batch", type=float, default=16.0, help="mean batch size for --costs")
    args = parser.parse_args(argv)

    from bench.serving import load_images, make_tiny_model, multipart_body

    work = Path(tempfile.mkdtemp(prefix="profile-request-"))
    if args.tiny:
        os.environ["BENTOML_HOME"] = str(work / "bentoml_home")
        os.environ["FASHION_SERVE_SERVING__MODEL_TAG"] = make_tiny_model(work / "bentoml_home")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(work / "prometheus"))
    Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    # The service logs one JSON line per request; keep them off the terminal, still written.
    log = (work / "server.log").open("w")
    import service

    images, source = load_images(64)
    boundary = f"profile{uuid.uuid4().hex}"
    bodies = [multipart_body("image", [image], boundary) for image in images]
    content_type = f"multipart/form-data; boundary={boundary}"
    app = service.Classifier.to_asgi()  # type: ignore[attr-defined]
    stderr, sys.stderr = sys.stderr, log
    try:
        # CPU time, not wall time: other processes on a shared machine must not count.
        profile = cProfile.Profile(time.process_time) if args.profile else None
        measured = asyncio.run(
            drive(app, bodies, content_type, args.requests, args.warmup, profile)
        )
    finally:
        sys.stderr = stderr
    print(
        f"model: {service.SERVED_TAG} ({getattr(service.SETTINGS, 'backend', 'onnx')}); images: {source}"
    )
    print(
        f"/predict, one at a time, in process: {measured.cpu_ms:.3f} ms CPU and "
        f"{measured.wall_ms:.3f} ms wall per request ({measured.requests} requests)"
    )
    if profile is not None:
        stats = pstats.Stats(profile)
        table = phase_table(stats, args.requests)
        # The profiler inflates Python code, and its bookkeeping disturbs even the model call,
        # so the model is timed on its own (same session settings, one image, no profiler) and
        # the rest of the unprofiled CPU time is split by the Python phases' profiled shares.
        model_us = 1000 * model_cpu_ms(service)
        python = [(name, us) for name, us in table if not name.startswith("inference")]
        total = sum(us for _, us in python) or 1.0
        rest = max(0.0, 1000 * measured.cpu_ms - model_us)
        print(
            f"\nCPU per request by phase ({measured.cpu_ms:.3f} ms in all; the model timed alone,"
        )
        print("the rest split by the Python phases' shares of a CPU-time cProfile):")
        print(f"  {model_us:6.0f} µs  {model_us / (10 * measured.cpu_ms):3.0f}%  model call")
        for name, micros in python:
            real = rest * micros / total
            print(f"  {real:6.0f} µs  {real / (10 * measured.cpu_ms):3.0f}%  {name}")
        if args.top:
            stats.sort_stats("tottime").print_stats(args.top)
    if args.costs:
        # The request log lines go to the configured stream, as in a worker (part of their cost).
        costs = operation_costs(service, images[0], args.batch)
        print(
            f"\nEach operation alone (CPU µs, best of 3), per /predict at mean batch {args.batch:g}:"
        )
        for cost in costs:
            print(
                f"  {cost.micros:7.1f} µs × {cost.per_request:5.2f} = "
                f"{cost.micros * cost.per_request:6.1f} µs  {cost.name}"
            )
        print(f"  {sum(c.micros * c.per_request for c in costs):6.1f} µs per request in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
