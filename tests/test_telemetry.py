"""JSON logs, batched log files, the request line, prediction data and the drift gauge (serving/telemetry.py)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loguru import logger

import service
from serving import telemetry
from serving.runtime import ModelRuntime
from serving.schema import (
    Exchange,
)
from serving.settings import (
    LoggingSettings,
)
from serving.telemetry import LINES, REQUEST_LOG, PredictionRecorder, configure_logging, flush_logs
from serving.uploads import Upload
from tests import serving_helpers
from tests.serving_fixtures import bento_home as bento_home
from tests.serving_fixtures import image_bytes
from tests.serving_fixtures import log_files as log_files
from tests.serving_fixtures import restore_logging as restore_logging
from tests.serving_fixtures import svc as svc
from tests.serving_fixtures import tiny_model as tiny_model

CLASSES = serving_helpers.TINY_CLASSES


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


def test_requests_answered_in_one_loop_turn_are_recorded_together(
    svc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """On the event loop, prediction data and drift wait for the next turn, then go in one write."""
    import asyncio

    from common.drift import DriftMonitor, build_reference

    logging_settings = service.SETTINGS.logging
    configure_logging(
        logging_settings.model_copy(
            update={
                "stream": "none",
                "file": logging_settings.file.model_copy(update={"enabled": False}),
                "predictions": logging_settings.predictions.model_copy(
                    update={"path": str(tmp_path / "predictions.{worker}.jsonl")}
                ),
            }
        ),
        worker="worker-6",
    )

    runtime: ModelRuntime = svc.runtime
    recorder: PredictionRecorder = svc.recorder
    pixels = runtime.prepare([Upload("image", "a.png", image_bytes(seed=3))], "image", [])
    probabilities = np.array([list(p.scores.values()) for p in runtime.predict(pixels)])
    reference = build_reference(
        probabilities, np.zeros(1, dtype=np.int64), pixels, CLASSES, {"28x28": 1}, "one", 1
    )
    drift = DriftMonitor(reference, service.ALERTS.drift)
    writes: list[int] = []
    add_many = drift.add_many

    def counted_add_many(class_ids: list[int], *rest: Any) -> None:
        writes.append(len(class_ids))
        add_many(class_ids, *rest)

    monkeypatch.setattr(drift, "add_many", counted_add_many)
    shades = [0.0, 128.0, 255.0]

    async def answer_three() -> tuple[list[int], list[int]]:
        for index, shade in enumerate(shades):
            exchange = Exchange(
                f"turn-{index}", "/predict", np.full_like(pixels, shade), [(28, 28)]
            )
            exchange.predictions = runtime.predict(exchange.pixels)
            exchange.handed = exchange.predictions[0]._batch_started
            recorder.record(exchange)
        held = list(writes)
        await asyncio.sleep(0)  # the loop's next turn
        return held, list(writes)

    recorder.drift = drift
    try:
        held, written = asyncio.run(answer_three())
    finally:
        recorder.drift = None
    assert held == []  # nothing recorded inside the turn that answered the requests
    assert written == [3]  # then all three in one drift write
    flush_logs()
    lines = (tmp_path / "predictions.worker-6.jsonl").read_text().splitlines()
    mine = {entry["request_id"]: entry for entry in map(json.loads, lines)}
    assert sorted(mine) == ["turn-0", "turn-1", "turn-2"]
    # Each request keeps its own image's brightness, though they were computed together.
    assert [round(mine[f"turn-{i}"]["brightness"], 3) for i in range(3)] == [
        round(shade / 255.0, 3) for shade in shades
    ]
