"""Data sources, splits, statistics and batches, on the tiny generated data sets of conftest."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.datasets
from numpy.typing import NDArray
from PIL import Image

from common.preprocess import PreprocessSpec
from train.config import DataConfig
from train.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    DataBundle,
    DataError,
    Split,
    channel_stats,
    dataset_statistics,
    find_fashion_mnist,
    iterate_batches,
    limit_per_class,
    list_image_folder,
    load_data,
    load_fashion_mnist,
    read_idx,
    stratified_split,
    subset,
    to_tensors,
    with_upload_variation,
    write_statistics,
)

MakeFmnist = Callable[..., Path]
MakeImageFolder = Callable[..., Path]
CLASSES = ["circle", "horizontal", "vertical"]  # conftest.IMAGE_FOLDER_CLASSES, sorted


def _gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


def _cfg(tmp_path: Path, **kwargs: Any) -> DataConfig:
    """A config that can never reach the real Debian folder or the network."""
    base: dict[str, Any] = {
        "debian_path": tmp_path / "no-debian",
        "download_root": tmp_path / "downloads",
        "allow_download": False,
    }
    return DataConfig.model_validate(base | kwargs)


def _rows(images: NDArray[np.uint8]) -> list[bytes]:
    return [image.tobytes() for image in images]


# --------------------------------------------------------------------------- read_idx


def test_read_idx_images_and_labels(fmnist_dir: Path) -> None:
    images = read_idx(fmnist_dir / FASHION_MNIST_FILES["train_images"])
    labels = read_idx(fmnist_dir / FASHION_MNIST_FILES["train_labels"])
    assert images.shape == (120, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (120,)
    assert np.bincount(labels).tolist() == [12] * 10
    raw = gzip.decompress((fmnist_dir / FASHION_MNIST_FILES["train_images"]).read_bytes())
    assert struct.unpack(">I", raw[:4])[0] == 0x00000803
    raw_labels = gzip.decompress((fmnist_dir / FASHION_MNIST_FILES["train_labels"]).read_bytes())
    assert struct.unpack(">I", raw_labels[:4])[0] == 0x00000801
    assert np.array_equal(
        images[5], np.frombuffer(raw[16 + 5 * 784 : 16 + 6 * 784], np.uint8).reshape(28, 28)
    )


def test_read_idx_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "train-images-idx3-ubyte.gz"
    with pytest.raises(
        DataError, match=r"Fashion-MNIST file missing: .*train-images-idx3-ubyte\.gz"
    ):
        read_idx(missing)


def test_read_idx_not_gzip(tmp_path: Path) -> None:
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(DataError, match=r"plain\.gz is not valid gzip"):
        read_idx(plain)


def test_read_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    good = gzip.compress(struct.pack(">HBBI", 0, 8, 1, 1000) + bytes(1000))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.gz is not valid gzip"):
        read_idx(cut)


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">HBB", 1, 0x08, 1),  # non-zero magic start
        struct.pack(">HBB", 0, 0x0D, 1),  # float data
        struct.pack(">HBB", 0, 0x08, 2),  # two dimensions
    ],
    ids=["magic", "dtype", "ndim"],
)
def test_read_idx_bad_header(tmp_path: Path, header: bytes) -> None:
    bad = _gz(tmp_path / "bad.gz", header + struct.pack(">II", 1, 1) + b"\x00")
    with pytest.raises(DataError, match=r"bad\.gz has a bad idx header"):
        read_idx(bad)


def test_read_idx_no_header(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"truncated \(no header\)"):
        read_idx(_gz(tmp_path / "short.gz", b"\x00\x00"))


def test_read_idx_incomplete_dimensions(tmp_path: Path) -> None:
    """A 3-D header needs 12 bytes of sizes; 4 of them used to crash with struct.error."""
    short = _gz(tmp_path / "short.gz", struct.pack(">HBBI", 0, 8, 3, 5))
    with pytest.raises(DataError, match=r"short.gz is truncated \(incomplete header\)"):
        read_idx(short)


def test_read_idx_truncated_payload(tmp_path: Path) -> None:
    cut = _gz(tmp_path / "cut.gz", struct.pack(">HBBIII", 0, 8, 3, 2, 28, 28) + bytes(784 + 10))
    with pytest.raises(DataError, match=r"cut\.gz is truncated: 794 bytes of 1568 expected"):
        read_idx(cut)


# --------------------------------------------------------------------------- find_fashion_mnist


def test_configured_path_wins(tmp_path: Path, fmnist_dir: Path, make_fmnist: MakeFmnist) -> None:
    debian = make_fmnist(tmp_path / "debian", train_per_class=2, test_per_class=1)
    cfg = _cfg(tmp_path, path=fmnist_dir, debian_path=debian)
    assert find_fashion_mnist(cfg) == fmnist_dir


def test_configured_path_missing_files_names_them(tmp_path: Path, fmnist_dir: Path) -> None:
    (fmnist_dir / FASHION_MNIST_FILES["test_labels"]).unlink()
    cfg = _cfg(tmp_path, path=fmnist_dir, debian_path=fmnist_dir)
    with pytest.raises(DataError) as info:
        find_fashion_mnist(cfg)
    assert str(info.value) == (
        f"configured data.path {fmnist_dir} lacks {FASHION_MNIST_FILES['test_labels']}"
    )


def test_debian_path_used_when_path_unset(tmp_path: Path, make_fmnist: MakeFmnist) -> None:
    debian = make_fmnist(tmp_path / "usr-share-datasets", train_per_class=2, test_per_class=1)
    make_fmnist(tmp_path / "downloads" / "FashionMNIST" / "raw", train_per_class=2)
    assert find_fashion_mnist(_cfg(tmp_path, debian_path=debian)) == debian


def test_earlier_download_used_when_debian_missing(
    tmp_path: Path, make_fmnist: MakeFmnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_fmnist(tmp_path / "downloads" / "FashionMNIST" / "raw", train_per_class=2)

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("must not download when the files are there")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_download)
    assert find_fashion_mnist(_cfg(tmp_path, allow_download=True)) == raw


def test_nothing_found_and_downloads_disabled(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(DataError) as info:
        find_fashion_mnist(cfg)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "no-debian") in message
    assert "downloads are disabled" in message


def test_download_branch_writes_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_fmnist: MakeFmnist
) -> None:
    calls: list[tuple[str, bool, bool]] = []

    class FakeFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            make_fmnist(Path(root) / "FashionMNIST" / "raw", train_per_class=2, test_per_class=1)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    cfg = _cfg(tmp_path, allow_download=True)
    folder = find_fashion_mnist(cfg)
    root = tmp_path / "downloads"
    assert folder == root / "FashionMNIST" / "raw"
    assert calls == [(str(root), True, True), (str(root), False, True)]
    train, test, source = load_fashion_mnist(cfg)
    assert (len(train), len(test), source) == (20, 10, str(folder))


def test_download_failure_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class OfflineFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise RuntimeError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", OfflineFashionMNIST)
    with pytest.raises(DataError) as info:
        find_fashion_mnist(_cfg(tmp_path, allow_download=True))
    message = str(info.value)
    assert "download failed (network is unreachable)" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert isinstance(info.value.__cause__, RuntimeError)


# --------------------------------------------------------------------------- load_fashion_mnist


def test_load_fashion_mnist_shapes(tmp_path: Path, fmnist_dir: Path) -> None:
    train, test, source = load_fashion_mnist(_cfg(tmp_path, path=fmnist_dir))
    assert train.images.shape == (120, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (40, 28, 28, 1)
    assert train.labels.dtype == np.int64 and len(test) == 40
    assert source == str(fmnist_dir)


def test_images_and_labels_must_match(tmp_path: Path, fmnist_dir: Path) -> None:
    labels = read_idx(fmnist_dir / FASHION_MNIST_FILES["test_labels"])
    _gz(
        fmnist_dir / FASHION_MNIST_FILES["test_labels"],
        struct.pack(">HBBI", 0, 8, 1, labels.size - 1) + labels[:-1].tobytes(),
    )
    with pytest.raises(DataError, match=r"test images and labels in .* do not match"):
        load_fashion_mnist(_cfg(tmp_path, path=fmnist_dir))


def test_labels_beyond_ten_classes(tmp_path: Path, fmnist_dir: Path) -> None:
    labels = read_idx(fmnist_dir / FASHION_MNIST_FILES["train_labels"]).copy()
    labels[0] = 10
    _gz(
        fmnist_dir / FASHION_MNIST_FILES["train_labels"],
        struct.pack(">HBBI", 0, 8, 1, labels.size) + labels.tobytes(),
    )
    with pytest.raises(DataError, match=r"train labels in .* go beyond 10 classes"):
        load_fashion_mnist(_cfg(tmp_path, path=fmnist_dir))


# --------------------------------------------------------------------------- load_data splits


def test_load_data_fashion_mnist_split(tmp_path: Path, fmnist_dir: Path) -> None:
    bundle = load_data(_cfg(tmp_path, path=fmnist_dir, val_fraction=0.25))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (90, 30, 40)
    assert np.bincount(bundle.val.labels, minlength=10).tolist() == [3] * 10  # 25% of 12
    assert np.bincount(bundle.train.labels, minlength=10).tolist() == [9] * 10
    assert bundle.classes == list(FASHION_MNIST_CLASSES)
    assert bundle.source == str(fmnist_dir)
    assert bundle.original_sizes == {"28x28": 160}
    full = read_idx(fmnist_dir / FASHION_MNIST_FILES["train_images"])
    train_rows, val_rows = set(_rows(bundle.train.images)), set(_rows(bundle.val.images))
    assert not train_rows & val_rows  # disjoint
    assert train_rows | val_rows == set(_rows(full[..., None]))  # and together the whole set
    full_labels = read_idx(fmnist_dir / FASHION_MNIST_FILES["train_labels"])
    by_row = dict(zip(_rows(full[..., None]), full_labels.tolist(), strict=True))
    for split in (bundle.train, bundle.val):
        assert [by_row[r] for r in _rows(split.images)] == split.labels.tolist()  # labels follow


def test_load_data_spec_from_training_split(tmp_path: Path, fmnist_dir: Path) -> None:
    bundle = load_data(_cfg(tmp_path, path=fmnist_dir))
    pixels = bundle.train.images.astype(np.float64) / 255.0
    assert bundle.spec.image_size == 28 and bundle.spec.channels == 1
    assert bundle.spec.mean == (round(float(pixels.mean()), 4),)
    assert bundle.spec.std == (round(float(pixels.std()), 4),)


def test_split_is_seeded_and_deterministic(tmp_path: Path, fmnist_dir: Path) -> None:
    first = load_data(_cfg(tmp_path, path=fmnist_dir, split_seed=7))
    again = load_data(_cfg(tmp_path, path=fmnist_dir, split_seed=7))
    other = load_data(_cfg(tmp_path, path=fmnist_dir, split_seed=8))
    assert np.array_equal(first.val.images, again.val.images)
    assert np.array_equal(first.train.labels, again.train.labels)
    assert not np.array_equal(first.val.images, other.val.images)


def test_limit_per_class_in_load_data(tmp_path: Path, fmnist_dir: Path) -> None:
    bundle = load_data(_cfg(tmp_path, path=fmnist_dir, limit_per_class=5, val_fraction=0.2))
    assert np.bincount(bundle.train.labels, minlength=10).tolist() == [4] * 10
    assert np.bincount(bundle.val.labels, minlength=10).tolist() == [1] * 10
    assert np.bincount(bundle.test.labels, minlength=10).tolist() == [1] * 10  # max(1, 5 // 4)


def test_limit_per_class_is_seeded() -> None:
    labels = np.repeat(np.arange(3), 10).astype(np.int64)
    split = Split(np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1), labels)
    kept = limit_per_class(split, 4, seed=1)
    assert np.bincount(kept.labels).tolist() == [4, 4, 4]
    assert np.array_equal(kept.images, limit_per_class(split, 4, seed=1).images)
    assert not np.array_equal(kept.images, limit_per_class(split, 4, seed=2).images)
    assert np.bincount(limit_per_class(split, 50, seed=0).labels).tolist() == [10, 10, 10]
    assert np.all(np.diff(kept.images.ravel().astype(np.int64)) > 0)  # original order kept


def test_stratified_split_edges() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=np.int64)
    keep, held = stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[held]).tolist() == [1, 1]  # at least one of each class
    assert np.bincount(labels[keep]).tolist() == [1, 9]  # and at least one left behind
    assert sorted([*keep.tolist(), *held.tolist()]) == list(range(12))
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(held) > 0)


def test_stratified_split_refuses_a_single_image_class() -> None:
    with pytest.raises(DataError, match="class 2 has 1 image"):
        stratified_split(np.array([0, 0, 1, 1, 2], dtype=np.int64), 0.2, seed=0)


def test_subset() -> None:
    split = Split(np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1), np.arange(4, dtype=np.int64))
    part = subset(split, np.array([3, 1], dtype=np.int64))
    assert part.labels.tolist() == [3, 1] and part.images.ravel().tolist() == [3, 1]


# --------------------------------------------------------------------------- image folders


def test_image_folder_flat(tmp_path: Path, image_folder: Path) -> None:
    cfg = _cfg(tmp_path, source="image_folder", path=image_folder, image_size=16, channels=3)
    bundle = load_data(cfg)
    assert bundle.classes == CLASSES
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 3, 6)
    assert bundle.train.images.shape == (15, 16, 16, 3)
    assert np.bincount(bundle.test.labels).tolist() == [2, 2, 2]  # 20% of 8, per class
    assert bundle.original_sizes == {"20x16": 9, "24x24": 9, "30x18": 6}
    assert bundle.spec.image_size == 16 and bundle.spec.channels == 3
    assert len(bundle.spec.mean) == 3
    # The configured downscale filter travels with the model, so serving shrinks uploads alike.
    assert bundle.spec.resample == cfg.resample == "lanczos"
    assert load_data(cfg.model_copy(update={"resample": "box"})).spec.resample == "box"
    assert bundle.source == str(image_folder)
    # the class patterns survive: class c is strongest in colour channel c
    for c in range(3):
        colours = bundle.train.images[bundle.train.labels == c].mean(axis=(0, 1, 2))
        assert int(np.argmax(colours)) == c


def test_image_folder_grayscale(tmp_path: Path, image_folder: Path) -> None:
    cfg = _cfg(tmp_path, source="image_folder", path=image_folder, image_size=8, channels=1)
    bundle = load_data(cfg)
    assert bundle.train.images.shape[1:] == (8, 8, 1)
    assert sum(bundle.original_sizes.values()) == 24
    assert bundle.classes == CLASSES


def test_image_folder_train_test_layout(tmp_path: Path, image_folder_split: Path) -> None:
    cfg = _cfg(tmp_path, source="image_folder", path=image_folder_split, image_size=12)
    bundle = load_data(cfg)
    assert bundle.classes == CLASSES
    assert np.bincount(bundle.test.labels).tolist() == [3, 3, 3]  # exactly the test/ folder
    assert np.bincount(bundle.val.labels).tolist() == [1, 1, 1]
    assert np.bincount(bundle.train.labels).tolist() == [7, 7, 7]
    assert sum(bundle.original_sizes.values()) == 33


def test_image_folder_ignores_hidden_dirs_and_other_files(
    tmp_path: Path, image_folder: Path
) -> None:
    (image_folder / ".thumbnails").mkdir()
    (image_folder / "circle" / "notes.txt").write_text("not an image")
    (image_folder / "README.md").write_text("a file at the root")
    cfg = _cfg(tmp_path, source="image_folder", path=image_folder)
    train, test, classes, _ = list_image_folder(cfg)
    assert classes == CLASSES and len(train) + len(test) == 24


def test_image_folder_reads_misnamed_and_uppercase_files(
    tmp_path: Path, image_folder: Path
) -> None:
    jpeg = image_folder / "circle" / "img_001.jpg"
    jpeg.rename(image_folder / "circle" / "IMG_001.PNG")  # JPEG bytes, PNG name, upper case
    cfg = _cfg(tmp_path, source="image_folder", path=image_folder)
    bundle = load_data(cfg)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 24


def test_image_folder_errors_missing_root(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, source="image_folder", path=tmp_path / "nope")
    with pytest.raises(
        DataError, match=re.escape(f"image folder {tmp_path / 'nope'} does not exist")
    ):
        load_data(cfg)


def test_image_folder_errors_path_unset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path is not set"):
        load_data(_cfg(tmp_path, source="image_folder"))


def test_image_folder_errors_one_class(tmp_path: Path, image_folder: Path) -> None:
    shutil.rmtree(image_folder / "circle")
    shutil.rmtree(image_folder / "vertical")
    with pytest.raises(DataError, match="needs at least two class sub-folders"):
        load_data(_cfg(tmp_path, source="image_folder", path=image_folder))


def test_image_folder_errors_empty_class(tmp_path: Path, image_folder: Path) -> None:
    (image_folder / "empty").mkdir()
    (image_folder / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(
        DataError, match=re.escape(f"class folder {image_folder / 'empty'} holds no")
    ):
        load_data(_cfg(tmp_path, source="image_folder", path=image_folder))


def test_image_folder_errors_corrupt_image_names_the_file(
    tmp_path: Path, image_folder: Path
) -> None:
    broken = image_folder / "horizontal" / "img_002.png"
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(DataError) as info:
        load_data(_cfg(tmp_path, source="image_folder", path=image_folder))
    assert str(info.value).startswith(f"cannot read image {broken}:")


def test_image_folder_errors_too_many_pixels(tmp_path: Path, image_folder: Path) -> None:
    cfg = _cfg(tmp_path, source="image_folder", path=image_folder, max_image_pixels=100)
    with pytest.raises(DataError, match="over the limit of 100"):
        load_data(cfg)


def test_image_folder_errors_class_mismatch(tmp_path: Path, image_folder_split: Path) -> None:
    (image_folder_split / "test" / "vertical").rename(image_folder_split / "test" / "diagonal")
    with pytest.raises(DataError, match=r"train and .*test have different class folders"):
        load_data(_cfg(tmp_path, source="image_folder", path=image_folder_split))


def test_image_folder_factory_layouts(tmp_path: Path, make_image_folder: MakeImageFolder) -> None:
    flat = make_image_folder(tmp_path / "f", per_class=2)
    assert sorted(p.name for p in flat.iterdir()) == CLASSES
    assert sorted(p.suffix for p in (flat / "circle").iterdir()) == [".jpg", ".png"]
    split = make_image_folder(tmp_path / "s", layout="train_test", per_class=2, test_per_class=1)
    assert sorted(p.name for p in split.iterdir()) == ["test", "train"]
    assert len(list((split / "test" / "vertical").iterdir())) == 1
    with Image.open(flat / "circle" / "img_000.png") as image:
        assert image.size == (20, 16)


# --------------------------------------------------------------------------- statistics


def _bundle(train: list[int], val: list[int], test: list[int]) -> DataBundle[Split]:
    """Splits whose images are constant ``[2, 2, 1]`` arrays of the given values (label = v % 2)."""

    def split(values: list[int]) -> Split:
        images = np.stack([np.full((2, 2, 1), v, dtype=np.uint8) for v in values])
        return Split(images, np.array([v % 2 for v in values], dtype=np.int64))

    return DataBundle(
        split(train), split(val), split(test), ["even", "odd"], PreprocessSpec(), "planted"
    )


def test_dataset_statistics_counts_duplicates_and_overlap() -> None:
    bundle = _bundle(train=[0, 0, 0, 1, 2, 255], val=[4, 5, 5, 1, 7], test=[2, 3, 7, 255, 255])
    stats = dataset_statistics(bundle)
    assert stats["duplicates"] == {
        "train": 2,
        "val": 1,
        "test": 1,
        "train_test_overlap": 2,  # 2 and 255
        "train_val_overlap": 1,  # 1
        "val_test_overlap": 1,  # 7
    }
    assert stats["counts"] == {
        "train": {"even": 4, "odd": 2},
        "val": {"even": 1, "odd": 4},
        "test": {"even": 1, "odd": 4},
    }
    assert stats["sizes"] == {"train": 6, "val": 5, "test": 5}
    assert stats["image_shape"] == [2, 2, 1]
    assert stats["source"] == "planted" and stats["classes"] == ["even", "odd"]
    expected_mean = np.mean([0, 0, 0, 1, 2, 255]) / 255
    assert stats["pixel_mean"] == pytest.approx([expected_mean])
    assert stats["pixel_std"] == pytest.approx([np.std([0, 0, 0, 1, 2, 255]) / 255])
    assert stats["preprocess"]["image_size"] == 28


def test_dataset_statistics_of_generated_data(tmp_path: Path, fmnist_dir: Path) -> None:
    stats = dataset_statistics(load_data(_cfg(tmp_path, path=fmnist_dir)))
    assert set(stats["duplicates"].values()) == {0}
    assert stats["counts"]["test"] == dict.fromkeys(FASHION_MNIST_CLASSES, 4)
    assert stats["original_sizes"] == {"28x28": 160}
    assert stats["original_modes"] == {"L": 160}
    json.dumps(stats)  # serialisable as is


def test_duplicates_planted_in_idx_files(tmp_path: Path, fmnist_dir: Path) -> None:
    cfg = _cfg(tmp_path, path=fmnist_dir)
    a_training_image = load_data(cfg).train.images[0, :, :, 0]
    path = fmnist_dir / FASHION_MNIST_FILES["test_images"]
    images = read_idx(path).copy()
    images[0] = a_training_image  # a test image that is also in the training split
    images[1] = images[2]  # a duplicate inside the test set
    _gz(path, struct.pack(">HBBIII", 0, 8, 3, *images.shape) + images.tobytes())
    stats = dataset_statistics(load_data(cfg))
    assert stats["duplicates"] == {
        "train": 0,
        "val": 0,
        "test": 1,
        "train_test_overlap": 1,
        "train_val_overlap": 0,
        "val_test_overlap": 0,
    }


def test_write_statistics(tmp_path: Path) -> None:
    stats = {"sizes": {"train": 3}, "classes": ["a", "b"]}
    target = write_statistics(stats, tmp_path / "deep" / "er" / "stats.json")
    assert target == tmp_path / "deep" / "er" / "stats.json"
    assert json.loads(target.read_text()) == stats


def test_channel_stats() -> None:
    images = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    images[0] = 255
    images[..., 2] = 51
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.5, 0.5, 0.2])
    assert std == pytest.approx([0.5, 0.5, 0.0])


def test_channel_stats_in_chunks_match_the_whole() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(50, 5, 4, 3), dtype=np.uint8)
    flat = images.reshape(-1, 3) / 255.0
    for chunk in (1, 7, 64):
        mean, std = channel_stats(images, chunk=chunk)
        assert mean == pytest.approx(flat.mean(axis=0).tolist(), abs=1e-12)
        assert std == pytest.approx(flat.std(axis=0).tolist(), abs=1e-12)


# --------------------------------------------------------------------------- tensors, batches


def test_to_tensors_layout() -> None:
    rng = np.random.default_rng(0)
    split = Split(
        rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8),
        np.array([0, 1, 2, 1], dtype=np.int64),
    )
    images, labels = to_tensors(split)
    assert images.shape == (4, 3, 5, 6) and images.dtype == torch.uint8
    assert images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 1]
    for n, c, h, w in [(0, 0, 0, 0), (3, 2, 4, 5), (1, 1, 2, 3)]:
        assert int(images[n, c, h, w]) == int(split.images[n, h, w, c])
    assert np.shares_memory(labels.numpy(), split.labels)


def test_iterate_batches_in_order_without_generator() -> None:
    images = torch.arange(10).view(10, 1, 1, 1)
    labels = torch.arange(10)
    batches = list(iterate_batches(images, labels, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(10))
    for batch_images, batch_labels in batches:
        assert torch.equal(batch_images.view(-1), batch_labels)  # pairs stay together


def test_iterate_batches_shuffles_reproducibly() -> None:
    images = torch.arange(50).view(50, 1, 1, 1)
    labels = torch.arange(50)

    def order(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        batches = list(iterate_batches(images, labels, 8, generator))
        for batch_images, batch_labels in batches:
            assert torch.equal(batch_images.view(-1), batch_labels)
        assert [len(b[1]) for b in batches] == [8] * 6 + [2]
        return torch.cat([b[1] for b in batches]).tolist()

    first = order(3)
    assert sorted(first) == list(range(50))  # every index exactly once
    assert first != list(range(50))  # shuffled
    assert order(3) == first  # same seed, same order
    assert order(4) != first


# --------------------------------------------------------------------------- photo-like uploads


def test_upload_variation_defaults_follow_the_source(tmp_path: Path) -> None:
    assert _cfg(tmp_path).upload_variation == 0.25
    assert _cfg(tmp_path, source="image_folder").upload_variation == 0.0
    assert _cfg(tmp_path, source="image_folder", upload_variation=0.5).upload_variation == 0.5
    with pytest.raises(ValueError, match="upload_sides"):
        _cfg(tmp_path, upload_sides=(640, 64))
    with pytest.raises(ValueError, match="upload_variation"):
        _cfg(tmp_path, upload_variation=1.5)


def test_upload_variation_replaces_a_share_with_uploads_of_the_same_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Flat blocks: a round trip keeps them recognisable, unlike noise.
    images = np.kron(rng.integers(0, 256, size=(40, 7, 7, 1)), np.ones((1, 4, 4, 1))).astype(
        np.uint8
    )
    split = Split(images, np.arange(40, dtype=np.int64) % 4)
    spec = PreprocessSpec()
    cfg = _cfg(tmp_path, upload_variation=0.5, upload_sides=(100, 300))
    varied = with_upload_variation(split, spec, cfg, seed=1)
    changed = (varied.images != images).any(axis=(1, 2, 3))
    assert changed.sum() == 20 and varied.images.dtype == np.uint8
    assert varied.images.shape == images.shape and np.array_equal(varied.labels, split.labels)
    assert np.array_equal(split.images, images)  # the input is not modified
    # The same images, slightly changed by resizing and JPEG, not other images.
    diff = np.abs(varied.images.astype(int) - images.astype(int))[changed]
    assert 0 < diff.mean() < 20
    again = with_upload_variation(split, spec, cfg, seed=1)
    assert np.array_equal(again.images, varied.images)  # --resume sees the same data
    none = with_upload_variation(split, spec, cfg.model_copy(update={"upload_variation": 0.0}), 1)
    assert none is split
