"""What the monitoring costs the service per request, measured on the service's own functions.

``python -m bench.monitoring_overhead [--requests 2000] [--images 1 8 64]``

No server and no model: the functions ``service.py`` runs after each response are called in a
loop with made-up 10-class predictions, and the time the calling thread (the event loop, in the
server) spends is printed in microseconds per request:

* the per-request JSON log line with no sink, with the stream sink (to ``/dev/null``), and with
  the stream plus the per-worker file sink, written line by line in the request
  (``flush_interval_s: 0``) or kept in memory for the batched writer (the default; the batch
  writes themselves happen on the writer thread once per interval and are not in the figure);
* :meth:`serving.telemetry.PredictionRecorder.record` for requests of ``--images`` images: queue-time metric only,
  plus the prediction-data lines, plus the drift window;
* one recomputation of the drift gauge over a full window (every ``drift.every`` predictions).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from loguru import logger

import service
from common.drift import DriftMonitor, build_reference
from serving.schema import Exchange, Prediction
from serving.telemetry import PredictionRecorder, configure_logging, flush_logs, service_metrics

CLASSES = [f"class-{i}" for i in range(10)]


def per_call_us(action: Callable[[], object], calls: int, repeats: int = 3) -> float:
    """Best of ``repeats`` runs of ``calls`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            action()
        best = min(best, time.perf_counter() - started)
        flush_logs()  # batched lines are written outside the timed part
    return best / calls * 1e6


def predictions(count: int, rng: np.random.Generator) -> list[Prediction]:
    probabilities = rng.dirichlet(np.full(10, 0.3), size=count)
    made = []
    for row in probabilities.tolist():
        class_id = int(np.argmax(row))
        prediction = Prediction(
            label=CLASSES[class_id],
            class_id=class_id,
            confidence=row[class_id],
            scores=dict(zip(CLASSES, row, strict=True)),
        )
        prediction._batch_started = time.perf_counter()
        made.append(prediction)
    return made


@contextlib.contextmanager
def sinks(
    folder: Path, stream: str, files: bool, flush_interval_s: float | None = None
) -> Iterator[None]:
    """Configure the service's logging like a worker does, into ``folder``; stdout to /dev/null."""
    logging = service.SETTINGS.logging
    settings = logging.model_copy(
        update={
            "stream": stream,
            "file": logging.file.model_copy(
                update={"enabled": files, "path": str(folder / "service.{worker}.jsonl")}
                | ({} if flush_interval_s is None else {"flush_interval_s": flush_interval_s})
            ),
            "predictions": logging.predictions.model_copy(
                update={"enabled": files, "path": str(folder / "predictions.{worker}.jsonl")}
                | ({} if flush_interval_s is None else {"flush_interval_s": flush_interval_s})
            ),
        }
    )
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        configure_logging(settings)
        try:
            yield
        finally:
            flush_logs()
            logger.remove()


def request_line() -> None:
    """The gate's per-request log call, with typical fields."""
    logger.bind(
        logger="fashion_serve.request",
        request_id="0123456789abcdef0123456789abcdef",
        endpoint="/predict",
        status=200,
        latency_ms=4.321,
        queue_ms=1.234,
        images=1,
        labels=["class-1"],
        confidences=[0.9876],
        error_kind=None,
    ).info("{} {} {}", "/predict", 200, "ok")


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    drift_settings = service.ALERTS.drift
    reference_pixels = rng.integers(0, 256, size=(2000, 1, 28, 28)).astype(np.float32)
    reference = build_reference(
        rng.dirichlet(np.full(10, 0.3), size=2000),
        rng.integers(0, 10, size=2000),
        reference_pixels,
        CLASSES,
        {"28x28": 2000},
        "random",
        2000,
    )
    metrics = service_metrics()
    # Rows are printed at the end: stdout is /dev/null while the stream sink is configured.
    rows = [f"µs per request in the calling thread (best of 3 × {args.requests}):"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, stream, files, interval in (
            ("request log line, no sink", "none", False, None),
            ("request log line, stdout", "stdout", False, None),
            ("request log line, stdout + file (line by line)", "stdout", True, 0.0),
            ("request log line, stdout + file (batched, 1 s)", "stdout", True, 1.0),
        ):
            with sinks(folder, stream, files, interval):
                rows.append(f"  {label:<52} {per_call_us(request_line, args.requests):8.1f}")
        with sinks(folder, "none", True):
            for count in args.images:
                pixels = rng.integers(0, 256, size=(count, 1, 28, 28)).astype(np.float32)
                exchange = Exchange("r" * 32, "/batch_predict", pixels, [(28, 28)] * count)
                exchange.predictions = predictions(count, rng)
                for label, data, with_drift in (
                    ("queue metric only", False, False),
                    ("+ prediction-data lines", True, False),
                    ("+ prediction-data lines + drift window", True, True),
                ):
                    recorder = PredictionRecorder(
                        metrics,
                        prediction_data=data,
                        drift=DriftMonitor(reference, drift_settings) if with_drift else None,
                    )
                    cost = per_call_us(
                        functools.partial(recorder.record, exchange),
                        max(1, args.requests // count),
                    )
                    rows.append(
                        f"  record_predictions, {count:>2} image(s): {label:<26} {cost:8.1f}"
                    )
    full = DriftMonitor(reference, drift_settings)
    for value in rng.uniform(0, 1, size=drift_settings.window):
        full.add(int(value * 10), float(value), float(value) / 2, float(value))
    cost = per_call_us(full.scores, 200)
    rows.append(
        f"  drift gauge recomputation ({drift_settings.window} predictions, "
        f"every {drift_settings.every} predictions): {cost:8.1f}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
