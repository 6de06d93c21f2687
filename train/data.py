"""Data sources (Fashion-MNIST, ImageFolder), the train/validation/test split, statistics, batches.

Two loaders (``data.loader``):

* ``memory``: everything is decoded once into ``uint8`` arrays ``[N, H, W, C]`` (:class:`Split`):
  Fashion-MNIST is 47 MB that way, and an epoch then costs no decoding;
* ``stream``: an ImageFolder is only listed (:class:`FileSplit`) and each batch is decoded by
  DataLoader worker processes (:class:`StreamBatches`), for folders larger than memory.

``auto`` picks ``stream`` when the decoded folder would exceed ``data.memory_budget_mb``. Both
loaders split the same file lists, and decode through :func:`common.preprocess.decode_image` and
:func:`common.preprocess.prepare_image`, the functions serving uses. Fashion-MNIST is always in
memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
from loguru import logger
from numpy.typing import NDArray
from PIL import Image

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
    """Images ``uint8 [N, H, W, C]`` and integer labels ``[N]``, in memory."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, indices: NDArray[np.int64]) -> NDArray[np.uint8]:
        """The images at ``indices``, ``uint8 [n, H, W, C]``."""
        return self.images[indices]

    def take(self, indices: NDArray[np.int64]) -> Split:
        """The split of the rows at ``indices``."""
        return Split(self.images[indices], self.labels[indices])


@dataclass
class FileSplit:
    """Image files and their labels, decoded only when read (the ``stream`` loader)."""

    files: list[Path]
    labels: NDArray[np.int64]
    spec: PreprocessSpec
    max_pixels: int

    def __len__(self) -> int:
        return len(self.files)

    def read_one(self, index: int) -> NDArray[np.uint8]:
        """One image in the model's size and mode, ``uint8 [H, W, C]``."""
        return prepare_image(_decode_file(self.files[index], self.max_pixels), self.spec)

    def read(self, indices: NDArray[np.int64]) -> NDArray[np.uint8]:
        """The images at ``indices``, decoded and prepared, ``uint8 [n, H, W, C]``."""
        if len(indices) == 0:
            side, channels = self.spec.image_size, self.spec.channels
            return np.zeros((0, side, side, channels), dtype=np.uint8)
        return np.stack([self.read_one(int(i)) for i in indices])

    def take(self, indices: NDArray[np.int64]) -> FileSplit:
        """The split of the files at ``indices``."""
        files = [self.files[int(i)] for i in indices]
        return FileSplit(files, self.labels[indices], self.spec, self.max_pixels)


SplitT = TypeVar("SplitT", Split, FileSplit)
LoaderName = Literal["memory", "stream"]


@dataclass
class DataBundle(Generic[SplitT]):
    """The three splits, the class names and the preprocessing spec derived from the training split.

    ``original_sizes`` / ``original_modes`` count the decoded images by ``WxH`` and PIL mode; a
    streamed bundle leaves them empty (:func:`dataset_statistics` reads the file headers).
    """

    train: SplitT
    val: SplitT
    test: SplitT
    classes: list[str]
    spec: PreprocessSpec
    source: str
    original_sizes: dict[str, int] = field(default_factory=dict)
    original_modes: dict[str, int] = field(default_factory=dict)


#: What :func:`open_data` returns: decoded arrays or file lists, as ``data.loader`` chose.
AnyBundle = DataBundle[Split] | DataBundle[FileSplit]


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


