"""Shared fixtures: tiny generated data sets and isolated settings.

For the whole session ``BENTOML_HOME`` is an empty temporary store (:func:`pytest_configure`):
no test reads or writes BentoML's real store (``~/bentoml``, or an exported ``BENTOML_HOME``).
A test that needs a model imports one into its own store (``train.tiny``, ``tmp_path``).

Fixtures (all function-scoped, everything written below the test's ``tmp_path``):

``make_fmnist(root, train_per_class=12, test_per_class=4, seed=0) -> Path``
    Factory writing a Fashion-MNIST-like folder: the four gzipped idx files (magic 0x00000803 for
    images ``[N, 28, 28]``, 0x00000801 for labels ``[N]``), 10 classes, labels in shuffled order.
    Each class lights its own block of the 28x28 canvas (see :func:`fmnist_pattern`), so a small
    model learns it in one epoch.
``fmnist_dir -> Path``
    ``make_fmnist(tmp_path / "fmnist")``: 12 train + 4 test images per class (120 + 40).
``make_image_folder(root, layout="flat", per_class=8, test_per_class=3, seed=0) -> Path``
    Factory writing an ImageFolder tree with the 3 classes of :data:`IMAGE_FOLDER_CLASSES`, each
    with a learnable colour/stripe pattern; files alternate between ``.png`` and ``.jpg`` and
    between a few sizes (:data:`IMAGE_FOLDER_SIZES`). ``layout="flat"`` gives ``root/<class>/*``;
    ``layout="train_test"`` gives ``root/train/<class>/*`` (``per_class`` each) and
    ``root/test/<class>/*`` (``test_per_class`` each).
``image_folder -> Path``
    Flat layout, 8 images per class, at ``tmp_path / "images"``.
``image_folder_split -> Path``
    ``train/`` (8 per class) and ``test/`` (3 per class) layout, at ``tmp_path / "images_split"``.
``make_settings(*overrides: str, preset: Path | None = None) -> Settings``
    Calls :func:`train.config.load_settings` on the repository's ``configs/`` with overrides that
    keep a test hermetic and fast, then the test's own ``overrides`` (which win):
    ``data.path`` = :func:`fmnist_dir`, ``data.debian_path`` and ``data.download_root`` inside
    ``tmp_path``, ``data.allow_download=false``, ``data.stats_path``, ``tracking.store_dir`` and
    ``train.checkpoint_dir`` inside ``tmp_path``, ``train.epochs=1``, ``model.name=simple_cnn``,
    ``model.width=4``,
    ``train.progress=false``, ``train.channels_last=false``. It first removes ``MLFLOW_TRACKING_URI``,
    ``FASHION_SERVE_CONFIG_DIR`` and every ``FASHION_SERVE__*`` variable (via ``monkeypatch``,
    so they come back after the test). Paths: ``tmp_path / "mlflow"``, ``"checkpoints"``,
    ``"artifacts/data_stats.json"``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from train.config import Settings, load_settings
from train.data import FASHION_MNIST_FILES

#: Set to the session's throw-away BentoML store while the tests run.
SESSION_STORE_ENV = "BENTOML_HOME"
SESSION_STORE_PREFIX = "fashion-serve-test-bentoml-"


def pytest_configure(config: pytest.Config) -> None:
    """Point ``BENTOML_HOME`` at an empty temporary store before any test imports BentoML."""
    before = os.environ.get(SESSION_STORE_ENV)
    store = tempfile.mkdtemp(prefix=SESSION_STORE_PREFIX)
    os.environ[SESSION_STORE_ENV] = store

    def restore() -> None:
        if before is None:
            os.environ.pop(SESSION_STORE_ENV, None)
        else:
            os.environ[SESSION_STORE_ENV] = before
        shutil.rmtree(store, ignore_errors=True)

    config.add_cleanup(restore)


FMNIST_TRAIN_PER_CLASS = 12
FMNIST_TEST_PER_CLASS = 4
IMAGE_FOLDER_CLASSES = ("circle", "horizontal", "vertical")
IMAGE_FOLDER_SIZES = ((20, 16), (24, 24), (30, 18))  # (width, height), cycled per file
IMAGE_FOLDER_PER_CLASS = 8
IMAGE_FOLDER_TEST_PER_CLASS = 3


class MakeFmnist(Protocol):
    def __call__(
        self, root: Path, train_per_class: int = ..., test_per_class: int = ..., seed: int = ...
    ) -> Path: ...


class MakeImageFolder(Protocol):
    def __call__(
        self,
        root: Path,
        layout: Literal["flat", "train_test"] = ...,
        per_class: int = ...,
        test_per_class: int = ...,
        seed: int = ...,
    ) -> Path: ...


class MakeSettings(Protocol):
    def __call__(self, *overrides: str, preset: Path | None = None) -> Settings: ...


# --------------------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, array: NDArray[np.uint8]) -> Path:
    """Write ``array`` (1-D labels or 3-D images, ``uint8``) as a gzipped idx file."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array).tobytes()))
    return path


