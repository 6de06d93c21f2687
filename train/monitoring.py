"""Monitoring without torch: drift features, the reference distribution, PSI/KS, logs and alerts.

Used by ``service.py`` (features of each prediction, the in-process drift gauges), by
``train.export`` (the reference distribution stored with each imported model), by the
``python -m train alerts`` / ``alert-rules`` commands and by ``notebooks/03_monitoring_dashboard``.
It imports numpy, pydantic and PyYAML only, so the serving image can carry it.

* :class:`LoggingSettings`: the ``logging`` section of ``configs/serving.yaml`` (stream, request
  log file, prediction-data file; rotation and retention).
* :func:`top2_margin`, :func:`brightness`: per-image features; :func:`build_reference` turns them
  (on the validation split) into a :class:`Reference`, saved as ``reference.json`` in the model.
* :func:`psi`, :func:`ks_statistic`, :func:`drift_scores`, :class:`DriftMonitor`: drift measures.
* :class:`AlertSettings` (``configs/alerts.yaml``), :func:`evaluate_alerts` over the JSON logs, and
  :func:`prometheus_rules`, the same rules as a Prometheus rules file.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from train.settings_io import env_overrides, read_yaml_mapping, set_nested, validate

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: The reference distribution's file inside a BentoML model folder.
REFERENCE_FILE = "reference.json"
#: Numeric per-prediction features with a reference histogram.
NUMERIC_FEATURES = ("confidence", "margin", "brightness")
#: The ``logger`` field of the per-request log line written by ``service.py``.
REQUEST_LOGGER = "fashion_serve.request"
ALERTS_ENV_PREFIX = "FASHION_SERVE_ALERTS__"
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- logging settings


class LogFileSettings(_Strict):
    """One JSON-lines file written by every worker process."""

    enabled: bool = True
    path: str = Field(
        description="File name; '{worker}' becomes the BentoML worker id (the pid outside a worker)."
    )
    rotation: str = Field(description="loguru rotation, e.g. '100 MB' or '1 day'.")
    retention: str = Field(description="loguru retention, e.g. '7 days' or '10 files'.")
    compression: str | None = Field(None, description="e.g. 'gz' for rotated files.")
    flush_interval_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description=(
            "Seconds between batched writes: requests append their lines in memory and a "
            "background thread writes them together; 0 writes each line in the request."
        ),
    )

    def for_worker(self, worker: str) -> Path:
        """The file of one worker; relative paths are below the project root."""
        path = Path(self.path.replace("{worker}", worker))
        return path if path.is_absolute() else PROJECT_ROOT / path

    def pattern(self) -> str:
        """A glob matching every worker's file, rotated ones included."""
        return str(self.for_worker("*")) + "*"


class LoggingSettings(_Strict):
    """The ``logging`` section of ``configs/serving.yaml``."""

    level: str = Field(pattern=r"^(TRACE|DEBUG|INFO|SUCCESS|WARNING|ERROR|CRITICAL)$")
    stream: Literal["stdout", "stderr", "none"] = Field(
        description="Where JSON log lines go besides the file."
    )
    file: LogFileSettings = Field(description="Every log line (request lines included) as JSON.")
    predictions: LogFileSettings = Field(description="One JSON line per prediction, for drift.")


def worker_name() -> str:
    """``worker-<BentoML worker id>``, or ``pid-<pid>`` outside a BentoML worker process."""
    try:
        from bentoml._internal.context import server_context
    except ImportError:  # pragma: no cover - bentoml is a dependency of every user of this
        index = None
    else:
        index = server_context.worker_index
    return f"worker-{index}" if index is not None else f"pid-{os.getpid()}"


# --------------------------------------------------------------------------- features


