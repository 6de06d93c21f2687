"""Prometheus and Alertmanager settings, their generated configs, query_range, make monitoring's script.

The configs are checked by the servers' own tools (``promtool``, ``amtool``); ``query_range`` runs
against a stub HTTP server here (the real Prometheus is in ``test_alerting_e2e.py``); the script
is run as ``make monitoring`` runs it, and stopped with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from common.alerts import load_alert_settings
from common.prometheus import (
    MonitoringSettings,
    PrometheusError,
    dashboard_queries,
    load_monitoring_settings,
    query_range,
    write_configs,
)
from common.settings import SettingsError
from scripts import monitoring
from serving.launch import free_port
from tests.serving_helpers import QuietHandler, stub_http_server
from train.monitoring import render_prometheus_rules

ROOT = Path(__file__).resolve().parent.parent


def check_with(*command: str) -> subprocess.CompletedProcess[str]:
    """Run a Prometheus/Alertmanager config checker; it must accept the file."""
    checked = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return checked


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: make test-deps installs prometheus-alertmanager")
    return path


def settings_in(folder: Path, **overrides: str) -> MonitoringSettings:
    environ = {
        "FASHION_SERVE_MONITORING__DATA_DIR": str(folder),
        "FASHION_SERVE_MONITORING__PROMETHEUS__PORT": str(free_port()),
        "FASHION_SERVE_MONITORING__ALERTMANAGER__PORT": str(free_port()),
    }
    environ.update({f"FASHION_SERVE_MONITORING__{k.upper()}": v for k, v in overrides.items()})
    return load_monitoring_settings(environ=environ)


def rules_text() -> str:
    return render_prometheus_rules(load_alert_settings())


# --------------------------------------------------------------------------- settings, configs


def test_settings_defaults_and_errors() -> None:
    settings = load_monitoring_settings(environ={})
    assert settings.data_path() == ROOT / ".monitoring"
    assert settings.prometheus.url() == f"http://127.0.0.1:{settings.prometheus.port}"
    with pytest.raises(SettingsError, match=r"scrape\.interval.*duration"):
        load_monitoring_settings(environ={"FASHION_SERVE_MONITORING__SCRAPE__INTERVAL": "soon"})
    with pytest.raises(SettingsError, match=r"scrape\.target"):
        load_monitoring_settings(environ={"FASHION_SERVE_MONITORING__SCRAPE__TARGET": "http://x"})


def test_generated_configs_pass_promtool_and_amtool(tmp_path: Path) -> None:
    settings = settings_in(
        tmp_path,
        scrape__target="127.0.0.1:3001",
        alertmanager__webhook_url="http://127.0.0.1:9/hook",
    )
    files = write_configs(settings, rules_text())
    prometheus = yaml.safe_load(files.prometheus.read_text())
    assert prometheus["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:3001"]}]
    assert prometheus["rule_files"] == [str(files.rules)]
    alertmanager = yaml.safe_load(files.alertmanager.read_text())
    assert alertmanager["receivers"] == [
        {"name": "default", "webhook_configs": [{"url": "http://127.0.0.1:9/hook"}]}
    ]
    checked = check_with(tool("promtool"), "check", "config", str(files.prometheus))
    assert "SUCCESS: 4 rules found" in checked.stdout  # the rules file was loaded too
    assert "authorization" not in prometheus["scrape_configs"][0]
    check_with(tool("amtool"), "check-config", str(files.alertmanager))


def test_a_protected_metrics_endpoint_gets_the_key_from_its_file(tmp_path: Path) -> None:
    """Prometheus is told where the key is; the key itself stays out of every generated file."""
    key = tmp_path / "api-key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    settings = settings_in(tmp_path / "data", scrape__credentials_file=str(key))
    files = write_configs(settings, rules_text())
    (job,) = yaml.safe_load(files.prometheus.read_text())["scrape_configs"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": str(key)}
    assert all("k" * 32 not in path.read_text() for path in files.folder.glob("*.yml"))
    check_with(tool("promtool"), "check", "config", str(files.prometheus))


def test_compose_configs_use_the_compose_names_and_the_mounted_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docker-compose.yaml's services get the same rules, pointed at api:3000 and alertmanager."""
    monkeypatch.setenv("FASHION_SERVE_MONITORING__DATA_DIR", str(tmp_path))
    assert monitoring.main(["compose-config"]) == 0
    assert "wrote" in capsys.readouterr().out
    folder = tmp_path / "compose"
    settings = load_monitoring_settings(environ={})
    prometheus = yaml.safe_load((folder / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"] == [{"targets": [settings.compose.scrape_target]}]
    (targets,) = prometheus["alerting"]["alertmanagers"]
    assert targets["static_configs"] == [
        {"targets": [f"{settings.compose.alertmanager_host}:{settings.compose.alertmanager_port}"]}
    ]
    mounted = settings.compose.config_dir
    assert prometheus["rule_files"] == [str(mounted / "alerts.yml")]
    assert (folder / "alerts.yml").read_text() == rules_text()
    # The compose file mounts this folder at config_dir and runs the servers on these files.
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"]
    for name, config in (("prometheus", "prometheus.yml"), ("alertmanager", "alertmanager.yml")):
        service = compose[name]
        assert f"./{settings.data_dir}/compose:{mounted}:ro" in service["volumes"]
        assert f"--config.file={mounted / config}" in service["command"]
    assert compose["prometheus"]["command"][0] == settings.prometheus.binary
    assert compose["alertmanager"]["command"][0] == settings.alertmanager.binary
    # promtool checks the config with the rules where this machine has them.
    prometheus["rule_files"] = [str(folder / "alerts.yml")]
    local = tmp_path / "prometheus-local.yml"
    local.write_text(yaml.safe_dump(prometheus))
    checked = check_with(tool("promtool"), "check", "config", str(local))
    assert "SUCCESS: 4 rules found" in checked.stdout
    check_with(tool("amtool"), "check-config", str(folder / "alertmanager.yml"))


def test_compose_configs_refuse_a_host_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASHION_SERVE_MONITORING__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FASHION_SERVE_MONITORING__SCRAPE__CREDENTIALS_FILE", str(tmp_path / "key"))
    assert monitoring.main(["compose-config"]) == 2
    assert capsys.readouterr().err.startswith("error: scrape.credentials_file is a host path")


# --------------------------------------------------------------------------- query_range


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule); the selector reaches every metric."""
    queries = dashboard_queries("5m", 'job="fashion-serve"')
    assert all(
        expr.count("fashion_serve_") == expr.count('job="fashion-serve"')
        for expr in queries.values()
    )
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(queries.values())
    ]
    (tmp_path / "queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    checked = check_with(tool("promtool"), "check", "rules", str(tmp_path / "queries.yml"))
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout


@pytest.fixture
def stub_prometheus() -> Iterator[tuple[str, list[dict[str, list[str]]]]]:
    """A loopback server answering ``/api/v1/query_range`` like Prometheus; (URL, queries seen)."""
    from urllib.parse import parse_qs, urlparse

    seen: list[dict[str, list[str]]] = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server calls it by this name)
            params = parse_qs(urlparse(self.path).query)
            seen.append(params)
            query = params["query"][0]
            status, body = 200, {"status": "success", "data": {"resultType": "matrix"}}
            if query == "up":
                body["data"]["result"] = [  # type: ignore[index]
                    {"metric": {"job": "a"}, "values": [[1700000000, "1"], [1700000015, "0.5"]]}
                ]
            elif query == "scalar(1)":
                body["data"] = {"resultType": "scalar", "result": [1700000000, "1"]}
            elif query == "behind a proxy":
                self.send_error(502, "Bad Gateway")  # an HTML page, not Prometheus's JSON
                return
            else:
                status, body = 400, {"status": "error", "error": "parse error at char 5"}
            encoded = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(encoded)))
            self.end_headers()
            self.wfile.write(encoded)

    with stub_http_server(Handler) as url:
        yield url, seen


def test_query_range_parses_series_and_sends_the_window(
    stub_prometheus: tuple[str, list[dict[str, Any]]],
) -> None:
    url, seen = stub_prometheus
    end = datetime(2026, 1, 1, tzinfo=UTC)
    (series,) = query_range(url + "/", "up", end - timedelta(minutes=5), end, step_s=15)
    assert series.labels == {"job": "a"}
    assert series.values == [1.0, 0.5]
    assert series.times[1] - series.times[0] == timedelta(seconds=15)
    assert float(seen[0]["end"][0]) == end.timestamp()
    assert float(seen[0]["start"][0]) == end.timestamp() - 300
    assert seen[0]["step"] == ["15"]


def test_query_range_errors_are_one_line(stub_prometheus: tuple[str, list[Any]]) -> None:
    url, _ = stub_prometheus
    end = datetime.now(UTC)
    start = end - timedelta(minutes=1)
    with pytest.raises(PrometheusError, match="refused 'sum\\(': parse error at char 5"):
        query_range(url, "sum(", start, end, 1)
    with pytest.raises(PrometheusError, match="answered 'scalar\\(1\\)' with"):
        query_range(url, "scalar(1)", start, end, 1)
    with pytest.raises(PrometheusError, match="refused 'behind a proxy': Bad Gateway"):
        query_range(url, "behind a proxy", start, end, 1)
    with pytest.raises(PrometheusError, match="cannot query"):
        query_range(f"http://127.0.0.1:{free_port()}", "up", start, end, 1, timeout_s=2)
    with pytest.raises(PrometheusError, match="not an http"):
        query_range("file:///etc/passwd", "up", start, end, 1)


# --------------------------------------------------------------------------- the script


def test_config_command_writes_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASHION_SERVE_MONITORING__DATA_DIR", str(tmp_path))
    assert monitoring.main(["config"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "alerts.yml").read_text() == rules_text()
    assert (tmp_path / "prometheus.yml").exists() and (tmp_path / "alertmanager.yml").exists()


def test_missing_binary_or_bad_setting_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASHION_SERVE_MONITORING__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FASHION_SERVE_MONITORING__ALERTMANAGER__BINARY", "no-such-alertmanager")
    assert monitoring.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no-such-alertmanager not found: apt-get install") and (
        err.count("\n") == 1
    )
    monkeypatch.setenv("FASHION_SERVE_MONITORING__PROMETHEUS__PORT", "0.5")
    assert monitoring.main(["config"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid monitoring config")


def test_a_server_that_cannot_listen_fails_the_start(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    with socket.socket() as taken:  # Alertmanager's port is in use
        taken.bind((settings.alertmanager.host, settings.alertmanager.port))
        taken.listen()
        with (
            pytest.raises(monitoring.MonitoringError, match="alertmanager did not start"),
            monitoring.monitoring_stack(settings, rules_text()),
        ):
            pass
    assert "address already in use" in (tmp_path / "alertmanager.log").read_text()


@pytest.mark.slow
def test_make_monitoring_runs_until_ctrl_c(tmp_path: Path) -> None:
    """``python scripts/monitoring.py``: both servers ready, then Ctrl-C stops both, exit 0."""
    settings = settings_in(tmp_path)
    env = {
        **os.environ,
        "FASHION_SERVE_MONITORING__DATA_DIR": str(tmp_path),
        "FASHION_SERVE_MONITORING__PROMETHEUS__PORT": str(settings.prometheus.port),
        "FASHION_SERVE_MONITORING__ALERTMANAGER__PORT": str(settings.alertmanager.port),
    }
    process = subprocess.Popen(
        [sys.executable, "scripts/monitoring.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops both" in line:
                break
        assert any("Ctrl-C stops both" in line for line in lines), lines
        for url in (settings.prometheus.url(), settings.alertmanager.url()):
            assert httpx.get(f"{url}/-/ready", timeout=10).status_code == 200
        rules = httpx.get(f"{settings.prometheus.url()}/api/v1/rules", timeout=10).json()
        names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert "FashionServeHighErrorRate" in names
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopping prometheus and alertmanager" in out
    for url in (settings.prometheus.url(), settings.alertmanager.url()):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/-/ready", timeout=2)
