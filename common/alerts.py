"""Alert settings (``configs/alerts.yaml``): the rules, the drift window, the Prometheus rendering.

Serving reads the drift part for its gauges; ``python -m train alerts`` / ``alert-rules``
(:mod:`train.monitoring`) evaluate and render the rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.drift import DriftSettings
from common.settings import load_settings_file

ALERTS_ENV_PREFIX = "FASHION_SERVE_ALERTS__"
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- alert settings


def duration_seconds(value: str) -> int:
    """``"15m"`` -> 900 (units s, m, h, d)."""
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration like 30s, 15m, 1h or 1d")
    return int(match[1]) * _UNIT_SECONDS[match[2]]


Duration = str


class AlertRule(_Strict):
    for_: Duration = Field(alias="for", pattern=_DURATION.pattern, description="Prometheus 'for'.")
    severity: str
    summary: str


class ErrorRateRule(AlertRule):
    """Share of requests answered with status >= ``min_status``."""

    threshold: float = Field(gt=0, le=1)
    min_status: Literal[400, 500]
    min_requests: int = Field(ge=1)


class LatencyRule(AlertRule):
    """99th percentile of the request latency the gate measures."""

    threshold_ms: float = Field(gt=0)
    min_requests: int = Field(ge=1)


class DriftRule(AlertRule):
    """Largest PSI of the drift features (confidence, margin, brightness, class mix)."""

    psi_threshold: float = Field(gt=0)
    min_predictions: int = Field(ge=1)


class NoTrafficRule(AlertRule):
    """No request at all for ``window``."""

    window: Duration = Field(pattern=_DURATION.pattern)


class AlertRules(_Strict):
    """The four rules."""

    error_rate: ErrorRateRule
    p99_latency: LatencyRule
    drift: DriftRule
    no_traffic: NoTrafficRule


class PrometheusSettings(_Strict):
    """How the rules are rendered for Prometheus."""

    group: str
    rate_window: Duration = Field(pattern=_DURATION.pattern)
    job_selector: str = Field(description='Label matchers added to every selector, e.g. job="x".')
    k8s_name: str = Field(min_length=1, description="metadata.name of the PrometheusRule.")
    k8s_labels: dict[str, str] = Field(description="metadata.labels of the PrometheusRule.")


class AlertSettings(_Strict):
    """``configs/alerts.yaml``."""

    window: Duration = Field(
        pattern=_DURATION.pattern, description="History the log-based evaluation looks at."
    )
    rules: AlertRules
    drift: DriftSettings
    prometheus: PrometheusSettings


def load_alert_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> AlertSettings:
    """``alerts.yaml`` (or ``path``) with ``FASHION_SERVE_ALERTS__A__B=value`` overrides."""
    return load_settings_file(
        AlertSettings, "alerts.yaml", ALERTS_ENV_PREFIX, path=path, environ=environ
    )