def top2_margin(probabilities: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """Top-1 minus top-2 probability of each row of ``[N, classes]`` (0 = a coin flip)."""
    if probabilities.shape[-1] < 2:
        return np.ones(probabilities.shape[0])
    top2 = np.partition(probabilities, -2, axis=-1)[..., -2:]
    return np.asarray(top2[..., 1] - top2[..., 0], dtype=np.float64)


def score_margin(scores: Iterable[float]) -> float:
    """Top-1 minus top-2 of one prediction's class probabilities."""
    first = second = 0.0
    for value in scores:
        if value > first:
            first, second = value, first
        elif value > second:
            second = value
    return first - second


def brightness(pixels: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """Mean brightness (0..1) of each image of model input ``float32 [N, C, H, W]`` in 0..255.

    Computed on the model input, i.e. after :func:`train.preprocess.prepare_image`, so training,
    the reference and serving measure it on the same pixels.
    """
    return np.asarray(pixels.reshape(len(pixels), -1).mean(axis=1) / 255.0, dtype=np.float64)


def prediction_record(
    *,
    request_id: str,
    endpoint: str,
    label: str,
    class_id: int,
    confidence: float,
    margin: float,
    image_brightness: float,
    size: tuple[int, int],
) -> dict[str, Any]:
    """One JSON line of prediction data (the drift sink's schema)."""
    return {
        "request_id": request_id,
        "endpoint": endpoint,
        "label": label,
        "class_id": class_id,
        "confidence": round(confidence, 5),
        "margin": round(margin, 5),
        "brightness": round(image_brightness, 5),
        "width": size[0],
        "height": size[1],
    }


@functools.lru_cache(maxsize=4096)
def _json_string(value: str) -> str:
    return json.dumps(value)


def prediction_lines(
    time: str,
    request_id: str,
    endpoint: str,
    predictions: Iterable[tuple[str, int, float, float, float, tuple[int, int]]],
) -> str:
    """The prediction-data JSON lines of one request, joined by newlines.

    Same schema as :func:`prediction_record` (plus ``time``), formatted directly: this runs for
    every served image, and building and encoding a dict per image costs several times more.

    Args:
        time: ISO timestamp of the response.
        request_id: The request's id.
        endpoint: ``/predict`` or ``/batch_predict``.
        predictions: ``(label, class_id, confidence, margin, brightness, (width, height))`` each.
    """
    head = (
        f'{{"time": {_json_string(time)}, "request_id": {_json_string(request_id)}, '
        f'"endpoint": {_json_string(endpoint)}, "label": '
    )
    return "\n".join(
        f'{head}{_json_string(label)}, "class_id": {class_id}, "confidence": {confidence:.5f}, '
        f'"margin": {margin:.5f}, "brightness": {light:.5f}, "width": {size[0]}, '
        f'"height": {size[1]}}}'
        for label, class_id, confidence, margin, light, size in predictions
    )


# --------------------------------------------------------------------------- reference


class Reference(BaseModel):
    """The distribution a model's inputs and outputs had on the validation split at import."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Where the images came from.")
    images: int = Field(ge=1)
    class_names: list[str]
    label_mix: dict[str, float] = Field(description="True class shares (the training mix).")
    class_mix: dict[str, float] = Field(description="Predicted class shares.")
    samples: dict[str, list[float]] = Field(
        description="Per numeric feature, a seeded sample of values (for histograms and KS)."
    )
    sizes: dict[str, float] = Field(description="Original 'WxH' sizes and their shares.")
    accuracy: float | None = None

    def save(self, path: Path) -> Path:
        """Write as JSON."""
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> Reference:
        """Read a ``reference.json``."""
        return cls.model_validate_json(path.read_text())


def _shares(counts: NDArray[np.int64], names: Sequence[str]) -> dict[str, float]:
    total = max(1, int(counts.sum()))
    return {name: round(int(c) / total, 6) for name, c in zip(names, counts, strict=True)}


def build_reference(
    probabilities: NDArray[np.floating[Any]],
    labels: NDArray[np.integer[Any]],
    pixels: NDArray[np.floating[Any]],
    class_names: Sequence[str],
    sizes: Mapping[str, int],
    source: str,
    sample_size: int,
    seed: int = 0,
) -> Reference:
    """The reference distribution from the model's probabilities on validation images.

    Args:
        probabilities: Softmax outputs ``[N, classes]``.
        labels: True class ids ``[N]``.
        pixels: The model input the probabilities came from, ``float32 [N, C, H, W]``.
        class_names: Names in logit order.
        sizes: Original image sizes ('WxH') and their counts.
        source: Where the images came from (shown in reports).
        sample_size: How many values of each numeric feature to keep.
        seed: Seed of the sample.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    features = {
        "confidence": probabilities.max(axis=1),
        "margin": top2_margin(probabilities),
        "brightness": brightness(pixels),
    }
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(predicted))[:sample_size])
    classes = len(class_names)
    total_sizes = max(1, sum(sizes.values()))
    return Reference(
        source=source,
        images=len(predicted),
        class_names=list(class_names),
        label_mix=_shares(np.bincount(labels, minlength=classes), class_names),
        class_mix=_shares(np.bincount(predicted, minlength=classes), class_names),
        samples={k: [round(float(v), 5) for v in values[keep]] for k, values in features.items()},
        sizes={size: round(count / total_sizes, 6) for size, count in sizes.items()},
        accuracy=float((predicted == labels).mean()),
    )


