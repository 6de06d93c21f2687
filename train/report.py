"""The README's model table: the best finished run per data set, architecture, width and weights.

``python -m train report`` prints the table and rewrites the block between the markers in
README.md, so every number there comes from a logged run. It reads the configured experiment and
``tracking.report_experiments`` (the photo-folder comparison).
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import Run

from train import tracking
from train.config import PROJECT_ROOT, Settings

START = "<!-- model-table:start -->"
END = "<!-- model-table:end -->"
FASHION_MNIST = "Fashion-MNIST"
HEADER = (
    "| data | architecture | width | weights | train images | parameters | size (MB) | epochs | minutes "
    "| val accuracy | test accuracy | machine | run |\n"
    "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
)


def best_runs(settings: Settings) -> list[Run]:
    """The best finished run (registry metric) per data set, architecture, width and weights."""
    metric = settings.registry.metric
    runs = tracking.finished_runs(
        settings.tracking, settings.registry.max_runs, settings.tracking.report_experiments
    )
    best: dict[tuple[str, str, str, str], Run] = {}
    for run in runs:
        arch = run.data.tags.get("architecture")
        if (
            arch is None
            or metric not in run.data.metrics
            or "test_accuracy" not in run.data.metrics
        ):
            continue
        key = (_data(run), arch, run.data.params.get("model.width", "?"), _weights(run))
        if key not in best or run.data.metrics[metric] > best[key].data.metrics[metric]:
            best[key] = run
    return sorted(
        best.values(),
        key=lambda r: (_data(r) != FASHION_MNIST, _data(r), -r.data.metrics["test_accuracy"]),
    )


def model_table(settings: Settings) -> str:
    """Markdown table, one row per architecture and width (base channels of the small CNNs)."""
    rows = [HEADER]
    for run in best_runs(settings):
        m, params = run.data.metrics, run.data.params
        train_size = params.get("train_size", "")
        train_images = f"{int(train_size):,}" if train_size.isdigit() else "?"
        rows.append(
            f"| {_data(run)} | {run.data.tags['architecture']} | {params.get('model.width', '?')} "
            f"| {_weights(run)} | {train_images} | {int(m.get('parameters', 0)):,} "
            f"| {m.get('size_mb', 0):.2f} | {int(m.get('epochs_trained', 0))} "
            f"| {m.get('train_minutes', 0):.1f} | {100 * m[settings.registry.metric]:.2f}% "
            f"| {100 * m['test_accuracy']:.2f}% | {run.data.tags.get('machine', '?')} "
            f"| `{run.info.run_id[:8]}` |"
        )
    return "\n".join(rows)


def _data(run: Run) -> str:
    """What the run trained on: Fashion-MNIST, or the image folder's name."""
    if run.data.params.get("data.source", "fashion_mnist") == "fashion_mnist":
        return FASHION_MNIST
    return Path(run.data.params.get("data.path", "?")).name


def _weights(run: Run) -> str:
    """Where the run's starting weights came from: ``ImageNet`` or ``random``."""
    return "ImageNet" if run.data.params.get("model.pretrained") == "True" else "random"


def update_readme(table: str, readme: Path = PROJECT_ROOT / "README.md") -> bool:
    """Replace the block between the markers; returns False when the markers are absent."""
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    return True
