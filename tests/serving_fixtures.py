"""Shared fixtures of the serving tests: a tiny model in a temporary store, the service made from it.

Test modules import the fixtures they use (``from tests.serving_fixtures import svc as svc``);
``restore_logging`` and ``log_files`` keep the service's logging out of the checkout and the
other tests.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loguru import logger
from numpy.typing import NDArray
from PIL import Image

import service
from common.preprocess import prepare_image, softmax, to_model_input
from serving.bentoml_bridge import model_store_at
from serving.telemetry import LINES
from tests import serving_helpers

SPEC = serving_helpers.TINY_SPEC
CLASSIFIER: Any = service.Classifier


def image_bytes(
    size: tuple[int, int] = (28, 28), mode: str = "L", fmt: str = "PNG", seed: int = 0
) -> bytes:
    """A noise image of ``size`` (width, height) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A 1200x1000 black PNG: a few kB that decode to more pixels than the test limit."""
    buffer = io.BytesIO()
    Image.new("L", (1200, 1000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


PNG = image_bytes()


JPEG = image_bytes((64, 48), "RGB", "JPEG", seed=1)


def expected_scores(model: torch.nn.Module, images: list[bytes]) -> NDArray[np.float32]:
    """Softmax of the torch model on the same preprocessing, for comparison."""
    arrays = [prepare_image(Image.open(io.BytesIO(data)), SPEC) for data in images]
    with torch.inference_mode():
        logits = model(torch.from_numpy(to_model_input(arrays))).numpy()
    return softmax(logits)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return serving_helpers.tiny_model(seed=0)


@pytest.fixture(scope="module")
def bento_home(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: torch.nn.Module
) -> Iterator[Path]:
    """A BentoML home holding the tiny model, made BentoML's store for this module."""
    home = tmp_path_factory.mktemp("bentoml")
    serving_helpers.import_tiny(tiny_model, home)
    with model_store_at(home):
        yield home


@pytest.fixture(scope="module", autouse=True)
def restore_logging() -> Iterator[None]:
    """The service reconfigures logging for the process; put it back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    # Lines still held for the service's files go there now, not to this stderr sink at exit.
    LINES.reset()
    logger.remove()
    logger.add(sys.stderr)


@pytest.fixture(scope="module", autouse=True)
def log_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Service instances made here write their log files below a temporary folder."""
    folder = tmp_path_factory.mktemp("logs")
    original = service.SETTINGS
    logging_settings = original.logging.model_copy(
        update={
            "file": original.logging.file.model_copy(
                update={"path": str(folder / "service.{worker}.jsonl")}
            ),
            "predictions": original.logging.predictions.model_copy(
                update={"path": str(folder / "predictions.{worker}.jsonl")}
            ),
        }
    )
    service.SETTINGS = original.model_copy(update={"logging": logging_settings})
    yield folder
    service.SETTINGS = original


@pytest.fixture(scope="module")
def svc(bento_home: Path) -> Any:
    """A service instance, as BentoML creates one in a worker."""
    return CLASSIFIER()
