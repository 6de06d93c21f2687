"""Defaults safe for any data set: an image folder whose classes are mirror images of each other.

Two classes, ``left`` and ``right``: 28x28 arrows, every ``right`` image exactly the mirror of a
``left`` one (train/ and test/ folders). Trained briefly with the defaults for image-folder data
(``data.augmentation: auto`` = no flips, ``model.flip_tta: auto`` = off), the model tells them
apart. With flip TTA forced on, the model averages each image with its mirror, so a test image
and its mirror get the same answer: exactly one of each pair is right, accuracy 0.5. That second
half shows the first can fail: a flipping default would land there too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from train.config import DEFAULT_AUGMENTATION, Settings
from train.data import load_data, to_tensors
from train.engine import evaluate, fit
from train.pipeline import model_and_augmentation

MakeSettings = Callable[..., Settings]
TRAIN_PAIRS = 20
TEST_PAIRS = 10


def arrow(rng: np.random.Generator) -> NDArray[np.uint8]:
    """A 28x28 arrow pointing left on dark noise: random height, start and length."""
    image = rng.integers(0, 30, size=(28, 28))
    y = int(rng.integers(9, 19))
    tip, tail = int(rng.integers(4, 8)), int(rng.integers(18, 24))
    image[y - 1 : y + 2, tip:tail] = 230  # the shaft
    for d in range(6):  # the head: a triangle opening to the right
        image[y - d : y + d + 1, tip + d] = 230
    return image.astype(np.uint8)


def make_mirror_folder(root: Path, seed: int = 0) -> Path:
    """``root/{train,test}/{left,right}/NNN.png``; ``right/NNN`` is the mirror of ``left/NNN``."""
    rng = np.random.default_rng(seed)
    for part, pairs in (("train", TRAIN_PAIRS), ("test", TEST_PAIRS)):
        for name in ("left", "right"):
            (root / part / name).mkdir(parents=True, exist_ok=True)
        for i in range(pairs):
            left = arrow(rng)
            Image.fromarray(left).save(root / part / "left" / f"{i:03d}.png")
            Image.fromarray(np.ascontiguousarray(left[:, ::-1])).save(
                root / part / "right" / f"{i:03d}.png"
            )
    return root


def _train_and_test(settings: Settings, checkpoints: Path) -> tuple[bool, str, float]:
    """Train as ``fit`` does (the pipeline's model and augmentation); flip TTA on?, the
    augmentation, and the test accuracy."""
    bundle = load_data(settings.data)
    model, preset = model_and_augmentation(settings, bundle)
    fit(
        model, to_tensors(bundle.train), to_tensors(bundle.val), settings.train, preset, checkpoints
    )
    result = evaluate(model, to_tensors(bundle.test), batch_size=64, device=settings.train.device)
    return bool(model.flip_tta), settings.data.augmentation, result.accuracy


@pytest.fixture
def mirror_settings(make_settings: MakeSettings, tmp_path: Path) -> Callable[..., Settings]:
    folder = make_mirror_folder(tmp_path / "arrows")

    def settings(*extra: str) -> Settings:
        return make_settings(
            "data.source=image_folder",
            f"data.path={folder}",
            "data.val_fraction=0.2",
            "train.epochs=5",
            "train.batch_size=16",
            "train.device=cpu",
            *extra,
        )

    return settings


def test_image_folder_defaults_do_not_flip(mirror_settings: Callable[..., Settings]) -> None:
    settings = mirror_settings()
    assert DEFAULT_AUGMENTATION["image_folder"] == "none"
    assert (settings.data.augmentation, settings.model.flip_tta) == ("none", "auto")


def test_defaults_tell_mirror_image_classes_apart(
    mirror_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    flip_tta, augmentation, accuracy = _train_and_test(mirror_settings(), tmp_path / "default")
    assert (flip_tta, augmentation) == (False, "none")
    assert accuracy >= 0.9  # chance is 0.5


def test_forced_flip_tta_cannot_tell_them_apart(
    mirror_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = mirror_settings("model.flip_tta=true")
    flip_tta, augmentation, accuracy = _train_and_test(settings, tmp_path / "forced")
    assert (flip_tta, augmentation) == (True, "none")
    assert accuracy == pytest.approx(0.5)  # each image and its mirror get the same answer


def test_flip_augmentation_turns_auto_flip_tta_on(
    mirror_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Asking for flips (here, wrongly for these classes) brings flip TTA along with it."""
    settings = mirror_settings("data.augmentation=flip")
    flip_tta, augmentation, accuracy = _train_and_test(settings, tmp_path / "flip")
    assert (flip_tta, augmentation) == (True, "flip")
    assert accuracy == pytest.approx(0.5)
