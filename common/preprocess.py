"""The one preprocessing path from image bytes to model input, shared by training, evaluation and serving.

This module must not import torch: the serving image has no torch. It owns:

* :class:`PreprocessSpec`, the description of what a model expects, stored with every model;
* :func:`decode_image`, bytes -> PIL image (format sniffed from the bytes, EXIF orientation honoured,
  large JPEGs decoded at reduced size, pixel-count limit against decompression bombs);
* :func:`prepare_image`, PIL image -> ``uint8`` array ``[H, W, C]`` in the model's size and colour mode;
* :func:`to_model_input`, a stack of prepared arrays -> ``float32`` ``[N, C, H, W]`` in 0..255.

Scaling to 0..1 and mean/std normalisation live inside the exported network (see
``train.models.Classifier``), so no caller can apply them twice or forget them.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

#: Formats accepted from clients, by the name PIL gives them after sniffing the bytes.
ACCEPTED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"})


#: The filters that shrink (or grow) an image to the model's size.
Resample = Literal["bilinear", "bicubic", "nearest", "lanczos", "box"]


class PreprocessSpec(BaseModel):
    """What a model expects as input; travels with the model as metadata."""

    model_config = ConfigDict(frozen=True)

    image_size: int = Field(28, ge=8, le=1024, description="Side of the square input, pixels.")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB.")
    mean: tuple[float, ...] = Field((0.2860,), description="Per-channel mean on the 0..1 scale.")
    std: tuple[float, ...] = Field((0.3530,), description="Per-channel std on the 0..1 scale.")
    background: int = Field(
        0, ge=0, le=255, description="Gray level that transparent pixels are flattened onto."
    )
    resample: Resample = "lanczos"
    input_layout: Literal["NCHW"] = "NCHW"
    input_scale: Literal["0-255"] = "0-255"


class ImageDecodeError(ValueError):
    """Raised when bytes are not an image this system accepts. The message names the problem."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes, trusting the bytes (not a filename or content type) for the format.

    Args:
        data: The raw uploaded bytes.
        max_pixels: Largest accepted width * height; bigger images are refused before decoding.
        draft_size: If given, JPEGs are decoded at the smallest DCT scale that is still at least
            this many pixels on each side (much faster for large photos).

    Returns:
        A fully loaded PIL image with EXIF orientation applied.

    Raises:
        ImageDecodeError: empty, unrecognised, unsupported, too large or truncated input.
    """
    if not data:
        raise ImageDecodeError("empty", "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "not_an_image",
            "the uploaded file is not a recognised image (accepted: "
            + ", ".join(sorted(ACCEPTED_FORMATS))
            + ")",
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_many_pixels", f"image has too many pixels: {exc}") from exc
    except Exception as exc:
        raise ImageDecodeError("corrupt", f"the image header could not be read: {exc}") from exc
    if image.format not in ACCEPTED_FORMATS:
        raise ImageDecodeError(
            "unsupported_format",
            f"image format {image.format} is not accepted (accepted: "
            + ", ".join(sorted(ACCEPTED_FORMATS))
            + ")",
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB" if image.mode not in ("L", "1") else "L", (draft_size, draft_size))
    try:
        image.load()
        # In place: without it Pillow returns a copy of every image that needs no rotation.
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except Exception as exc:
        raise ImageDecodeError("corrupt", f"the image data is truncated or corrupt: {exc}") from exc


def prepare_image(image: Image.Image, spec: PreprocessSpec) -> NDArray[np.uint8]:
    """Convert any PIL image to the model's colour mode and size.

    Args:
        image: A decoded image of any mode (1, L, P, RGB, RGBA, CMYK, I;16, ...) and size.
        spec: The model's preprocessing spec.

    Returns:
        ``uint8`` array of shape ``[image_size, image_size, channels]``.
    """
    image = _flatten(image, spec.background)
    mode = "L" if spec.channels == 1 else "RGB"
    if image.mode != mode:  # convert() to the same mode is a copy
        image = image.convert(mode)
    size = (spec.image_size, spec.image_size)
    if image.size != size:
        image = image.resize(size, _RESAMPLE[spec.resample], reducing_gap=3.0)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def _flatten(image: Image.Image, background: int) -> Image.Image:
    """Bring unusual modes to L/RGB/RGBA and composite transparency onto ``background``."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def to_model_input(arrays: Sequence[NDArray[np.uint8]]) -> NDArray[np.float32]:
    """Stack prepared ``[H, W, C]`` arrays into the model's ``float32`` ``[N, C, H, W]`` input."""
    batch = np.stack(arrays, axis=0)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def softmax(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: NDArray[np.float32] = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return result
