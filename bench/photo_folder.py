"""Transfer learning against from-scratch models on an RGB photo-like ImageFolder.

``python -m bench.photo_folder [--root data/photo_folder] [--train-per-class 600] [--fit]``

Writes an ImageFolder (``train/`` and ``test/``, one sub-folder per class) made from Fashion-MNIST:
each garment is tinted in a random colour, scaled, turned and placed on a random two-colour
gradient with noise, and saved as an RGB JPEG of ``--size`` pixels at a random quality, so the
networks see what a product photo brings (colour, background, position, compression) instead of
centred 28x28 grayscale. ``--fit`` then trains every model of ``--models`` on it with
``python -m train fit --config configs/presets/photo_folder.yaml`` (its own MLflow experiment) and
prints one table of their accuracy and training minutes; ``python -m train report`` puts the runs
in the README's model table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from train.config import PROJECT_ROOT, load_settings
from train.data import FASHION_MNIST_CLASSES, load_fashion_mnist

PRESET = "configs/presets/photo_folder.yaml"
DONE_MARKER = ".complete.json"
# Each model's `train fit` overrides on top of the preset: resnet_small and resnet18 train from
# random weights with the default SGD recipe (resnet18 at batch 64, as its preset); EfficientNet
# takes configs/presets/efficientnet_lite0.yaml's optimiser settings, for 5 epochs.
MODELS: dict[str, list[str]] = {
    "resnet_small": [],
    "efficientnet_lite0": [
        "model.name=efficientnet_lite0",
        "model.pretrained=true",
        "model.dropout=0.2",
        "train.epochs=5",
        "train.batch_size=64",
        "train.optimizer=adamw",
        "train.lr=0.001",
        "train.weight_decay=0.01",
    ],
    "resnet18": [
        "model.name=resnet18",
        "model.pretrained=false",
        "train.epochs=10",
        "train.batch_size=64",
    ],
}


def photo_like(garment: NDArray[np.uint8], size: int, rng: np.random.Generator) -> Image.Image:
    """A ``size`` x ``size`` RGB image of the 28x28 grayscale ``garment`` on a random background."""
    top, bottom = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (1 - ramp) * top + ramp * bottom + rng.normal(0, 12, size=(size, size, 3))
    scale = rng.uniform(0.55, 0.95)
    side = max(8, round(size * scale))
    shape = Image.fromarray(garment).resize((side, side), Image.Resampling.BICUBIC)
    mask = shape.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BICUBIC)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    tint = rng.uniform(0.15, 1.0, size=3)
    garment_rgb = 255.0 * tint * (0.35 + 0.65 * alpha)
    canvas = background.copy()
    x, y = rng.integers(0, size - side + 1, size=2)
    patch = canvas[y : y + side, x : x + side]
    canvas[y : y + side, x : x + side] = (1 - alpha) * patch + alpha * garment_rgb
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="RGB")


def write_folder(
    root: Path, train_per_class: int, test_per_class: int, size: int, seed: int = 0
) -> Path:
    """(Re)write ``root``/train and ``root``/test from Fashion-MNIST; reused when complete."""
    wanted = {"train_per_class": train_per_class, "test_per_class": test_per_class, "size": size}
    marker = root / DONE_MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return root
    if root.exists():
        shutil.rmtree(root)
    settings = load_settings(overrides=["data.source=fashion_mnist"])
    train, test, _ = load_fashion_mnist(settings.data)
    rng = np.random.default_rng(seed)
    for part, split, per_class in (
        ("train", train, train_per_class),
        ("test", test, test_per_class),
    ):
        for label, name in enumerate(FASHION_MNIST_CLASSES):
            folder = root / part / name.replace("/", "-").replace(" ", "_").lower()
            folder.mkdir(parents=True)
            for index in np.flatnonzero(split.labels == label)[:per_class]:
                image = photo_like(split.images[index, ..., 0], size, rng)
                image.save(folder / f"{index:05d}.jpg", quality=int(rng.integers(70, 96)))
    marker.write_text(json.dumps(wanted))
    return root


@dataclass(frozen=True)
class FitResult:
    """One model's `train fit` on the folder, as the command printed it."""

    model: str
    run_id: str
    val_accuracy: float
    test_accuracy: float
    minutes: float


RESULT_LINE = re.compile(
    r"^run (\w+): val_accuracy=([\d.]+) test_accuracy=([\d.]+) in ([\d.]+) min$", re.M
)


def fit(model: str, root: Path, extra: Sequence[str]) -> FitResult:
    """Train ``model`` on ``root`` with ``train fit`` (its output passed through)."""
    command = [
        sys.executable, "-m", "train", "fit", "--config", PRESET, f"data.path={root}",
        *MODELS[model], *extra,
    ]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=PROJECT_ROOT, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    match = RESULT_LINE.search(done.stdout)
    if match is None:
        raise RuntimeError(f"`train fit` for {model} printed no result line")
    run_id, val, test, minutes = match.groups()
    return FitResult(model, run_id, float(val), float(test), float(minutes))


def result_table(results: Sequence[FitResult]) -> str:
    """Markdown table of the fits, best test accuracy first."""
    rows = [
        "| model | weights | training minutes | val accuracy | test accuracy | run |",
        "|---|---|--:|--:|--:|---|",
    ]
    for r in sorted(results, key=lambda r: -r.test_accuracy):
        weights = "ImageNet" if "model.pretrained=true" in MODELS[r.model] else "random"
        rows.append(
            f"| {r.model} | {weights} | {r.minutes:.1f} | {100 * r.val_accuracy:.2f}% "
            f"| {100 * r.test_accuracy:.2f}% | `{r.run_id[:8]}` |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT / "data" / "photo_folder")
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=96, help="side of the written JPEGs")
    parser.add_argument("--fit", action="store_true", help="train the models on the folder")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("extra", nargs="*", help="more `train fit` overrides for every model")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    started = time.perf_counter()
    root = write_folder(args.root, args.train_per_class, args.test_per_class, args.size)
    files = sum(1 for _ in root.rglob("*.jpg"))
    print(f"{files} JPEGs in {root} ({time.perf_counter() - started:.1f} s)", flush=True)
    if args.fit:
        results = [fit(model, root, args.extra) for model in models]
        print(result_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
