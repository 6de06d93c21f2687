"""The model at serving time: torch backend, per-file errors (serving/runtime.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import bentoml
import pytest
import torch
from PIL import Image

import service
from common import preprocess
from common.preprocess import prepare_image, to_model_input
from serving.lineage import served_tag
from serving.runtime import ModelRuntime
from serving.schema import (
    BadInputError,
)
from serving.settings import (
    ServingConfigError,
)
from serving.uploads import Upload
from tests import serving_helpers
from tests.serving_fixtures import PNG
from tests.serving_fixtures import bento_home as bento_home
from tests.serving_fixtures import log_files as log_files
from tests.serving_fixtures import restore_logging as restore_logging
from tests.serving_fixtures import svc as svc
from tests.serving_fixtures import tiny_model as tiny_model

SPEC = serving_helpers.TINY_SPEC


def test_torch_backend_matches_onnx(
    svc: Any, tiny_model: torch.nn.Module, bento_home: Path, tmp_path: Path
) -> None:
    module_path = tmp_path / "module.pt"
    torch.save(tiny_model, module_path)
    stored = bentoml.models.get(served_tag(service.SETTINGS))
    settings = service.SETTINGS.model_copy(
        update={"backend": "torch", "torch_model_path": module_path}
    )
    threads = torch.get_num_threads()
    try:
        torch_runtime = ModelRuntime.from_bento_model(stored, settings)
    finally:  # the backend sets torch's thread count for the process; later tests keep theirs
        torch.set_num_threads(threads)
    assert torch_runtime.backend == "torch"
    pixels = to_model_input([prepare_image(Image.open(io.BytesIO(PNG)), SPEC)] * 2)
    onnx_scores = [p.scores for p in svc.runtime.predict(pixels)]
    for got, want in zip(torch_runtime.predict(pixels), onnx_scores, strict=True):
        assert got.scores == pytest.approx(want, abs=1e-5)
    with pytest.raises(ServingConfigError, match="torch_model_path"):
        ModelRuntime.from_bento_model(
            stored, settings.model_copy(update={"torch_model_path": None})
        )


def test_prepare_names_the_file(svc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadInputError, match=r"images\[1\] \(b.png\)") as caught:
        svc.runtime.prepare(
            [Upload("images", "a.png", PNG), Upload("images", "b.png", b"xx")],
            "images",
        )
    assert caught.value.status == 415

    def cannot_convert(*args: Any) -> None:
        raise ValueError("odd mode")

    monkeypatch.setattr(preprocess, "prepare_image", cannot_convert)
    with pytest.raises(BadInputError, match="cannot convert") as caught:
        svc.runtime.prepare([Upload("image", None, PNG)], "image")
    assert (caught.value.status, caught.value.kind) == (422, "unconvertible")
