"""Alerting over the service's JSON logs (the offline tool), and the same rules for Prometheus.

Used by the ``python -m train alerts`` / ``alert-rules`` commands and by
``notebooks/03_monitoring_dashboard``. The drift features and measures it evaluates live in
:mod:`common.drift`, the rule settings in :mod:`common.alerts`.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from common.alerts import AlertRule, AlertSettings, duration_seconds
from common.drift import NUMERIC_FEATURES, Reference, drift_scores
from common.model_format import REFERENCE_FILE
from serving.settings import LoggingSettings, load_serving_settings

#: The ``logger`` field of the per-request log line written by the service.
REQUEST_LOGGER = "fashion_serve.request"


# --------------------------------------------------------------------------- reading logs


def expand(patterns: Iterable[str | Path]) -> list[Path]:
    """Files matching the glob patterns (plain paths too), sorted, without duplicates."""
    found: set[Path] = set()
    for pattern in patterns:
        # Path.glob takes no absolute patterns; the configured paths usually are.
        matches = glob.glob(str(pattern))  # noqa: PTH207
        found.update(Path(m) for m in matches if Path(m).is_file() and not m.endswith(".gz"))
    return sorted(found)


def read_jsonl(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Every JSON object line of ``paths`` (other lines, e.g. a crash trace, are skipped)."""
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("{"):
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict):
                        yield entry


def parse_time(value: str) -> datetime:
    """An ISO timestamp as an aware datetime (naive ones are taken as UTC)."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def request_entries(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The per-request log lines, each with ``time`` parsed, oldest first."""
    entries = [
        {**e, "time": parse_time(e["time"])}
        for e in read_jsonl(paths)
        if e.get("logger") == REQUEST_LOGGER and "time" in e
    ]
    return sorted(entries, key=lambda e: e["time"])


