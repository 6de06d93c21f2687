"""Data sources (Fashion-MNIST, ImageFolder), the train/validation/test split, statistics, batches.

Everything is decoded once into ``uint8`` arrays ``[N, H, W, C]`` held in memory: Fashion-MNIST
is 47 MB that way, and an epoch then costs no decoding. ImageFolder images go through
:func:`common.preprocess.prepare_image`, the same function serving uses.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from numpy.typing import NDArray

from common.preprocess import ImageDecodeError, PreprocessSpec, decode_image, prepare_image
from train.config import DataConfig, resolve_path
from train.distributed import SINGLE, DistributedContext

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


class DataError(RuntimeError):
    """The data set is missing or corrupt; the message says which file or folder."""


@dataclass
class Split:
    """Images ``uint8 [N, H, W, C]`` and integer labels ``[N]``."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataBundle:
    """The three splits, the class names and the preprocessing spec derived from the training split."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    spec: PreprocessSpec
    source: str
    original_sizes: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> NDArray[np.uint8]:
    """Read a gzipped idx file (the MNIST format) into a ``uint8`` array."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError as exc:
        raise DataError(f"Fashion-MNIST file missing: {path}") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"Fashion-MNIST file {path} is not valid gzip: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"Fashion-MNIST file {path} is truncated (no header)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(f"Fashion-MNIST file {path} has a bad idx header")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"Fashion-MNIST file {path} is truncated (incomplete header)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims))
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != expected:
        raise DataError(
            f"Fashion-MNIST file {path} is truncated: {payload.size} bytes of {expected} expected"
        )
    return payload.reshape(dims)


def find_fashion_mnist(cfg: DataConfig) -> Path:
    """Return the folder holding the four idx files: configured path, Debian's, then a download."""
    if cfg.path is not None:
        folder = resolve_path(cfg.path)
        missing = [n for n in FASHION_MNIST_FILES.values() if not (folder / n).exists()]
        if missing:
            raise DataError(f"configured data.path {folder} lacks {', '.join(missing)}")
        return folder
    for folder in (cfg.debian_path, resolve_path(cfg.download_root) / "FashionMNIST" / "raw"):
        if all((folder / n).exists() for n in FASHION_MNIST_FILES.values()):
            return folder
    if not cfg.allow_download:
        raise DataError(
            f"Fashion-MNIST not found at {cfg.debian_path} "
            "(install it: apt-get install dataset-fashion-mnist) and downloads are disabled"
        )
    return _download_fashion_mnist(resolve_path(cfg.download_root))


def _download_fashion_mnist(root: Path) -> Path:
    from torchvision.datasets import FashionMNIST  # only for users who are online

    logger.info("downloading Fashion-MNIST to {}", root)
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:
        raise DataError(
            f"Fashion-MNIST not found locally and the download failed ({exc}); "
            "install it with: apt-get install dataset-fashion-mnist, or set data.path"
        ) from exc
    return root / "FashionMNIST" / "raw"


def load_fashion_mnist(
    cfg: DataConfig,
) -> tuple[Split, Split, str]:
    """Load the full training and test sets (images ``[N, 28, 28, 1]``)."""
    folder = find_fashion_mnist(cfg)
    arrays = {key: read_idx(folder / name) for key, name in FASHION_MNIST_FILES.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"Fashion-MNIST {part} images and labels in {folder} do not match")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"Fashion-MNIST {part} labels in {folder} go beyond 10 classes")
    train = Split(arrays["train_images"][..., None], arrays["train_labels"].astype(np.int64))
    test = Split(arrays["test_images"][..., None], arrays["test_labels"].astype(np.int64))
    return train, test, str(folder)


# --------------------------------------------------------------------------- ImageFolder


def _list_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"image folder {root} needs at least two class sub-folders")
    return classes


def _read_folder(
    root: Path, classes: list[str], spec: PreprocessSpec, max_pixels: int
) -> tuple[Split, list[tuple[int, int]]]:
    images: list[NDArray[np.uint8]] = []
    labels: list[int] = []
    sizes: list[tuple[int, int]] = []
    for class_id, name in enumerate(classes):
        folder = root / name
        files = (
            sorted(
                p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if folder.is_dir()
            else []
        )
        if not files:
            raise DataError(f"class folder {folder} holds no .png/.jpg/.jpeg images")
        for file in files:
            try:
                image = decode_image(file.read_bytes(), max_pixels=max_pixels)
            except ImageDecodeError as exc:
                raise DataError(f"cannot read image {file}: {exc}") from exc
            sizes.append(image.size)
            images.append(prepare_image(image, spec))
            labels.append(class_id)
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64)), sizes


def load_image_folder(
    cfg: DataConfig,
) -> tuple[Split, Split, list[str], str, list[tuple[int, int]]]:
    """Load an ImageFolder: ``root/<class>/*`` or ``root/train/<class>/*`` + ``root/test/<class>/*``.

    Without a ``test`` folder a stratified ``test_fraction`` is held out with ``split_seed``.
    """
    if cfg.path is None:
        raise DataError("data.source is image_folder but data.path is not set")
    root = resolve_path(cfg.path)
    spec = PreprocessSpec(image_size=cfg.image_size, channels=cfg.channels)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _list_classes(root / "train")
        test_classes = _list_classes(root / "test")
        if test_classes != classes:
            raise DataError(f"{root}/train and {root}/test have different class folders")
        train, sizes = _read_folder(root / "train", classes, spec, cfg.max_image_pixels)
        test, test_sizes = _read_folder(root / "test", classes, spec, cfg.max_image_pixels)
        return train, test, classes, str(root), sizes + test_sizes
    classes = _list_classes(root)
    everything, sizes = _read_folder(root, classes, spec, cfg.max_image_pixels)
    keep, held_out = stratified_split(everything.labels, cfg.test_fraction, cfg.split_seed)
    return subset(everything, keep), subset(everything, held_out), classes, str(root), sizes


