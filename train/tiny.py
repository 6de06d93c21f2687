"""A small random model in a BentoML store: the one helper tests, benchmarks and scripts share.

``tiny_model(seed)`` builds a random model (by default ``resnet_small``, width 4, for
:data:`TINY_CLASSES`) and ``import_tiny(model, home)`` stores it in the BentoML store at ``home``
the way ``make import`` does (ONNX export, parity check, lineage), leaving the process's own store
(``BENTOML_HOME`` or ``~/bentoml``) untouched. ``tiny_model_in(home)`` does both.

It needs torch, so it lives in ``train/``; the service never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.preprocess import PreprocessSpec, to_model_input
from serving.bentoml_bridge import model_store_at
from train.config import ExportConfig, ModelConfig, RegistryConfig
from train.export import import_to_bento
from train.models import build_model

TINY_CLASSES = ["shirt", "shoe", "bag"]
TINY_SPEC = PreprocessSpec()
TINY_MODEL = ModelConfig(name="resnet_small", width=4)
#: Images in the ONNX parity batch (random pixels: a tiny model's parity needs no real images).
PARITY_IMAGES = 4


def tiny_model(
    seed: int = 0, config: ModelConfig = TINY_MODEL, classes: Sequence[str] = TINY_CLASSES
) -> torch.nn.Module:
    """A random model of ``config`` for ``classes``, in eval mode (the same for the same seed)."""
    torch.manual_seed(seed)
    return build_model(config, TINY_SPEC, len(classes)).eval()


def import_tiny(
    model: torch.nn.Module,
    home: Path,
    version: str = "1",
    classes: Sequence[str] = TINY_CLASSES,
    run_id: str | None = None,
    export: ExportConfig | None = None,
) -> str:
    """Import ``model`` as registered version ``version`` through ``@champion`` into the store at ``home``.

    ``export``: the import settings (default: the fast defaults, e.g. a one-round batch profile).

    Returns:
        The BentoML model tag (``fashion-classifier:<version id>``).
    """
    size = TINY_SPEC.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(PARITY_IMAGES, size, size, 1), dtype=np.uint8)
    parity = to_model_input(list(pixels))
    lineage = {
        "registered_name": ExportConfig().bento_model_name,
        "version": version,
        "alias": RegistryConfig().champion_alias,  # imported through @champion, as make import
        "run_id": run_id or f"r{version}",
    }
    with model_store_at(home):
        tag = import_to_bento(
            model, list(classes), TINY_SPEC, lineage, parity, export or ExportConfig()
        )
    return str(tag)


def tiny_model_in(
    home: Path,
    config: ModelConfig = TINY_MODEL,
    classes: Sequence[str] = TINY_CLASSES,
    module_path: Path | None = None,
) -> str:
    """Build a random ``config`` model and import it into the store at ``home``; its tag.

    With ``module_path``, the torch module is also ``torch.save``'d there (for backends that
    serve torch directly).
    """
    model = tiny_model(config=config, classes=classes)
    if module_path is not None:
        torch.save(model, module_path)
    return import_tiny(model, home, classes=classes)