# --------------------------------------------------------------------------- drift measures


def histogram_shares(
    values: Sequence[float] | NDArray[Any], edges: Sequence[float]
) -> NDArray[Any]:
    """Shares of ``values`` in the bins ``edges`` (values outside go to the end bins)."""
    bins = len(edges) - 1
    # Bin i holds edges[i] <= v < edges[i + 1]; the last bin also holds edges[-1].
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right") - 1
    counts = np.bincount(np.clip(index, 0, bins - 1), minlength=bins)
    return np.asarray(counts / max(1, counts.sum()), dtype=np.float64)


def psi(expected: NDArray[Any], actual: NDArray[Any], epsilon: float) -> float:
    """Population stability index of two share vectors (empty bins count as ``epsilon``).

    Rule of thumb: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a major shift.
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(
    reference: Sequence[float] | NDArray[Any], current: Sequence[float] | NDArray[Any]
) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    cur = np.sort(np.asarray(current, dtype=np.float64))
    if ref.size == 0 or cur.size == 0:
        return 0.0
    points = np.concatenate([ref, cur])
    gap = (
        np.searchsorted(ref, points, side="right") / ref.size
        - np.searchsorted(cur, points, side="right") / cur.size
    )
    return float(np.abs(gap).max())


@dataclass(frozen=True)
class FeatureDrift:
    """Drift of one feature against the reference."""

    feature: str
    psi: float
    ks: float | None
    reference_mean: float | None
    current_mean: float | None


class DriftSettings(_Strict):
    """How drift is measured (``drift`` in ``configs/alerts.yaml``)."""

    bins: dict[str, list[float]] = Field(description="PSI bin edges per numeric feature.")
    psi_epsilon: float = Field(gt=0, lt=0.01, description="Share given to empty bins.")
    ks_threshold: float = Field(gt=0, le=1, description="KS statistic shown as drift.")
    window: int = Field(ge=10, description="Service: recent predictions per worker in the gauge.")
    every: int = Field(ge=1, description="Service: recompute the gauge after this many.")

    @model_validator(mode="after")
    def _edges(self) -> DriftSettings:
        for feature in NUMERIC_FEATURES:
            edges = self.bins.get(feature)
            if edges is None or len(edges) < 3 or any(b <= a for a, b in itertools.pairwise(edges)):
                raise ValueError(f"bins.{feature} needs at least 3 increasing edges")
        return self


def drift_scores(
    reference: Reference,
    class_ids: Sequence[int] | NDArray[Any],
    features: Mapping[str, Sequence[float] | NDArray[Any]],
    settings: DriftSettings,
    with_ks: bool = True,
) -> list[FeatureDrift]:
    """PSI (and KS) of each numeric feature and PSI of the predicted class mix.

    Args:
        reference: The model's reference distribution.
        class_ids: Predicted class ids of the current window.
        features: Values of ``confidence``, ``margin`` and ``brightness`` of the current window.
        settings: Bins and epsilon.
        with_ks: Also compute KS (the service skips it).
    """
    results = []
    for name in NUMERIC_FEATURES:
        ref_values = np.asarray(reference.samples.get(name, []), dtype=np.float64)
        current = np.asarray(features[name], dtype=np.float64)
        edges = settings.bins[name]
        results.append(
            FeatureDrift(
                name,
                psi(
                    histogram_shares(ref_values, edges),
                    histogram_shares(current, edges),
                    settings.psi_epsilon,
                ),
                ks_statistic(ref_values, current) if with_ks else None,
                float(ref_values.mean()) if ref_values.size else None,
                float(current.mean()) if current.size else None,
            )
        )
    expected = np.asarray([reference.class_mix.get(n, 0.0) for n in reference.class_names])
    counts = np.bincount(np.asarray(class_ids, dtype=np.int64), minlength=len(expected))
    actual = counts[: len(expected)] / max(1, counts.sum())
    results.append(
        FeatureDrift("class_mix", psi(expected, actual, settings.psi_epsilon), None, None, None)
    )
    return results


class DriftMonitor:
    """The service's rolling window of recent predictions and its PSI per feature.

    Cheap on the request path: :meth:`add` writes four numbers into ring buffers, and the
    reference's bin shares are computed once here, not on every :meth:`scores`.
    """

    def __init__(self, reference: Reference, settings: DriftSettings) -> None:
        self.reference = reference
        self.settings = settings
        self._columns = np.zeros((4, settings.window), dtype=np.float64)
        self._next = 0
        self.count = 0  # predictions in the window (at most ``settings.window``)
        self._since = 0
        self._expected = {
            name: histogram_shares(reference.samples.get(name, []), settings.bins[name])
            for name in NUMERIC_FEATURES
        }
        self._expected_mix = np.asarray(
            [reference.class_mix.get(n, 0.0) for n in reference.class_names]
        )

    def add(self, class_id: int, confidence: float, margin: float, image_brightness: float) -> None:
        """Remember one prediction (the oldest one drops out of a full window)."""
        self._columns[:, self._next] = (class_id, confidence, margin, image_brightness)
        self._next = (self._next + 1) % self.settings.window
        self.count = min(self.count + 1, self.settings.window)
        self._since += 1

    def add_many(
        self,
        class_ids: Sequence[int],
        confidences: Sequence[float],
        margins: Sequence[float],
        lights: Sequence[float],
    ) -> None:
        """Remember the predictions of one request at once (one numpy write, not one per image)."""
        size = self.settings.window
        rows = np.asarray([class_ids, confidences, margins, lights], dtype=np.float64)[:, -size:]
        count = rows.shape[1]
        self._columns[:, (self._next + np.arange(count)) % size] = rows
        self._next = (self._next + count) % size
        self.count = min(self.count + count, size)
        self._since += len(class_ids)

    def due(self) -> bool:
        """Whether ``every`` predictions arrived since the last :meth:`scores`."""
        return self._since >= self.settings.every

    def scores(self) -> dict[str, float]:
        """PSI per feature (and ``class_mix``) over the window."""
        self._since = 0
        window = self._columns[:, : self.count]
        epsilon = self.settings.psi_epsilon
        result = {
            name: psi(
                self._expected[name],
                histogram_shares(window[row], self.settings.bins[name]),
                epsilon,
            )
            for row, name in enumerate(NUMERIC_FEATURES, start=1)
        }
        classes = len(self._expected_mix)
        counts = np.bincount(window[0].astype(np.int64), minlength=classes)[:classes]
        result["class_mix"] = psi(self._expected_mix, counts / max(1, counts.sum()), epsilon)
        return result


# --------------------------------------------------------------------------- alert settings


def duration_seconds(value: str) -> int:
    """``"15m"`` -> 900 (units s, m, h, d)."""
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration like 30s, 15m, 1h or 1d")
    return int(match[1]) * _UNIT_SECONDS[match[2]]


Duration = str


class _Rule(_Strict):
    for_: Duration = Field(alias="for", pattern=_DURATION.pattern, description="Prometheus 'for'.")
    severity: str
    summary: str


class ErrorRateRule(_Rule):
    """Share of requests answered with status >= ``min_status``."""

    threshold: float = Field(gt=0, le=1)
    min_status: Literal[400, 500]
    min_requests: int = Field(ge=1)


class LatencyRule(_Rule):
    """99th percentile of the request latency the gate measures."""

    threshold_ms: float = Field(gt=0)
    min_requests: int = Field(ge=1)


class DriftRule(_Rule):
    """Largest PSI of the drift features (confidence, margin, brightness, class mix)."""

    psi_threshold: float = Field(gt=0)
    min_predictions: int = Field(ge=1)


class NoTrafficRule(_Rule):
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


class AlertSettings(_Strict):
    """``configs/alerts.yaml``."""

    window: Duration = Field(
        pattern=_DURATION.pattern, description="History the log-based evaluation looks at."
    )
    rules: AlertRules
    drift: DriftSettings
    prometheus: PrometheusSettings


def alerts_config_path() -> Path:
    """``alerts.yaml`` in ``FASHION_SERVE_CONFIG_DIR`` (default: the project's ``configs``)."""
    folder = os.environ.get("FASHION_SERVE_CONFIG_DIR", str(PROJECT_ROOT / "configs"))
    return Path(folder) / "alerts.yaml"


def load_alert_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> AlertSettings:
    """Read ``configs/alerts.yaml`` with ``FASHION_SERVE_ALERTS__A__B=value`` overrides.

    Raises:
        train.settings_io.SettingsError: a missing file, an unknown key or a bad value.
    """
    file = path or alerts_config_path()
    tree = read_yaml_mapping(file)
    for keys, value, name in env_overrides(
        ALERTS_ENV_PREFIX, os.environ if environ is None else environ
    ):
        set_nested(tree, keys, value, name)
    return validate(AlertSettings, tree, f"alert config ({file}, {ALERTS_ENV_PREFIX}*)")


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
    enough = len(recent) >= rules.error_rate.min_requests
    results.append(
        AlertResult(
            "error_rate",
            enough and rate > rules.error_rate.threshold,
            rate,
            rules.error_rate.threshold,
            f"{errors}/{len(recent)} requests with status >= {rules.error_rate.min_status} "
            f"({rate:.1%}, threshold {rules.error_rate.threshold:.1%}"
            + ("" if enough else f", needs {rules.error_rate.min_requests} requests")
            + f") in the last {settings.window}",
        )
    )

    latencies = [float(r["latency_ms"]) for r in recent if "latency_ms" in r]
    p99 = percentile(latencies, 99) if latencies else 0.0
    enough = len(latencies) >= rules.p99_latency.min_requests
    results.append(
        AlertResult(
            "p99_latency",
            enough and p99 > rules.p99_latency.threshold_ms,
            p99,
            rules.p99_latency.threshold_ms,
            f"p99 {p99:.1f} ms over {len(latencies)} requests (threshold "
            f"{rules.p99_latency.threshold_ms:g} ms"
            + ("" if enough else f", needs {rules.p99_latency.min_requests} requests")
            + ")",
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

    def rule(name: str, expr: str, spec: _Rule) -> dict[str, Any]:
        return {
            "alert": f"FashionServe{name}",
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
                        "HighErrorRate",
                        f"({error_rate} / {requests}) > {rules.error_rate.threshold:g} "
                        f"and on() ({enough_requests})",
                        rules.error_rate,
                    ),
                    rule(
                        "HighP99Latency",
                        "histogram_quantile(0.99, sum by (le) "
                        f"(rate(fashion_serve_request_seconds_bucket{every}[{window}]))) "
                        f"> {rules.p99_latency.threshold_ms / 1000:g} "
                        f"and on() ({latency_requests})",
                        rules.p99_latency,
                    ),
                    rule(
                        "InputDrift",
                        f"max(fashion_serve_drift_psi{every}) > {rules.drift.psi_threshold:g}",
                        rules.drift,
                    ),
                    rule(
                        "NoTraffic",
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


# --------------------------------------------------------------------------- command helpers

SERVING_ENV_PREFIX = "FASHION_SERVE_SERVING__"


@dataclass(frozen=True)
class ServedSources:
    """Where the running service writes its logs, and the model it serves."""

    logging: LoggingSettings
    model_tag: str


def served_sources(environ: Mapping[str, str] | None = None) -> ServedSources:
    """The ``logging`` section and ``model_tag`` of ``configs/serving.yaml`` (with env overrides).

    Read without importing ``service.py`` (and BentoML), the same way it reads them.
    """
    folder = os.environ.get("FASHION_SERVE_CONFIG_DIR", str(PROJECT_ROOT / "configs"))
    file = Path(folder) / "serving.yaml"
    tree = read_yaml_mapping(file)
    for keys, value, name in env_overrides(
        SERVING_ENV_PREFIX, os.environ if environ is None else environ
    ):
        set_nested(tree, keys, value, name)
    what = f"serving config ({file}, {SERVING_ENV_PREFIX}*)"
    return ServedSources(
        validate(LoggingSettings, tree.get("logging") or {}, f"{what} logging"),
        str(tree.get("model_tag", "")),
    )


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