# --------------------------------------------------------------------------- splitting


def stratified_split(
    labels: NDArray[np.int64], fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split indices so each class keeps the same share in both parts (at least one each side)."""
    rng = np.random.default_rng(seed)
    first: list[NDArray[np.int64]] = []
    second: list[NDArray[np.int64]] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        if idx.size < 2:
            raise DataError(f"class {int(cls)} has {idx.size} image(s); at least 2 are needed")
        n_second = min(max(1, round(idx.size * fraction)), idx.size - 1)
        second.append(idx[:n_second])
        first.append(idx[n_second:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def subset(split: Split, indices: NDArray[np.int64]) -> Split:
    """Select rows of a split."""
    return Split(split.images[indices], split.labels[indices])


def limit_per_class(split: Split, limit: int, seed: int) -> Split:
    """Keep at most ``limit`` images of each class (seeded), for quick runs and tests."""
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == cls)
        keep.append(rng.permutation(idx)[:limit])
    return subset(split, np.sort(np.concatenate(keep)))


def load_data(cfg: DataConfig) -> DataBundle:
    """Load the configured source and return train/val/test splits plus the preprocessing spec."""
    original_sizes: dict[str, int] = {}
    if cfg.source == "fashion_mnist":
        full_train, test, source = load_fashion_mnist(cfg)
        classes = list(FASHION_MNIST_CLASSES)
        original_sizes = {"28x28": len(full_train) + len(test)}
    else:
        full_train, test, classes, source, sizes = load_image_folder(cfg)
        for width, height in sizes:
            key = f"{width}x{height}"
            original_sizes[key] = original_sizes.get(key, 0) + 1
    if cfg.limit_per_class is not None:
        full_train = limit_per_class(full_train, cfg.limit_per_class, cfg.split_seed)
        test = limit_per_class(test, max(1, cfg.limit_per_class // 4), cfg.split_seed)
    train_idx, val_idx = stratified_split(full_train.labels, cfg.val_fraction, cfg.split_seed)
    train, val = subset(full_train, train_idx), subset(full_train, val_idx)
    mean, std = channel_stats(train.images)
    spec = PreprocessSpec(
        image_size=int(train.images.shape[1]),
        channels=1 if train.images.shape[-1] == 1 else 3,
        mean=tuple(round(m, 4) for m in mean),
        std=tuple(round(s, 4) for s in std),
    )
    logger.info(
        "data: {} train / {} val / {} test images, {} classes, from {}",
        len(train),
        len(val),
        len(test),
        len(classes),
        source,
    )
    return DataBundle(train, val, test, classes, spec, source, original_sizes)


# --------------------------------------------------------------------------- statistics


def channel_stats(images: NDArray[np.uint8]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale."""
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return flat.mean(axis=0).tolist(), flat.std(axis=0).tolist()


def _hashes(images: NDArray[np.uint8]) -> list[str]:
    return [hashlib.blake2b(img.tobytes(), digest_size=12).hexdigest() for img in images]


def dataset_statistics(bundle: DataBundle) -> dict[str, Any]:
    """Counts per class and split, pixel mean/std, sizes, and exact duplicates within/between splits."""
    splits = {"train": bundle.train, "val": bundle.val, "test": bundle.test}
    hashes = {name: _hashes(split.images) for name, split in splits.items()}
    train_set, test_set = set(hashes["train"]), set(hashes["test"])
    mean, std = channel_stats(bundle.train.images)
    return {
        "source": bundle.source,
        "classes": bundle.classes,
        "counts": {
            name: {cls: int((split.labels == i).sum()) for i, cls in enumerate(bundle.classes)}
            for name, split in splits.items()
        },
        "sizes": {name: len(split) for name, split in splits.items()},
        "image_shape": list(bundle.train.images.shape[1:]),
        "original_sizes": bundle.original_sizes,
        "pixel_mean": mean,
        "pixel_std": std,
        "duplicates": {name: len(h) - len(set(h)) for name, h in hashes.items()}
        | {"train_test_overlap": len(train_set & test_set)},
        "preprocess": bundle.spec.model_dump(mode="json"),
    }


def write_statistics(stats: dict[str, Any], path: Path) -> Path:
    """Write statistics JSON (creating folders) and return the path."""
    target = resolve_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(stats, indent=2))
    return target


# --------------------------------------------------------------------------- batches


def to_tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """``uint8 [N, C, H, W]`` images and ``int64`` labels as torch tensors (shared memory)."""
    images = torch.from_numpy(
        np.require(split.images.transpose(0, 3, 1, 2), requirements=["C", "W"])
    )
    return images, torch.from_numpy(split.labels)


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    context: DistributedContext = SINGLE,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches; shuffled when a generator is given.

    The order is drawn on the CPU (``generator`` is a CPU generator) and indexes ``images``
    where they are, so data held on a GPU is batched there in the same order. Under ``torchrun``
    every process draws the same order and takes its ``context`` shard of it.
    """
    n = int(labels.shape[0])
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = context.shard(order).to(images.device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]
