"""Alerting end to end: the served model, the real Prometheus and Alertmanager, one alert delivered.

A tiny model is served by ``bentoml serve`` with its API key required on ``/metrics`` too (the
scrape sends it from a key file); :func:`scripts.monitoring.monitoring_stack` starts
Debian's ``prometheus`` and ``prometheus-alertmanager`` on free loopback ports with a 1 s scrape
and evaluation interval and the project's rules rendered from ``configs/alerts.yaml`` (with
``for: 0s`` and the error-rate rule counting 4xx, through the settings overrides). Requests that
are not images (4xx) are sent until Alertmanager's ``GET /api/v2/alerts`` holds
``FashionServeHighErrorRate``; the same run checks :func:`common.prometheus.query_range` against
the real Prometheus. Deadlines, not sleeps: a loaded 2-core machine only makes it slower.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.alerts import load_alert_settings
from common.prometheus import PrometheusError, Series, load_monitoring_settings, query_range
from scripts.monitoring import Stack, monitoring_stack
from serving.settings import load_serving_settings
from tests.serving_fixtures import PNG
from tests.serving_helpers import bentoml_serve, free_port, import_tiny, serve_env, tiny_model
from tests.test_notebooks import _execute, _outputs
from train.monitoring import render_prometheus_rules

pytestmark = pytest.mark.slow

DEADLINE_S = 90.0
ALERT = "FashionServeHighErrorRate"
#: Every rule fires as soon as its condition holds; the error-rate rule counts client errors too.
ALERT_OVERRIDES = {
    **{
        f"FASHION_SERVE_ALERTS__RULES__{rule}__FOR": "0s"
        for rule in ("ERROR_RATE", "P99_LATENCY", "DRIFT", "NO_TRAFFIC")
    },
    "FASHION_SERVE_ALERTS__RULES__ERROR_RATE__MIN_STATUS": "400",
    "FASHION_SERVE_ALERTS__RULES__ERROR_RATE__MIN_REQUESTS": "5",
    "FASHION_SERVE_ALERTS__PROMETHEUS__RATE_WINDOW": "20s",
}


@pytest.fixture(scope="module")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BentoML home (``bentoml/``) and the service's logs."""
    folder = tmp_path_factory.mktemp("alerting-service")
    import_tiny(tiny_model(seed=0), folder / "bentoml")
    return folder


@pytest.fixture(scope="module")
def key_file(service_dir: Path) -> Path:
    """The API key the service requires, in a file only Prometheus reads (as in production)."""
    path = service_dir / "api-key"
    path.write_text(secrets.token_urlsafe(24))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def service_url(service_dir: Path, key_file: Path) -> Iterator[str]:
    """The service with its API key on, /metrics included: the scrape must send it."""
    env = serve_env(
        service_dir / "bentoml", workers=1, auth={"enabled": True, "protect_metrics": True}
    )
    env[load_serving_settings(environ={}).auth.key_env] = key_file.read_text()
    with bentoml_serve(env, service_dir / "server.log") as url:
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
        yield url


@pytest.fixture(scope="module")
def client(service_url: str, key_file: Path) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {key_file.read_text()}"}
    with httpx.Client(base_url=service_url, headers=headers, timeout=30) as keyed:
        yield keyed