def fmnist_pattern(label: int, rng: np.random.Generator) -> NDArray[np.uint8]:
    """A 28x28 image for ``label`` (0..9): dark noise (0..39) with the class's own block bright.

    Blocks are 12 rows x 5 columns on a 2 x 5 grid (rows 2 and 15, columns 1, 6, ..., 21);
    class ``k`` lights block ``k`` with values 200..255.
    """
    image = rng.integers(0, 40, size=(28, 28))
    row, col = divmod(label, 5)
    top, left = 2 + row * 13, 1 + col * 5
    image[top : top + 12, left : left + 5] = rng.integers(200, 256, size=(12, 5))
    return image.astype(np.uint8)


def _make_fmnist(
    root: Path,
    train_per_class: int = FMNIST_TRAIN_PER_CLASS,
    test_per_class: int = FMNIST_TEST_PER_CLASS,
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = np.stack([fmnist_pattern(int(label), rng) for label in labels])
        write_idx(root / FASHION_MNIST_FILES[f"{part}_images"], images)
        write_idx(root / FASHION_MNIST_FILES[f"{part}_labels"], labels)
    return root


@pytest.fixture
def make_fmnist() -> MakeFmnist:
    """Factory: ``make_fmnist(root, train_per_class=12, test_per_class=4, seed=0) -> root``."""
    return _make_fmnist


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST folder (12 train + 4 test images per class) at ``tmp_path/fmnist``."""
    return _make_fmnist(tmp_path / "fmnist")


# --------------------------------------------------------------------------- ImageFolder


def image_folder_pattern(
    class_index: int, width: int, height: int, rng: np.random.Generator
) -> NDArray[np.uint8]:
    """RGB ``[height, width, 3]``: 0 = red disc, 1 = green horizontal stripes, 2 = blue vertical."""
    base = rng.integers(0, 30, size=(height, width, 3))
    ys, xs = np.mgrid[0:height, 0:width]
    if class_index == 0:
        mask = (ys - height / 2) ** 2 + (xs - width / 2) ** 2 < (min(width, height) / 3) ** 2
    elif class_index == 1:
        mask = (ys // 3) % 2 == 0
    else:
        mask = (xs // 3) % 2 == 0
    base[mask, class_index] = 230
    return base.astype(np.uint8)


def _write_class_images(
    folder: Path, class_index: int, count: int, rng: np.random.Generator, start: int
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        n = start + i
        width, height = IMAGE_FOLDER_SIZES[n % len(IMAGE_FOLDER_SIZES)]
        image = Image.fromarray(image_folder_pattern(class_index, width, height, rng))
        if n % 2 == 0:
            image.save(folder / f"img_{n:03d}.png")
        else:
            image.save(folder / f"img_{n:03d}.jpg", quality=95)


def _make_image_folder(
    root: Path,
    layout: Literal["flat", "train_test"] = "flat",
    per_class: int = IMAGE_FOLDER_PER_CLASS,
    test_per_class: int = IMAGE_FOLDER_TEST_PER_CLASS,
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    for class_index, name in enumerate(IMAGE_FOLDER_CLASSES):
        if layout == "flat":
            _write_class_images(root / name, class_index, per_class, rng, 0)
        else:
            _write_class_images(root / "train" / name, class_index, per_class, rng, 0)
            _write_class_images(root / "test" / name, class_index, test_per_class, rng, per_class)
    return root


@pytest.fixture
def make_image_folder() -> MakeImageFolder:
    """Factory: ``make_image_folder(root, layout="flat"|"train_test", per_class=8, ...) -> root``."""
    return _make_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Flat ImageFolder (3 classes x 8 PNG/JPEG files of mixed sizes) at ``tmp_path/images``."""
    return _make_image_folder(tmp_path / "images")


@pytest.fixture
def image_folder_split(tmp_path: Path) -> Path:
    """ImageFolder with ``train/`` (8 per class) and ``test/`` (3 per class) sub-trees."""
    return _make_image_folder(tmp_path / "images_split", layout="train_test")


# --------------------------------------------------------------------------- settings


def _quoted(path: Path) -> str:
    """A path as a YAML scalar that survives any character (JSON strings are YAML)."""
    return json.dumps(str(path))


@pytest.fixture
def make_settings(
    tmp_path: Path, fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> MakeSettings:
    """Factory: ``make_settings(*overrides, preset=None) -> Settings``, hermetic and tiny.

    See the module docstring for the overrides it applies before the caller's.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FASHION_SERVE_CONFIG_DIR", raising=False)
    for name in list(os.environ):
        if name.startswith("FASHION_SERVE__"):
            monkeypatch.delenv(name)
    base = [
        f"data.path={_quoted(fmnist_dir)}",
        f"data.debian_path={_quoted(tmp_path / 'no-debian-fashion-mnist')}",
        f"data.download_root={_quoted(tmp_path / 'downloads')}",
        "data.allow_download=false",
        f"data.stats_path={_quoted(tmp_path / 'artifacts' / 'data_stats.json')}",
        f"tracking.store_dir={_quoted(tmp_path / 'mlflow')}",
        f"train.checkpoint_dir={_quoted(tmp_path / 'checkpoints')}",
        "train.epochs=1",
        "model.name=simple_cnn",
        "model.width=4",
        "train.progress=false",
        # torch 2.14.1 on CPU corrupts the heap in the backward pass of a channels_last 1x1
        # stride-2 conv with 4 input channels (resnet_small at width 4).
        "train.channels_last=false",
    ]

    def make(*overrides: str, preset: Path | None = None) -> Settings:
        return load_settings(preset=preset, overrides=[*base, *overrides])

    return make


def image_folder_overrides(folder: Path) -> list[str]:
    """``key=value`` settings that train on ``folder`` (the ``image_folder`` fixture's layout)."""
    return [
        "data.source=image_folder",
        f"data.path={folder}",
        "data.image_size=16",
        "data.channels=3",
        "data.val_fraction=0.25",
    ]


def cli_overrides(settings: Settings) -> list[str]:
    """``key=value`` arguments that point a CLI command at ``settings``' temporary stores and
    make its training run one quick epoch of a tiny model."""
    return [
        f"data.path={settings.data.path}",
        f"data.stats_path={settings.data.stats_path}",
        f"tracking.store_dir={settings.tracking.store_dir}",
        f"train.checkpoint_dir={settings.train.checkpoint_dir}",
        "train.epochs=1",
        "model.name=simple_cnn",
        "model.width=4",
        "train.channels_last=false",
        "train.progress=false",
    ]