def _decode_file(file: Path, max_pixels: int) -> Image.Image:
    try:
        return decode_image(file.read_bytes(), max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise DataError(f"cannot read image {file}: {exc}") from exc


def _list_folder(
    root: Path, classes: list[str], spec: PreprocessSpec, max_pixels: int
) -> FileSplit:
    files: list[Path] = []
    labels: list[int] = []
    for class_id, name in enumerate(classes):
        folder = root / name
        found = (
            sorted(
                p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if folder.is_dir()
            else []
        )
        if not found:
            raise DataError(f"class folder {folder} holds no .png/.jpg/.jpeg images")
        files.extend(found)
        labels.extend([class_id] * len(found))
    return FileSplit(files, np.asarray(labels, dtype=np.int64), spec, max_pixels)


def list_image_folder(cfg: DataConfig) -> tuple[FileSplit, FileSplit, list[str], str]:
    """List an ImageFolder: ``root/<class>/*`` or ``root/train/<class>/*`` + ``root/test/<class>/*``.

    Nothing is decoded here. Without a ``test`` folder a stratified ``test_fraction`` is held out
    with ``split_seed``. Returns the training files, the test files, the classes and the root.
    """
    if cfg.path is None:
        raise DataError("data.source is image_folder but data.path is not set")
    root = resolve_path(cfg.path)
    spec = PreprocessSpec(image_size=cfg.image_size, channels=cfg.channels, resample=cfg.resample)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _list_classes(root / "train")
        test_classes = _list_classes(root / "test")
        if test_classes != classes:
            raise DataError(f"{root}/train and {root}/test have different class folders")
        train = _list_folder(root / "train", classes, spec, cfg.max_image_pixels)
        test = _list_folder(root / "test", classes, spec, cfg.max_image_pixels)
        return train, test, classes, str(root)
    classes = _list_classes(root)
    everything = _list_folder(root, classes, spec, cfg.max_image_pixels)
    keep, held_out = stratified_split(everything.labels, cfg.test_fraction, cfg.split_seed)
    return subset(everything, keep), subset(everything, held_out), classes, str(root)


def decode_split(split: FileSplit, sizes: Counter[str], modes: Counter[str]) -> Split:
    """Decode every file of ``split`` into memory, counting original sizes and modes.

    Into one array allocated up front: stacking a list of images would hold them twice.
    """
    side, channels = split.spec.image_size, split.spec.channels
    images = np.empty((len(split), side, side, channels), dtype=np.uint8)
    for index, file in enumerate(split.files):
        image = _decode_file(file, split.max_pixels)
        sizes[f"{image.size[0]}x{image.size[1]}"] += 1
        modes[image.mode] += 1
        images[index] = prepare_image(image, split.spec)
    return Split(images, split.labels)


def choose_loader(cfg: DataConfig, num_images: int) -> LoaderName:
    """``data.loader``, with ``auto`` resolved by the decoded size against ``memory_budget_mb``."""
    if cfg.loader != "auto":
        return cfg.loader
    decoded_mb = num_images * cfg.image_size * cfg.image_size * cfg.channels / 2**20
    choice: LoaderName = "stream" if decoded_mb > cfg.memory_budget_mb else "memory"
    logger.info(
        "data.loader auto -> {}: {} images decoded at {}x{}x{} take {:.2f} MB, budget {:g} MB",
        choice,
        num_images,
        cfg.image_size,
        cfg.image_size,
        cfg.channels,
        decoded_mb,
        cfg.memory_budget_mb,
    )
    return choice


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


def subset(split: SplitT, indices: NDArray[np.int64]) -> SplitT:
    """Select rows of a split (arrays or file lists)."""
    return split.take(indices)


def limit_per_class(split: SplitT, limit: int, seed: int) -> SplitT:
    """Keep at most ``limit`` images of each class (seeded), for quick runs and tests."""
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == cls)
        keep.append(rng.permutation(idx)[:limit])
    return subset(split, np.sort(np.concatenate(keep)))


def _carve(cfg: DataConfig, full_train: SplitT, test: SplitT) -> tuple[SplitT, SplitT, SplitT]:
    """Subsample (``limit_per_class``) and hold out the validation split: train, val, test.

    Labels alone decide, so file lists and decoded arrays of the same files split identically.
    """
    if cfg.limit_per_class is not None:
        full_train = limit_per_class(full_train, cfg.limit_per_class, cfg.split_seed)
        test = limit_per_class(test, max(1, cfg.limit_per_class // 4), cfg.split_seed)
    train_idx, val_idx = stratified_split(full_train.labels, cfg.val_fraction, cfg.split_seed)
    return subset(full_train, train_idx), subset(full_train, val_idx), test


def _spec(cfg: DataConfig, train: Split | FileSplit) -> PreprocessSpec:
    """The spec of ``train``'s images with its pixel mean/std (a seeded sample when streaming)."""
    if isinstance(train, Split):
        mean, std = channel_stats(train.images)
        side, channels = int(train.images.shape[1]), int(train.images.shape[-1])
    else:
        rng = np.random.default_rng(cfg.split_seed)
        count = min(cfg.stats_sample_images, len(train))
        sample = np.sort(rng.permutation(len(train))[:count])
        # Decoded a chunk at a time: the sample itself may not fit in a tight budget.
        chunks = (train.read(sample[start : start + 64]) for start in range(0, count, 64))
        mean, std = merge_channel_stats(chunks)
        side, channels = cfg.image_size, cfg.channels
    return PreprocessSpec(
        image_size=side,
        channels=1 if channels == 1 else 3,
        mean=tuple(round(m, 4) for m in mean),
        std=tuple(round(s, 4) for s in std),
        resample=cfg.resample,
    )


def _bundle(
    cfg: DataConfig,
    splits: tuple[SplitT, SplitT, SplitT],
    classes: list[str],
    source: str,
    sizes: dict[str, int],
    modes: dict[str, int],
) -> DataBundle[SplitT]:
    train, val, test = splits
    logger.info(
        "data: {} train / {} val / {} test images, {} classes, from {}",
        len(train),
        len(val),
        len(test),
        len(classes),
        source,
    )
    return DataBundle(train, val, test, classes, _spec(cfg, train), source, sizes, modes)


def load_data(cfg: DataConfig) -> DataBundle[Split]:
    """Load the configured source into memory: train/val/test splits plus the preprocessing spec."""
    if cfg.source == "fashion_mnist":
        full_train, test, source = load_fashion_mnist(cfg)
        total = len(full_train) + len(test)
        splits = _carve(cfg, full_train, test)
        return _bundle(
            cfg, splits, list(FASHION_MNIST_CLASSES), source, {"28x28": total}, {"L": total}
        )
    full_files, test_files, classes, source = list_image_folder(cfg)
    return _decoded(cfg, _carve(cfg, full_files, test_files), classes, source)


def _decoded(
    cfg: DataConfig, files: tuple[FileSplit, FileSplit, FileSplit], classes: list[str], source: str
) -> DataBundle[Split]:
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    train, val, test = (decode_split(split, sizes, modes) for split in files)
    return _bundle(cfg, (train, val, test), classes, source, dict(sizes), dict(modes))


def open_data(cfg: DataConfig) -> AnyBundle:
    """The configured source with the loader ``data.loader`` picks (Fashion-MNIST: memory)."""
    if cfg.source == "fashion_mnist":
        return load_data(cfg)
    full_files, test_files, classes, source = list_image_folder(cfg)
    files = _carve(cfg, full_files, test_files)
    if choose_loader(cfg, sum(len(split) for split in files)) == "memory":
        return _decoded(cfg, files, classes, source)
    return _bundle(cfg, files, classes, source, {}, {})


# --------------------------------------------------------------------------- photo-like uploads


def photo_like_upload(
    pixels: NDArray[np.uint8],
    side: int,
    quality: int,
    upscale: Image.Resampling = Image.Resampling.BICUBIC,
) -> bytes:
    """``pixels`` ``[H, W, C]`` as a phone or a web shop would send them: larger, RGB, JPEG."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")
    image = image.resize((side, side), upscale)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def with_upload_variation(split: Split, spec: PreprocessSpec, cfg: DataConfig, seed: int) -> Split:
    """A copy of ``split`` whose ``cfg.upload_variation`` share went through an upload round trip.

    Each chosen image becomes a photo-like upload of itself (a random side in
    ``cfg.upload_sides``, a random ``cfg.upload_jpeg_quality``), decoded and shrunk back by the
    serving path's own functions, so the model learns what served photos look like.
    """
    count = round(len(split) * cfg.upload_variation)
    if count == 0:
        return split
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(split), size=count, replace=False)
    sides = rng.integers(cfg.upload_sides[0], cfg.upload_sides[1] + 1, size=count)
    qualities = rng.integers(cfg.upload_jpeg_quality[0], cfg.upload_jpeg_quality[1] + 1, size=count)
    images = split.images.copy()
    for index, side, quality in zip(
        chosen.tolist(), sides.tolist(), qualities.tolist(), strict=True
    ):
        data = photo_like_upload(images[index], side, quality)
        images[index] = prepare_image(decode_image(data, max_pixels=side * side), spec)
    logger.info("data: {} of {} training images replaced by photo-like uploads", count, len(split))
    return Split(images, split.labels)


# --------------------------------------------------------------------------- statistics


def channel_stats(images: NDArray[np.uint8], chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale, summed ``chunk`` images at a time.

    A float64 copy of the whole set would take 8 times its memory (19 GB for 16,000 RGB images
    at 224x224); see :func:`merge_channel_stats`.
    """
    return merge_channel_stats(
        images[start : start + chunk] for start in range(0, len(images), chunk)
    )


def merge_channel_stats(chunks: Iterable[NDArray[np.uint8]]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale over ``uint8 [n, H, W, C]`` chunks, one pass.

    Counts each channel's 256 values (``np.bincount``, 4x faster than float sums), then takes
    the moments of the histogram in integers: no rounding to cancel, however many images.
    """
    histogram: NDArray[np.int64] | None = None
    for part in chunks:
        flat = part.reshape(-1, part.shape[-1])
        counts = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(flat.shape[1])])
        histogram = counts if histogram is None else histogram + counts
    if histogram is None:
        return [0.0], [0.0]
    mean, std = [], []
    for counts in histogram.tolist():
        n = max(sum(counts), 1)
        total = sum(value * k for value, k in enumerate(counts))
        squares = sum(value * value * k for value, k in enumerate(counts))
        mean.append(total / (255.0 * n))
        std.append(math.sqrt(n * squares - total * total) / (255.0 * n))
    return mean, std


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _hashes(images: NDArray[np.uint8]) -> list[str]:
    return [_digest(img.tobytes()) for img in images]


def _file_hashes(split: FileSplit, sizes: Counter[str], modes: Counter[str]) -> list[str]:
    """Hashes of the files' bytes, counting sizes and modes from their headers (no decoding)."""
    hashes = []
    for file in split.files:
        data = file.read_bytes()
        hashes.append(_digest(data))
        _count_header(file, data, sizes, modes)
    return hashes


def _count_header(file: Path, data: bytes, sizes: Counter[str], modes: Counter[str]) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            sizes[f"{image.size[0]}x{image.size[1]}"] += 1
            modes[image.mode] += 1
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {file}: {exc}") from exc


def original_sizes(bundle: AnyBundle) -> dict[str, int]:
    """Original ``WxH`` counts of all splits: a decoded bundle's own, else from file headers."""
    if isinstance(bundle.train, Split):
        return dict(bundle.original_sizes)
    sizes: Counter[str] = Counter()
    for split in (bundle.train, bundle.val, bundle.test):
        assert isinstance(split, FileSplit)  # a bundle's splits are all of one kind
        for file in split.files:
            try:
                with Image.open(file) as image:  # reads the header only
                    sizes[f"{image.size[0]}x{image.size[1]}"] += 1
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read image {file}: {exc}") from exc
    return dict(sizes)


def dataset_statistics(bundle: AnyBundle) -> dict[str, Any]:
    """Counts per class and split, pixel mean/std, sizes, modes, exact duplicates within/between splits.

    Decoded images are compared by their pixels; streamed ones by their files' bytes, with sizes
    and modes read from the headers and the pixel mean/std of the spec (a sample of the images).
    """
    splits = {"train": bundle.train, "val": bundle.val, "test": bundle.test}
    sizes, modes = Counter(bundle.original_sizes), Counter(bundle.original_modes)
    hashes: dict[str, list[str]] = {}
    for name, split in splits.items():
        if isinstance(split, Split):
            hashes[name] = _hashes(split.images)
        else:
            hashes[name] = _file_hashes(split, sizes, modes)
    if isinstance(bundle.train, Split):
        mean, std = channel_stats(bundle.train.images)
        shape = list(bundle.train.images.shape[1:])
    else:
        mean, std = list(bundle.spec.mean), list(bundle.spec.std)
        shape = [bundle.spec.image_size, bundle.spec.image_size, bundle.spec.channels]
    sets = {name: set(h) for name, h in hashes.items()}
    return {
        "source": bundle.source,
        "classes": bundle.classes,
        "counts": {
            name: {cls: int((split.labels == i).sum()) for i, cls in enumerate(bundle.classes)}
            for name, split in splits.items()
        },
        "sizes": {name: len(split) for name, split in splits.items()},
        "image_shape": shape,
        "original_sizes": dict(sizes),
        "original_modes": dict(modes),
        "pixel_mean": mean,
        "pixel_std": std,
        "duplicates": {name: len(h) - len(sets[name]) for name, h in hashes.items()}
        | {
            "train_test_overlap": len(sets["train"] & sets["test"]),
            "train_val_overlap": len(sets["train"] & sets["val"]),
            "val_test_overlap": len(sets["val"] & sets["test"]),
        },
        "preprocess": bundle.spec.model_dump(mode="json"),
    }


def _tally(counts: dict[str, int], shown: int = 5) -> str:
    """``'a: 3, b: 2, ... (7 in all)'``, largest first."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{key}: {value}" for key, value in ranked[:shown])
    return text + (f", ... ({len(ranked)} in all)" if len(ranked) > shown else "")


def data_findings(stats: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    """What to know before training, from :func:`dataset_statistics`: each with a suggestion.

    Class imbalance (largest / smallest training class above ``cfg.imbalance_ratio_warning``),
    classes under ``cfg.min_class_images`` training images, mixed original sizes and colour
    modes, and images present in more than one split.
    """
    findings: list[dict[str, str]] = []

    def add(kind: str, message: str, suggestion: str) -> None:
        findings.append({"kind": kind, "message": message, "suggestion": suggestion})

    train_counts: dict[str, int] = stats["counts"]["train"]
    largest = max(train_counts, key=lambda c: train_counts[c])
    smallest = min(train_counts, key=lambda c: train_counts[c])
    ratio = train_counts[largest] / max(train_counts[smallest], 1)
    if ratio > cfg.imbalance_ratio_warning:
        add(
            "class_imbalance",
            f"class imbalance: '{largest}' has {train_counts[largest]} training images, "
            f"{ratio:.1f}x the {train_counts[smallest]} of '{smallest}' "
            f"(threshold {cfg.imbalance_ratio_warning:g}x)",
            "weight the loss by class (or sample classes evenly), or collect more images of "
            "the small classes; judge the model by per-class recall, not accuracy alone",
        )
    tiny = {c: n for c, n in train_counts.items() if n < cfg.min_class_images}
    if tiny:
        add(
            "tiny_classes",
            f"{len(tiny)} class(es) under {cfg.min_class_images} training images: {_tally(tiny)}",
            "collect more images of them (or merge them into a related class): their "
            "validation and test figures rest on a handful of images",
        )
    if len(stats["original_sizes"]) > 1:
        add(
            "mixed_sizes",
            f"{len(stats['original_sizes'])} different image sizes: "
            f"{_tally(stats['original_sizes'])}",
            f"all are resized to {stats['image_shape'][0]}x{stats['image_shape'][1]} without "
            "keeping the aspect ratio: crop or pad them to one shape first if objects get "
            "distorted, and make sure size does not give the class away",
        )
    if len(stats["original_modes"]) > 1:
        add(
            "mixed_modes",
            f"{len(stats['original_modes'])} colour modes: {_tally(stats['original_modes'])}",
            f"all are converted to {'grayscale' if stats['image_shape'][2] == 1 else 'RGB'}; "
            "make sure the mode (e.g. grayscale scans) does not go with one class",
        )
    duplicates = stats["duplicates"]
    across = {
        pair: duplicates[f"{pair}_overlap"] for pair in ("train_test", "train_val", "val_test")
    }
    if any(across.values()):
        listed = ", ".join(f"{pair.replace('_', '/')}: {n}" for pair, n in across.items() if n)
        add(
            "duplicates_across_splits",
            f"identical images in more than one split ({listed})",
            "remove the copies from one side: duplicates across splits make validation and "
            "test accuracy look better than it is",
        )
    return findings


def format_findings(findings: list[dict[str, str]]) -> str:
    """The findings as lines for a terminal: a marker, the finding, then the suggestion."""
    if not findings:
        return "no findings: classes are balanced, sizes and modes uniform, splits disjoint"
    return "\n".join(f"! {f['message']}\n  -> {f['suggestion']}" for f in findings)


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


class _DecodedFiles(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """A :class:`FileSplit` as a map-style dataset: ``(uint8 [C, H, W], label)`` per index."""

    def __init__(self, split: FileSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.split.read_one(index)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(
            self.split.labels[index]
        )


class StreamBatches:
    """``(uint8 [B, C, H, W], int64 [B])`` batches of a :class:`FileSplit`, decoded by workers.

    ``data.num_workers`` persistent worker processes decode (``0``: in this process), into
    pinned memory when CUDA is available. Shuffled splits draw their order from ``seed`` and
    the epoch (:meth:`set_epoch`), so a resumed run sees the orders it would have seen; under
    ``torch.distributed`` a :class:`~torch.utils.data.DistributedSampler` gives each rank its
    share. Unshuffled splits keep the file order.
    """

    def __init__(
        self, split: FileSplit, batch_size: int, cfg: DataConfig, shuffle: bool, seed: int = 0
    ) -> None:
        self.split = split
        self.seed = seed
        dataset = _DecodedFiles(split)
        self.order = torch.Generator().manual_seed(seed)
        self.sampler: torch.utils.data.Sampler[int] | None = None
        #: Images one pass yields (this rank's share under ``torch.distributed``).
        self.num_images = len(split)
        if shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
            distributed: torch.utils.data.DistributedSampler[int] = (
                torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)
            )
            self.sampler, self.num_images = distributed, len(distributed)
        elif shuffle:
            self.sampler = torch.utils.data.RandomSampler(dataset, generator=self.order)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def set_epoch(self, epoch: int) -> None:
        """Fix the order of epoch ``epoch`` (the same on every run with this seed)."""
        if isinstance(self.sampler, torch.utils.data.DistributedSampler):
            self.sampler.set_epoch(epoch)
        else:
            self.order.manual_seed(self.seed + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from self.loader
        except DataError as exc:
            # A worker's error arrives with its traceback in the message: keep the last line.
            raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ")[-1]) from None


#: What the engine trains and evaluates on: whole tensors, or batches streamed from files.
BatchSource = tuple[torch.Tensor, torch.Tensor] | StreamBatches


def batch_source(
    split: Split | FileSplit, batch_size: int, cfg: DataConfig, shuffle: bool, seed: int = 0
) -> BatchSource:
    """``split`` as the engine takes it: tensors for arrays, :class:`StreamBatches` for files."""
    if isinstance(split, Split):
        return to_tensors(split)
    return StreamBatches(split, batch_size, cfg, shuffle, seed)
