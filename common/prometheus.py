"""Prometheus and Alertmanager for the service: settings, their config files, series read back.

``configs/monitoring.yaml`` (:func:`load_monitoring_settings`) says where the service's
``/metrics`` is and where both servers listen; :func:`write_configs` turns it into
``prometheus.yml`` and ``alertmanager.yml`` beside the rules file (the rules themselves are
rendered from ``configs/alerts.yaml`` by :func:`train.monitoring.render_prometheus_rules`).
``scripts/monitoring.py`` (``make monitoring``) starts the two servers on them.
:func:`query_range` reads a series back over Prometheus's HTTP API (``/api/v1/query_range``), for
notebook 03 (which plots :func:`dashboard_queries` with it). Torch-free and BentoML-free; the HTTP client is the standard library's.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.alerts import duration_seconds
from common.settings import SettingsError, load_settings_file, resolve_path

MONITORING_ENV_PREFIX = "FASHION_SERVE_MONITORING__"
#: Both servers answer 200 here once they are ready.
READY_PATH = "/-/ready"
PROMETHEUS_CONFIG = "prometheus.yml"
ALERTMANAGER_CONFIG = "alertmanager.yml"
RULES_FILE = "alerts.yml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(value: str) -> str:
    duration_seconds(value)  # raises ValueError with the accepted forms
    return value


class ScrapeSettings(_Strict):
    """What Prometheus scrapes: the service's ``/metrics``."""

    target: str = Field(pattern=r"^[^\s/:]+:\d+$", description="host:port of the service")
    metrics_path: str = Field(pattern=r"^/")
    job: str = Field(min_length=1)
    interval: str
    credentials_file: Path | None = Field(
        None, description="A file holding the service's API key, sent as a bearer token."
    )

    _interval = field_validator("interval")(_duration)


class ListenSettings(_Strict):
    """One server's binary and loopback address."""

    binary: str = Field(min_length=1)
    host: str
    port: int = Field(ge=1, le=65535)

    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"


class PrometheusServerSettings(ListenSettings):
    retention: str

    _retention = field_validator("retention")(_duration)


class AlertmanagerSettings(ListenSettings):
    group_wait: str
    group_interval: str
    repeat_interval: str
    webhook_url: str | None = None

    _durations = field_validator("group_wait", "group_interval", "repeat_interval")(_duration)


class ComposeSettings(_Strict):
    """The names docker-compose.yaml's prometheus and alertmanager services see each other by."""

    scrape_target: str = Field(min_length=1)
    alertmanager_host: str = Field(min_length=1)
    alertmanager_port: int = Field(ge=1, le=65535)
    config_dir: PurePosixPath


class MonitoringSettings(_Strict):
    """``configs/monitoring.yaml``."""

    data_dir: Path
    scrape: ScrapeSettings
    prometheus: PrometheusServerSettings
    alertmanager: AlertmanagerSettings
    compose: ComposeSettings
    ready_timeout_s: float = Field(gt=0)
    stop_timeout_s: float = Field(gt=0)

    def data_path(self) -> Path:
        """``data_dir``, relative paths below the project root."""
        return resolve_path(self.data_dir)


def load_monitoring_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> MonitoringSettings:
    """``monitoring.yaml`` (or ``path``) with ``FASHION_SERVE_MONITORING__A__B=value`` overrides."""
    return load_settings_file(
        MonitoringSettings, "monitoring.yaml", MONITORING_ENV_PREFIX, path=path, environ=environ
    )


# --------------------------------------------------------------------------- config files


def prometheus_config(settings: MonitoringSettings, rules_file: PurePath) -> dict[str, Any]:
    """``prometheus.yml``: scrape the service, load ``rules_file``, alert to the Alertmanager."""
    scrape = settings.scrape
    alertmanager = settings.alertmanager
    job: dict[str, Any] = {
        "job_name": scrape.job,
        "metrics_path": scrape.metrics_path,
        "static_configs": [{"targets": [scrape.target]}],
    }
    if scrape.credentials_file is not None:
        # Prometheus reads the key itself at each scrape: it is never copied into its config.
        job["authorization"] = {
            "type": "Bearer",
            "credentials_file": str(resolve_path(scrape.credentials_file)),
        }
    return {
        "global": {"scrape_interval": scrape.interval, "evaluation_interval": scrape.interval},
        "rule_files": [str(rules_file)],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [f"{alertmanager.host}:{alertmanager.port}"]}]}
            ]
        },
        "scrape_configs": [job],
    }


def alertmanager_config(settings: MonitoringSettings) -> dict[str, Any]:
    """``alertmanager.yml``: one route grouping by alert name, to a webhook or to nobody."""
    alertmanager = settings.alertmanager
    receiver: dict[str, Any] = {"name": "default"}
    if alertmanager.webhook_url:
        receiver["webhook_configs"] = [{"url": alertmanager.webhook_url}]
    return {
        "route": {
            "receiver": "default",
            "group_by": ["alertname"],
            "group_wait": alertmanager.group_wait,
            "group_interval": alertmanager.group_interval,
            "repeat_interval": alertmanager.repeat_interval,
        },
        "receivers": [receiver],
    }


@dataclass(frozen=True)
class ConfigFiles:
    """The files :func:`write_configs` wrote, in ``folder``."""

    folder: Path
    prometheus: Path
    alertmanager: Path
    rules: Path