def prediction_entries(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The prediction-data lines, each with ``time`` parsed, oldest first."""
    entries = [
        {**e, "time": parse_time(e["time"])}
        for e in read_jsonl(paths)
        if "class_id" in e and "confidence" in e and "time" in e
    ]
    return sorted(entries, key=lambda e: e["time"])


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class AlertResult:
    """One rule's verdict over a window of logs."""

    name: str
    firing: bool
    value: float | None
    threshold: float
    detail: str

    def line(self) -> str:
        """One line for people: ``FIRING drift: ...`` or ``ok     error_rate: ...``."""
        return f"{'FIRING' if self.firing else 'ok':<6} {self.name}: {self.detail}"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest-rank (what a histogram alert approximates)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def _threshold_alert(
    name: str,
    value: float,
    threshold: float,
    count: int,
    min_requests: int,
    measured: str,
    suffix: str = "",
) -> AlertResult:
    """A rule that fires when ``value`` is over ``threshold`` and ``count`` requests measured it.

    ``measured`` opens the detail up to the threshold; it is closed with a note of the requests
    still missing (if any), ``)`` and ``suffix``.
    """
    enough = count >= min_requests
    detail = measured + ("" if enough else f", needs {min_requests} requests") + ")" + suffix
    return AlertResult(name, enough and value > threshold, value, threshold, detail)


def evaluate_alerts(
    requests: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    reference: Reference | None,
    settings: AlertSettings,
    now: datetime | None = None,
) -> list[AlertResult]:
    """Evaluate every rule over the last ``settings.window`` before ``now``.

    Args:
        requests: Parsed request log lines (:func:`request_entries`).
        predictions: Parsed prediction-data lines (:func:`prediction_entries`).
        reference: The served model's reference; without one the drift rule cannot fire.
        settings: The alert configuration.
        now: End of the window (default: the current time).
    """
    now = now or datetime.now(UTC)
    start = now - timedelta(seconds=duration_seconds(settings.window))
    recent = [r for r in requests if start <= r["time"] <= now]
    rules = settings.rules
    results = []

    errors = sum(int(r.get("status", 500)) >= rules.error_rate.min_status for r in recent)
    rate = errors / len(recent) if recent else 0.0
    results.append(
        _threshold_alert(
            "error_rate",
            rate,
            rules.error_rate.threshold,
            len(recent),
            rules.error_rate.min_requests,
            f"{errors}/{len(recent)} requests with status >= {rules.error_rate.min_status} "
            f"({rate:.1%}, threshold {rules.error_rate.threshold:.1%}",
            f" in the last {settings.window}",
        )
    )

    latencies = [float(r["latency_ms"]) for r in recent if "latency_ms" in r]
    p99 = percentile(latencies, 99) if latencies else 0.0
    results.append(
        _threshold_alert(
            "p99_latency",
            p99,
            rules.p99_latency.threshold_ms,
            len(latencies),
            rules.p99_latency.min_requests,
            f"p99 {p99:.1f} ms over {len(latencies)} requests (threshold "
            f"{rules.p99_latency.threshold_ms:g} ms",
        )
    )

    window_predictions = [p for p in predictions if start <= p["time"] <= now]
    enough = len(window_predictions) >= rules.drift.min_predictions
    if reference is None or not window_predictions:
        results.append(
            AlertResult(
                "drift",
                False,
                None,
                rules.drift.psi_threshold,
                "no reference distribution for the model"
                if reference is None
                else "no predictions in the window",
            )
        )
    else:
        drifts = drift_scores(
            reference,
            [int(p["class_id"]) for p in window_predictions],
            {f: [float(p[f]) for p in window_predictions] for f in NUMERIC_FEATURES},
            settings.drift,
        )
        worst = max(drifts, key=lambda d: d.psi)
        results.append(
            AlertResult(
                "drift",
                enough and worst.psi > rules.drift.psi_threshold,
                worst.psi,
                rules.drift.psi_threshold,
                f"max PSI {worst.psi:.3f} ({worst.feature}) over {len(window_predictions)} "
                f"predictions (threshold {rules.drift.psi_threshold:g}"
                + ("" if enough else f", needs {rules.drift.min_predictions} predictions")
                + "); "
                + ", ".join(f"{d.feature} {d.psi:.3f}" for d in drifts),
            )
        )

    quiet = now - timedelta(seconds=duration_seconds(rules.no_traffic.window))
    last = max((r["time"] for r in requests if r["time"] <= now), default=None)
    silent = last is None or last < quiet
    results.append(
        AlertResult(
            "no_traffic",
            silent,
            None if last is None else (now - last).total_seconds(),
            float(duration_seconds(rules.no_traffic.window)),
            ("no request logged at all" if last is None else f"last request at {last.isoformat()}")
            + f" (threshold: none for {rules.no_traffic.window})",
        )
    )
    return results


# --------------------------------------------------------------------------- Prometheus rules


#: The Prometheus alert of each rule of ``configs/alerts.yaml`` (a test keeps them one to one).
PROMETHEUS_ALERTS = {
    "error_rate": "FashionServeHighErrorRate",
    "p99_latency": "FashionServeHighP99Latency",
    "drift": "FashionServeInputDrift",
    "no_traffic": "FashionServeNoTraffic",
}


def _selector(settings: AlertSettings, *matchers: str) -> str:
    parts = [m for m in (settings.prometheus.job_selector, *matchers) if m]
    return "{" + ",".join(parts) + "}" if parts else ""


def prometheus_rules(settings: AlertSettings) -> dict[str, Any]:
    """The alert rules as a Prometheus rules file (a mapping to dump as YAML).

    The service exports what these need: ``fashion_serve_requests_total{endpoint,status}``,
    ``fashion_serve_request_seconds`` and ``fashion_serve_drift_psi{feature}``.
    """
    rules = settings.rules
    window = settings.prometheus.rate_window
    every = _selector(settings)
    status = "5.." if rules.error_rate.min_status == 500 else "[45].."
    failed = _selector(settings, f'status=~"{status}"')
    requests = f"sum(rate(fashion_serve_requests_total{every}[{window}]))"
    error_rate = f"sum(rate(fashion_serve_requests_total{failed}[{window}]))"
    enough_requests = (
        f"sum(increase(fashion_serve_requests_total{every}[{window}])) "
        f">= {rules.error_rate.min_requests}"
    )
    latency_requests = (
        f"sum(increase(fashion_serve_requests_total{every}[{window}])) "
        f">= {rules.p99_latency.min_requests}"
    )
    quiet = rules.no_traffic.window

    def rule(name: str, expr: str, spec: AlertRule) -> dict[str, Any]:
        return {
            "alert": PROMETHEUS_ALERTS[name],
            "expr": expr,
            "for": spec.for_,
            "labels": {"severity": spec.severity},
            "annotations": {"summary": spec.summary},
        }

    return {
        "groups": [
            {
                "name": settings.prometheus.group,
                "rules": [
                    rule(
                        "error_rate",
                        f"({error_rate} / {requests}) > {rules.error_rate.threshold:g} "
                        f"and on() ({enough_requests})",
                        rules.error_rate,
                    ),
                    rule(
                        "p99_latency",
                        "histogram_quantile(0.99, sum by (le) "
                        f"(rate(fashion_serve_request_seconds_bucket{every}[{window}]))) "
                        f"> {rules.p99_latency.threshold_ms / 1000:g} "
                        f"and on() ({latency_requests})",
                        rules.p99_latency,
                    ),
                    rule(
                        "drift",
                        f"max(fashion_serve_drift_psi{every}) > {rules.drift.psi_threshold:g}",
                        rules.drift,
                    ),
                    rule(
                        "no_traffic",
                        f"(sum(increase(fashion_serve_requests_total{every}[{quiet}])) or vector(0)) < 1",
                        rules.no_traffic,
                    ),
                ],
            }
        ]
    }


def render_prometheus_rules(settings: AlertSettings) -> str:
    """The rules file's text (what ``python -m train alert-rules`` writes)."""
    header = "# Generated from configs/alerts.yaml by `python -m train alert-rules`; do not edit.\n"
    return header + yaml.safe_dump(prometheus_rules(settings), sort_keys=False, width=1000)


def prometheus_rule_manifest(settings: AlertSettings) -> dict[str, Any]:
    """The same rules as a Prometheus Operator ``PrometheusRule`` (``monitoring.coreos.com/v1``)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": settings.prometheus.k8s_name,
            "labels": dict(settings.prometheus.k8s_labels),
        },
        "spec": prometheus_rules(settings),
    }


def render_prometheus_rule_manifest(settings: AlertSettings) -> str:
    """The PrometheusRule manifest's text (``deploy/k8s/prometheusrule.yaml``)."""
    header = (
        "# Generated from configs/alerts.yaml by `python -m train alert-rules`; do not edit.\n"
        "# Needs the Prometheus Operator's CRDs: kubectl apply -f deploy/k8s/prometheusrule.yaml\n"
    )
    return header + yaml.safe_dump(prometheus_rule_manifest(settings), sort_keys=False, width=1000)


# --------------------------------------------------------------------------- command helpers


@dataclass(frozen=True)
class ServedSources:
    """Where the running service writes its logs, and the model it serves."""

    logging: LoggingSettings
    model_tag: str


def served_sources(environ: Mapping[str, str] | None = None) -> ServedSources:
    """The ``logging`` section of the serving settings (with env overrides) and the served model.

    The model is the one the service loads (:func:`serving.lineage.served_tag`), from BentoML's
    store; ``<model_name>:latest`` when the store cannot say (the reference is then looked up
    there and missing at worst).
    """
    from serving.lineage import ServedModelError, served_tag

    settings = load_serving_settings(environ=environ)
    try:
        tag = served_tag(settings)
    except ServedModelError:
        tag = f"{settings.model_name}:latest"
    return ServedSources(settings.logging, tag)


def stored_reference(model_tag: str) -> Reference | None:
    """The ``reference.json`` of ``model_tag`` in BentoML's store (``BENTOML_HOME``), if any."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(model_tag)
    except NotFound:
        return None
    path = Path(model.path_of(REFERENCE_FILE))
    return Reference.load(path) if path.exists() else None


def run_alerts(
    logs: Sequence[str],
    predictions: Sequence[str],
    reference_path: Path | None,
    now: datetime | None,
    settings: AlertSettings,
) -> tuple[list[AlertResult], str]:
    """Evaluate the rules over log files; the results and a line naming what was read.

    Args:
        logs: Globs of request-log files (default: the service's, from ``configs/serving.yaml``).
        predictions: Globs of prediction-data files (default: the service's).
        reference_path: A ``reference.json``; default: the served model's in the BentoML store.
        now: End of the window; default: the current time.
        settings: The alert configuration.
    """
    sources = None if logs and predictions and reference_path else served_sources()
    if sources is not None:
        logs = logs or [sources.logging.file.pattern()]
        predictions = predictions or [sources.logging.predictions.pattern()]
    log_files, prediction_files = expand(logs), expand(predictions)
    reference: Reference | None = None
    if reference_path is not None:
        reference = Reference.load(reference_path)
    elif sources is not None:
        reference = stored_reference(sources.model_tag)
    results = evaluate_alerts(
        request_entries(log_files), prediction_entries(prediction_files), reference, settings, now
    )
    read = f"read {len(log_files)} log file(s), {len(prediction_files)} prediction file(s), " + (
        "no reference" if reference is None else f"reference of {reference.images} images"
    )
    return results, read
