"""Drift features and measures, shared by training (the reference at import) and serving (gauges).

* :func:`top2_margin`, :func:`brightness`: per-image features; :func:`build_reference` turns them
  (on the validation split) into a :class:`Reference`, saved as ``reference.json`` in the model.
* :func:`prediction_lines`: the prediction-data JSON lines the service writes per image.
* :func:`psi`, :func:`ks_statistic`, :func:`drift_scores`, :class:`DriftMonitor`: drift measures.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Numeric per-prediction features with a reference histogram.
NUMERIC_FEATURES = ("confidence", "margin", "brightness")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

    Computed on the model input, i.e. after :func:`common.preprocess.prepare_image`, so training,
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
        """Remember a batch of predictions at once (one numpy write, not one per image)."""
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