def write_configs(
    settings: MonitoringSettings, rules_text: str, rules_seen_at: PurePath | None = None
) -> ConfigFiles:
    """Write ``prometheus.yml``, ``alertmanager.yml`` and the rules into the data folder.

    ``rules_seen_at``: where Prometheus finds the rules file (default: where it is written).
    """
    folder = settings.data_path()
    folder.mkdir(parents=True, exist_ok=True)
    files = ConfigFiles(
        folder, folder / PROMETHEUS_CONFIG, folder / ALERTMANAGER_CONFIG, folder / RULES_FILE
    )
    files.rules.write_text(rules_text)
    header = "# Generated from configs/monitoring.yaml by scripts/monitoring.py; do not edit.\n"
    for path, content in (
        (files.prometheus, prometheus_config(settings, rules_seen_at or files.rules)),
        (files.alertmanager, alertmanager_config(settings)),
    ):
        path.write_text(header + yaml.safe_dump(content, sort_keys=False))
    return files


def write_compose_configs(settings: MonitoringSettings, rules_text: str) -> ConfigFiles:
    """The configs of docker-compose.yaml's services, in ``<data_dir>/compose``.

    Same rules and settings as ``make monitoring``, with the compose network's names and the
    rules at ``compose.config_dir`` inside the containers.

    Raises:
        SettingsError: ``scrape.credentials_file`` is set (a host path no container sees).
    """
    compose = settings.compose
    if settings.scrape.credentials_file is not None:
        raise SettingsError(
            "scrape.credentials_file is a host path: the compose services cannot read it "
            "(turn auth.protect_metrics off for compose, or mount the key and edit the config)"
        )
    inside = settings.model_copy(
        update={
            "data_dir": settings.data_path() / "compose",
            "scrape": settings.scrape.model_copy(update={"target": compose.scrape_target}),
            "alertmanager": settings.alertmanager.model_copy(
                update={"host": compose.alertmanager_host, "port": compose.alertmanager_port}
            ),
        }
    )
    return write_configs(inside, rules_text, compose.config_dir / RULES_FILE)


def prometheus_command(settings: MonitoringSettings, files: ConfigFiles) -> list[str]:
    """``prometheus`` on the config, its TSDB in the data folder (listen flags come separately)."""
    return [
        settings.prometheus.binary,
        f"--config.file={files.prometheus}",
        f"--storage.tsdb.path={files.folder / 'prometheus'}",
        f"--storage.tsdb.retention.time={settings.prometheus.retention}",
    ]


def alertmanager_command(settings: MonitoringSettings, files: ConfigFiles) -> list[str]:
    """``prometheus-alertmanager`` on the config; no cluster port (one instance, loopback)."""
    return [
        settings.alertmanager.binary,
        f"--config.file={files.alertmanager}",
        f"--storage.path={files.folder / 'alertmanager'}",
        "--cluster.listen-address=",
    ]


def listen_flag(host: str, port: int) -> list[str]:
    """``--web.listen-address=host:port``: how both servers are told where to listen."""
    return [f"--web.listen-address={host}:{port}"]


# --------------------------------------------------------------------------- reading series


class PrometheusError(RuntimeError):
    """Prometheus did not answer, or refused the query (one line: the URL and its reason)."""


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and its samples."""

    labels: dict[str, str]
    times: list[datetime]
    values: list[float]


def dashboard_queries(rate_window: str, selector: str = "") -> dict[str, str]:
    """PromQL of the service's health over time (notebook 03), by title.

    Args:
        rate_window: The ``rate()`` window (the alert rules use ``prometheus.rate_window``).
        selector: Label matchers added to every selector, e.g. ``job="fashion-serve"``.
    """
    every = "{" + selector + "}" if selector else ""
    failed = "{" + ",".join(m for m in (selector, 'status=~"5.."') if m) + "}"
    requests = f"sum(rate(fashion_serve_requests_total{every}[{rate_window}]))"
    return {
        "requests / s": requests,
        "5xx share": f"sum(rate(fashion_serve_requests_total{failed}[{rate_window}])) / {requests}",
        "p99 latency (s)": "histogram_quantile(0.99, sum by (le) "
        f"(rate(fashion_serve_request_seconds_bucket{every}[{rate_window}])))",
        "max drift PSI": f"max(fashion_serve_drift_psi{every})",
    }


def query_range(
    base_url: str,
    query: str,
    start: datetime,
    end: datetime,
    step_s: float,
    timeout_s: float = 10.0,
) -> list[Series]:
    """``GET /api/v1/query_range``: every series of ``query`` between ``start`` and ``end``.

    Raises:
        PrometheusError: the server cannot be reached, or answers with an error (e.g. bad PromQL).
    """
    if not base_url.startswith(("http://", "https://")):
        raise PrometheusError(f"{base_url!r} is not an http(s) URL")
    params = urllib.parse.urlencode(
        {"query": query, "start": start.timestamp(), "end": end.timestamp(), "step": step_s}
    )
    url = f"{base_url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as exc:
        # Prometheus explains a refused query in the JSON body of its 400/422.
        try:
            reason = json.load(exc).get("error", exc.reason)
        except (ValueError, AttributeError):
            reason = exc.reason
        raise PrometheusError(f"{base_url} refused {query!r}: {reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrometheusError(f"cannot query {base_url}: {exc}") from exc
    if body.get("status") != "success" or body.get("data", {}).get("resultType") != "matrix":
        raise PrometheusError(f"{base_url} answered {query!r} with {str(body)[:200]}")
    return [
        Series(
            labels=dict(item["metric"]),
            times=[datetime.fromtimestamp(float(t), UTC) for t, _ in item["values"]],
            values=[float(v) for _, v in item["values"]],
        )
        for item in body["data"]["result"]
    ]