@pytest.fixture(scope="module")
def stack(
    service_url: str, key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("monitoring")
    target = service_url.removeprefix("http://")
    settings = load_monitoring_settings(
        environ={
            "FASHION_SERVE_MONITORING__DATA_DIR": str(folder),
            "FASHION_SERVE_MONITORING__SCRAPE__TARGET": target,
            "FASHION_SERVE_MONITORING__SCRAPE__INTERVAL": "1s",
            "FASHION_SERVE_MONITORING__SCRAPE__CREDENTIALS_FILE": str(key_file),
            "FASHION_SERVE_MONITORING__PROMETHEUS__PORT": str(free_port()),
            "FASHION_SERVE_MONITORING__ALERTMANAGER__PORT": str(free_port()),
            "FASHION_SERVE_MONITORING__ALERTMANAGER__GROUP_WAIT": "1s",
        }
    )
    rules = render_prometheus_rules(load_alert_settings(environ=ALERT_OVERRIDES))
    with monitoring_stack(settings, rules) as running:
        yield running


def alerts(stack: Stack) -> list[dict[str, Any]]:
    """What Alertmanager holds now (``GET /api/v2/alerts``)."""
    response = httpx.get(f"{stack.alertmanager_url}/api/v2/alerts", timeout=10)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def test_failing_requests_reach_alertmanager_as_the_error_rate_alert(
    client: httpx.Client, stack: Stack
) -> None:
    settings = load_alert_settings(environ=ALERT_OVERRIDES)
    deadline = time.monotonic() + DEADLINE_S
    received: list[dict[str, Any]] = []
    # Good and bad requests spread over several scrapes, so rate() sees the counters move.
    while time.monotonic() < deadline:
        statuses = [
            client.post("/predict", files={"image": ("x.png", body, "image/png")}).status_code
            for body in (PNG, b"not an image", b"not an image either")
        ]
        assert statuses[0] == 200 and all(400 <= s < 500 for s in statuses[1:]), statuses
        received = [a for a in alerts(stack) if a["labels"]["alertname"] == ALERT]
        if received:
            break
        time.sleep(0.5)
    assert received, f"{ALERT} did not reach Alertmanager in {DEADLINE_S:.0f} s"
    (alert,) = received
    assert alert["labels"] == {"alertname": ALERT, "severity": settings.rules.error_rate.severity}
    assert alert["annotations"]["summary"] == settings.rules.error_rate.summary
    assert alert["status"]["state"] == "active"


def test_query_range_reads_the_scraped_series(stack: Stack, client: httpx.Client) -> None:
    """The series notebook 03 reads: the service's request counter, as Prometheus stored it."""
    end = datetime.now(UTC)
    deadline = time.monotonic() + DEADLINE_S
    series: list[Series] = []
    while time.monotonic() < deadline and not series:
        client.post("/predict", files={"image": ("x.png", PNG, "image/png")})
        end = datetime.now(UTC)
        series = query_range(
            stack.prometheus_url,
            'fashion_serve_requests_total{status="200"}',
            end - timedelta(minutes=5),
            end,
            step_s=1,
        )
        time.sleep(0.5)
    assert series, "Prometheus holds no fashion_serve_requests_total series"
    (ok,) = series
    assert ok.labels["job"] == load_monitoring_settings().scrape.job
    assert ok.labels["endpoint"] == "/predict"
    assert ok.values[-1] >= 1
    assert ok.times == sorted(ok.times) and ok.times[-1] <= end + timedelta(seconds=1)
    with pytest.raises(PrometheusError, match="refused"):
        query_range(stack.prometheus_url, "sum(", end - timedelta(minutes=1), end, 1)


def test_dashboard_reads_prometheus_when_told_where(
    stack: Stack, client: httpx.Client, service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notebook 03 with ``PROMETHEUS_URL``: its Prometheus section plots the scraped series."""
    monkeypatch.setenv("PROMETHEUS_URL", stack.prometheus_url)
    monkeypatch.setenv("PROMETHEUS_RANGE", "10m")
    monkeypatch.setenv("BENTOML_HOME", str(service_dir / "bentoml"))
    monkeypatch.setenv("FASHION_SERVE_DASHBOARD_LOGS", str(service_dir / "service.*"))
    monkeypatch.setenv("FASHION_SERVE_DASHBOARD_PREDICTIONS", str(service_dir / "predictions.*"))
    # The service's /metrics wants the key, which the notebook does not send: a saved copy.
    metrics = service_dir / "metrics.txt"
    metrics.write_text(client.get("/metrics").text)
    monkeypatch.setenv("FASHION_SERVE_DASHBOARD_METRICS", str(metrics))
    notebook = _execute("03_monitoring_dashboard.ipynb", service_dir)
    text, errors = _outputs(notebook)
    assert errors == []
    requests = re.search(r"requests / s: 1 series, (\d+) points from Prometheus", text)
    assert requests and int(requests[1]) > 0, text[-3000:]
    assert "p99 latency (s): 1 series" in text
    assert "fashion_serve_requests" in text  # the saved /metrics was read too
