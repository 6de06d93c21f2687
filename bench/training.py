"""Training speed: images/s per architecture, before and after the input-pipeline choices.

``python -m bench.training`` (and ``make bench``, which puts the table in ``docs/benchmarks.md``)
times training steps on the real Fashion-MNIST training images, with the project's own model,
optimiser, loss and augmentation (``train.engine.train_one_epoch`` on a slice of the data), in
three variants per architecture:

- ``DataLoader``: the textbook pipeline, a ``torch.utils.data.DataLoader`` over a ``Dataset``
  that turns one ``uint8`` image at a time into a float tensor (what torchvision's FashionMNIST
  with ``ToTensor`` does), collated per batch, default (NCHW) memory format: the "before";
- ``in-memory``: the decoded data set held as one ``uint8`` tensor, batches cut by indexing
  (``train.data.iterate_batches``), NCHW;
- ``in-memory + channels_last``: the same with the model and inputs in channels_last: what
  ``configs/train.yaml`` does by default now.

Each run does ``--warmup`` steps, then trains for ``--seconds`` (at least 3 steps) and reports
images/s and the projected epoch time (60,000 images).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

EPOCH_IMAGES = 60_000
VARIANTS = ("DataLoader", "in-memory", "in-memory + channels_last")
#: Architectures of the default table (and their ``model`` overrides): the project default and
#: the baseline from scratch, and the pretrained backbone at its input size.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "simple_cnn": {"name": "simple_cnn", "width": 16},
    "resnet_small": {"name": "resnet_small", "width": 16},
    "efficientnet_lite0": {"name": "efficientnet_lite0", "pretrained": False, "input_size": 64},
}


@dataclass(frozen=True)
class TrainingSpeed:
    """One architecture × variant."""

    architecture: str
    variant: str
    threads: int
    batch_size: int
    steps: int
    images_per_s: float

    @property
    def epoch_s(self) -> float:
        """Projected seconds for one epoch of 60,000 images."""
        return EPOCH_IMAGES / self.images_per_s if self.images_per_s else float("inf")


def default_matrix(tiny: bool = False) -> list[tuple[str, str]]:
    """(architecture, variant) pairs; ``tiny`` = one quick architecture."""
    architectures = ["simple_cnn"] if tiny else list(ARCHITECTURES)
    return [(a, v) for a in architectures for v in VARIANTS]


class _PerImageDataset:
    """The textbook Dataset: one image at a time, converted to float on access."""

    def __init__(self, images: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import torch

        image = torch.from_numpy(np.ascontiguousarray(self.images[index].transpose(2, 0, 1)))
        return image, int(self.labels[index])


def _loader_batches(
    images: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], batch_size: int, seed: int
) -> Iterator[tuple[Any, Any]]:
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    loader: DataLoader[tuple[Any, int]] = DataLoader(
        _PerImageDataset(images, labels),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=0,
    )
    while True:
        yield from loader


@functools.cache
def _data() -> Any:
    from train.config import load_settings
    from train.data import load_data

    settings = load_settings()
    return load_data(settings.data.model_copy(update={"allow_download": False}))


def measure(
    architecture: str, variant: str, seconds: float, warmup: int, tiny: bool = False
) -> TrainingSpeed:
    """Train ``architecture`` in ``variant`` for about ``seconds``; return its speed."""
    import torch
    from torch import nn

    from train.config import ModelConfig, load_settings
    from train.data import to_tensors
    from train.engine import make_training_parts, set_seed
    from train.models import build_model
    from train.transforms import augment_batch, get_preset

    settings = load_settings()
    cfg = settings.train.model_copy(
        update={"channels_last": variant.endswith("channels_last"), "progress": False}
    )
    threads = cfg.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    bundle = _data()
    overrides = dict(ARCHITECTURES[architecture])
    if tiny:
        overrides["width"] = 4
    model_cfg = settings.model.model_copy(update=overrides)
    model: nn.Module = build_model(
        ModelConfig.model_validate(model_cfg.model_dump()),
        bundle.spec,
        num_classes=len(bundle.classes),
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    generator = set_seed(cfg.seed)
    optimizer, scheduler, criterion = make_training_parts(model, cfg, steps_per_epoch=1_000_000)
    preset = get_preset(settings.data.augmentation)
    batches: Iterator[tuple[Any, Any]]
    if variant == "DataLoader":
        batches = _loader_batches(
            bundle.train.images, bundle.train.labels, cfg.batch_size, cfg.seed
        )
    else:
        from train.data import iterate_batches

        images, labels = to_tensors(bundle.train)

        def forever() -> Iterator[tuple[Any, Any]]:
            while True:
                yield from iterate_batches(images, labels, cfg.batch_size, generator)

        batches = forever()

    def step() -> int:
        batch_images, batch_labels = next(batches)
        inputs = augment_batch(batch_images, preset, generator).float()
        if cfg.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(inputs), batch_labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return int(batch_labels.shape[0])

    for _ in range(warmup):
        step()
    seen, steps, started = 0, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or steps < 3:
        seen += step()
        steps += 1
    return TrainingSpeed(architecture, variant, threads, cfg.batch_size, steps, seen / elapsed)


def run_matrix(
    pairs: Sequence[tuple[str, str]], seconds: float, warmup: int = 3, tiny: bool = False
) -> list[TrainingSpeed]:
    """Measure every (architecture, variant) pair, printing each as it finishes."""
    results = []
    for architecture, variant in pairs:
        result = measure(architecture, variant, seconds, warmup, tiny)
        print(
            f"training {architecture} [{variant}]: {result.images_per_s:.0f} images/s",
            file=sys.stderr,
        )
        results.append(result)
    return results


def render(results: Sequence[TrainingSpeed]) -> str:
    """The Markdown section: images/s and epoch time, with the speed-up over ``DataLoader``."""
    base = {r.architecture: r.images_per_s for r in results if r.variant == "DataLoader"}
    lines = [
        "## Training speed",
        "",
        "`bench/training.py`: the project's model, SGD + OneCycle, label smoothing and "
        "augmentation on the real Fashion-MNIST training images, batch "
        f"{results[0].batch_size if results else '?'}, "
        f"{results[0].threads if results else '?'} torch threads; epoch = projected time for "
        f"{EPOCH_IMAGES:,} images. `DataLoader` is the textbook pipeline (the before), the "
        "last variant is what `configs/train.yaml` does now.",
        "",
        "| architecture | input pipeline | steps | images/s | epoch s | vs DataLoader |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in results:
        ratio = f"{r.images_per_s / base[r.architecture]:.2f}×" if base.get(r.architecture) else ""
        lines.append(
            f"| {r.architecture} | {r.variant} | {r.steps} | {r.images_per_s:.0f} "
            f"| {r.epoch_s:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the training-speed table."""
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--tiny", action="store_true", help="width-4 models (tests)")
    args = parser.parse_args(argv)
    names = [a.strip() for a in args.architectures.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose from {', '.join(ARCHITECTURES)}")
    pairs = [(a, v) for a in names for v in VARIANTS]
    print(render(run_matrix(pairs, args.seconds, args.warmup, args.tiny)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
