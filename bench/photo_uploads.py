"""Accuracy of the served model on photo-like uploads against the 28×28 PNGs of the same images.

``python -m bench.photo_uploads [--limit N] [--model-tag TAG] [--resample NAME ...]``

Each Fashion-MNIST test image is sent through the service's own upload path
(:meth:`serving.runtime.ModelRuntime.prepare` then ``predict``, no HTTP) twice: as the 28×28
grayscale PNG, and as the uploads a phone or a web shop makes of it (upscaled to a few hundred
pixels, RGB, JPEG). The gap in accuracy between the two is what a user loses for sending a photo.
``--resample`` reruns the photos with other downscale filters in the model's spec, to compare.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from common.preprocess import PreprocessSpec, Resample
from serving.uploads import Upload

if TYPE_CHECKING:
    from serving.runtime import ModelRuntime


@dataclass(frozen=True)
class PhotoStyle:
    """How a client turns a small image into the upload it sends."""

    name: str
    side: int
    quality: int
    upscale: Image.Resampling = Image.Resampling.BICUBIC


STYLES = (
    PhotoStyle("web shop: 224 px RGB JPEG q90", 224, 90),
    PhotoStyle("phone: 600 px RGB JPEG q85", 600, 85),
    PhotoStyle("thumbnail: 96 px RGB JPEG q75", 96, 75),
)


def png_upload(pixels: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(buffer, "PNG")
    return buffer.getvalue()


def photo_upload(pixels: NDArray[np.uint8], style: PhotoStyle) -> bytes:
    """``pixels`` as ``style``'s client would send them: larger, RGB, JPEG-compressed."""
    from train.data import photo_like_upload

    return photo_like_upload(pixels, style.side, style.quality, style.upscale)


def accuracy(
    runtime: ModelRuntime, uploads: Sequence[bytes], labels: NDArray[np.int64], batch: int = 256
) -> float:
    """Share of ``uploads`` the runtime labels correctly, through its upload path."""
    correct = 0
    for start in range(0, len(uploads), batch):
        files = [Upload("image", None, data) for data in uploads[start : start + batch]]
        predictions = runtime.predict(runtime.prepare(files, "image"))
        wanted = labels[start : start + batch].tolist()
        correct += sum(p.class_id == want for p, want in zip(predictions, wanted, strict=True))
    return correct / len(uploads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=10_000, help="test images (default: all)")
    parser.add_argument("--model-tag", default=None, help="default: the served model")
    parser.add_argument(
        "--bentoml-home", type=Path, default=None, help="default: $BENTOML_HOME or ~/bentoml"
    )
    parser.add_argument("--tiny", action="store_true", help="a random tiny model (a smoke test)")
    parser.add_argument(
        "--resample",
        nargs="*",
        choices=get_args(Resample),
        default=[],
        help="also score the photos with these downscale filters in the spec",
    )
    args = parser.parse_args(argv)

    import bentoml

    from bench.serving import BenchError, pick_model
    from serving.bentoml_bridge import model_store_at
    from serving.launch import default_store_home
    from serving.runtime import ModelRuntime
    from serving.settings import load_serving_settings

    with tempfile.TemporaryDirectory(prefix="photo-uploads-") as workdir:
        try:
            home, tag, _ = pick_model(
                args.tiny, args.bentoml_home or default_store_home(), args.model_tag, Path(workdir)
            )
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        with model_store_at(home):
            runtime = ModelRuntime.from_bento_model(
                bentoml.models.get(tag), load_serving_settings()
            )
    images, labels, source = test_images(args.limit)
    print(f"model {tag} (spec resample: {runtime.spec.resample}); {source}")

    started = time.perf_counter()
    baseline = accuracy(runtime, [png_upload(p) for p in images], labels)
    print("| upload | downscale | accuracy | gap vs 28×28 PNG (points) |\n|---|---|--:|--:|")
    print(f"| 28×28 grayscale PNG | none | {baseline:.2%} | |")
    spec = runtime.spec
    for style in STYLES:
        photos = [photo_upload(p, style) for p in images]
        for resample in [spec.resample, *[r for r in args.resample if r != spec.resample]]:
            runtime.spec = PreprocessSpec.model_validate(
                {**spec.model_dump(), "resample": resample}
            )
            score = accuracy(runtime, photos, labels)
            gap = (baseline - score) * 100
            print(f"| {style.name} | {resample} | {score:.2%} | {gap:+.2f} |")
        runtime.spec = spec
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


def test_images(limit: int) -> tuple[NDArray[np.uint8], NDArray[np.int64], str]:
    """The first ``limit`` Fashion-MNIST test images ``[N, 28, 28, 1]`` and labels (no download)."""
    from train.config import load_settings
    from train.data import load_fashion_mnist

    data_cfg = load_settings().data.model_copy(update={"allow_download": False})
    _, test, folder = load_fashion_mnist(data_cfg)
    count = min(limit, len(test))
    return test.images[:count], test.labels[:count], f"{count} test images from {folder}"


if __name__ == "__main__":
    raise SystemExit(main())
