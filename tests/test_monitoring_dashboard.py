"""End to end: a served model with a reference, normal then drifted traffic, the alerts and notebook 03.

A tiny 10-class model (random weights) is imported with its reference distribution computed on
the validation split of the generated Fashion-MNIST-like data, served by ``bentoml serve`` with
its log files in ``tmp_path``, and fed by ``scripts/monitoring_traffic.py``: normal test images
first (the drift alert must stay quiet), then inverted ones (it must fire, in
``python -m train alerts``, in the ``fashion_serve_drift_psi`` gauge and in the notebook).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from common.alerts import load_alert_settings
from common.drift import Reference
from common.model_format import REFERENCE_FILE
from common.preprocess import PreprocessSpec, to_model_input
from serving.bentoml_bridge import model_store_at
from tests.conftest import MakeFmnist, MakeSettings
from tests.serving_helpers import bentoml_serve
from tests.test_notebooks import _execute, _image_count, _outputs
from train.config import ModelConfig
from train.data import FASHION_MNIST_CLASSES
from train.export import import_to_bento, reference_input

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SPEC = PreprocessSpec()
NORMAL = 80
DRIFTED = 80
MIN_PREDICTIONS = 50


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def wait_for_lines(pattern: str, folder: Path, count: int) -> list[dict[str, Any]]:
    """The JSON lines of ``folder/pattern`` once there are ``count`` (writes are queued)."""
    deadline = time.monotonic() + 30
    entries: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        entries = [
            json.loads(line)
            for path in folder.glob(pattern)
            for line in path.read_text().splitlines()
            if line.startswith("{")
        ]
        if len(entries) >= count:
            break
        time.sleep(0.2)
    return entries


def test_drift_raises_the_alert_and_the_dashboard_shows_it(
    tmp_path: Path,
    make_fmnist: MakeFmnist,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_fmnist(tmp_path / "fmnist-large", train_per_class=40, test_per_class=20)
    data_overrides = [
        f"data.path={data}",
        f"data.debian_path={tmp_path / 'no-debian'}",
        "data.allow_download=false",
        "data.val_fraction=0.25",
    ]
    settings = make_settings(*data_overrides)
    reference_data = reference_input(settings, SPEC, len(FASHION_MNIST_CLASSES))
    assert reference_data is not None and len(reference_data.labels) == 100

    torch.manual_seed(0)
    from train.models import build_model

    model = build_model(ModelConfig(name="resnet_small", width=4), SPEC, num_classes=10).eval()
    home = tmp_path / "bentoml"
    rng = np.random.default_rng(0)
    parity = to_model_input(list(rng.integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)))
    lineage = {
        "registered_name": "fashion-classifier",
        "version": "1",
        "alias": "champion",
        "run_id": "r1",
    }
    with model_store_at(home):
        tag = import_to_bento(
            model,
            list(FASHION_MNIST_CLASSES),
            SPEC,
            lineage,
            parity,
            settings.export,
            reference_data,
        )
    model_dir = home / "models" / tag.name / str(tag.version)
    reference_file = model_dir / REFERENCE_FILE
    reference = Reference.load(reference_file)
    assert reference.images == 100 and reference.label_mix["Trouser"] == pytest.approx(0.1)
    metadata = yaml.safe_load((model_dir / "model.yaml").read_text())["metadata"]
    assert metadata["monitoring"]["reference"] == REFERENCE_FILE

    logs = tmp_path / "logs"
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "FASHION_SERVE_SERVING__WORKERS": "1",
        "FASHION_SERVE_SERVING__LOGGING__FILE__PATH": str(logs / "service.{worker}.jsonl"),
        "FASHION_SERVE_SERVING__LOGGING__PREDICTIONS__PATH": str(
            logs / "predictions.{worker}.jsonl"
        ),
        "FASHION_SERVE_ALERTS__DRIFT__EVERY": "10",
        # The tiny model's features sit in one or two bins each, so few predictions suffice.
        "FASHION_SERVE_ALERTS__RULES__DRIFT__MIN_PREDICTIONS": str(MIN_PREDICTIONS),
    }
    alerts = [
        "-m",
        "train",
        "alerts",
        "--logs",
        str(logs / "service.*"),
        "--predictions",
        str(logs / "predictions.*"),
        "--reference",
        str(reference_file),
    ]
    traffic = [str(ROOT / "scripts" / "monitoring_traffic.py"), "--concurrency", "4"]
    psi_threshold = load_alert_settings().rules.drift.psi_threshold
    with bentoml_serve(env, tmp_path / "server.log") as url:
        normal = run(
            *traffic, "--url", url, "--images", str(NORMAL), "--drifted", "0", "--bad", "4",
            *data_overrides, env=env,
        )  # fmt: skip
        assert normal.returncode == 0, normal.stdout + normal.stderr
        assert "bad: 4 requests (400: 2, 415: 2)" in normal.stdout
        assert len(wait_for_lines("predictions.*", logs, NORMAL)) == NORMAL
        calm = run(*alerts, env=env)
        assert "ok     drift: max PSI" in calm.stdout, calm.stdout + calm.stderr

        metrics_file = tmp_path / "metrics.txt"
        shifted = run(
            *traffic, "--url", url, "--images", "0", "--drifted", str(DRIFTED), "--bad", "0",
            "--metrics-out", str(metrics_file), *data_overrides, env=env,
        )  # fmt: skip
        assert shifted.returncode == 0, shifted.stdout + shifted.stderr
        assert len(wait_for_lines("predictions.*", logs, NORMAL + DRIFTED)) == NORMAL + DRIFTED
        fired = run(*alerts, env=env)
        assert fired.returncode == 1, fired.stdout + fired.stderr
        assert "FIRING drift: max PSI" in fired.stdout

    metrics = metrics_file.read_text()
    gauge = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('fashion_serve_drift_psi{feature="brightness"}')
    ]
    assert gauge and gauge[0] > psi_threshold
    assert "fashion_serve_queue_seconds_count" in metrics
    assert 'fashion_serve_requests_total{endpoint="/predict",status="415"}' in metrics

    requests = wait_for_lines("service.worker-1.jsonl", logs, 1)
    served = [e for e in requests if e.get("logger") == "fashion_serve.request"]
    assert len(served) >= NORMAL // 2
    ok = next(e for e in served if e["status"] == 200)
    assert ok["queue_ms"] >= 0 and ok["latency_ms"] >= ok["queue_ms"]
    line = wait_for_lines("predictions.worker-1.jsonl", logs, 1)[0]
    assert set(line) == {
        "time", "request_id", "endpoint", "label", "class_id", "confidence", "margin",
        "brightness", "width", "height",
    }  # fmt: skip
    assert (line["width"], line["height"]) == (28, 28)

    monkeypatch.setenv("FASHION_SERVE_ALERTS__RULES__DRIFT__MIN_PREDICTIONS", str(MIN_PREDICTIONS))
    monkeypatch.setenv("FASHION_SERVE_DASHBOARD_LOGS", str(logs / "service.*"))
    monkeypatch.setenv("FASHION_SERVE_DASHBOARD_PREDICTIONS", str(logs / "predictions.*"))
    monkeypatch.setenv("FASHION_SERVE_DASHBOARD_METRICS", str(metrics_file))
    monkeypatch.setenv("FASHION_SERVE_DASHBOARD_REFERENCE", str(reference_file))
    monkeypatch.delenv("PROMETHEUS_URL", raising=False)  # its section says so and is skipped
    notebook = _execute("03_monitoring_dashboard.ipynb", tmp_path)
    text, errors = _outputs(notebook)
    assert errors == []
    assert "PROMETHEUS_URL is not set" in text
    assert f"{NORMAL + DRIFTED} predictions" in text
    assert "FIRING drift: max PSI" in text
    assert "fashion_serve_queue_seconds" in text and "fashion_serve_drift_psi" in text
    assert "training (true labels)" in text
    assert _image_count(notebook) >= 4
