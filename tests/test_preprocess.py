"""Bytes -> image -> model input: formats, orientation, transparency, odd modes, and clear errors."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from common.preprocess import (
    ACCEPTED_FORMATS,
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    prepare_image,
    softmax,
    to_model_input,
)

MAX = 40_000_000
ROOT = Path(__file__).resolve().parent.parent


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> NDArray[np.uint8]:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG signature + IHDR (valid CRC) claiming ``width`` x ``height`` pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + png_chunk(b"IEND", b"")
    )


def decode_error(data: bytes, **kwargs: Any) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=kwargs.pop("max_pixels", MAX), **kwargs)
    return info.value


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_decodes_every_accepted_format(fmt: str) -> None:
    source = Image.fromarray(np.full((12, 20, 3), (200, 40, 90), dtype=np.uint8))
    options: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    image = decode_image(encode(source, fmt, **options), max_pixels=MAX)
    assert image.size == (20, 12)
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    tolerance = 60 if fmt == "GIF" else 8  # GIF quantises to a palette
    assert np.abs(rgb - [200, 40, 90]).max() <= tolerance, fmt
    assert fmt in ACCEPTED_FORMATS


def test_lossless_decode_is_exact() -> None:
    pixels = noise(9, 7)
    image = decode_image(encode(Image.fromarray(pixels), "PNG"), max_pixels=MAX)
    assert np.array_equal(np.asarray(image), pixels)


def test_format_is_sniffed_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    """A JPEG saved as ``.png`` decodes as JPEG; an ICO named ``.png`` is still refused."""
    jpeg = encode(Image.fromarray(noise(16, 16)), "JPEG")
    misnamed = tmp_path / "photo.png"
    misnamed.write_bytes(jpeg)
    with Image.open(misnamed) as opened:
        assert opened.format == "JPEG"
    decoded = decode_image(misnamed.read_bytes(), max_pixels=MAX)
    assert decoded.size == (16, 16) and decoded.mode == "RGB"
    ico = encode(Image.new("RGB", (16, 16), "red"), "ICO")
    assert decode_error(ico).kind == "unsupported_format"


def test_exif_orientation_6_is_applied() -> None:
    """Stored 40x20 with the left half white; orientation 6 = rotate 90 degrees clockwise."""
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (40, 20)  # the bytes really hold the unrotated image
    image = decode_image(data, max_pixels=MAX)
    assert image.size == (20, 40)
    pixels = np.asarray(image.convert("L"), dtype=np.int64)
    assert pixels[:18].mean() > 240  # the left half became the top
    assert pixels[22:].mean() < 15
    assert image.getexif().get(0x0112) in (None, 1)


def test_jpeg_draft_decodes_at_reduced_size() -> None:
    data = encode(Image.fromarray(noise(800, 600)), "JPEG")
    assert decode_image(data, max_pixels=MAX).size == (800, 600)
    # 800 // 100 = 8, 600 // 100 = 6 -> DCT scale 4 (the largest of 8, 4, 2, 1 not above 6)
    assert decode_image(data, max_pixels=MAX, draft_size=100).size == (200, 150)
    assert decode_image(data, max_pixels=MAX, draft_size=700).size == (800, 600)


def test_jpeg_draft_keeps_grayscale() -> None:
    data = encode(Image.fromarray(noise(256, 256, channels=1)), "JPEG")
    image = decode_image(data, max_pixels=MAX, draft_size=64)
    assert image.size == (64, 64) and image.mode == "L"


def test_draft_is_ignored_for_png() -> None:
    data = encode(Image.fromarray(noise(64, 64)), "PNG")
    assert decode_image(data, max_pixels=MAX, draft_size=8).size == (64, 64)


# --------------------------------------------------------------------------- modes


def test_rgba_is_composited_onto_the_background() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:4, :, 3] = 0  # ... but the top half fully transparent
    rgba[4:, :, 3] = 255
    image = decode_image(encode(Image.fromarray(rgba), "PNG"), max_pixels=MAX)
    assert image.mode == "RGBA"
    white = prepare_image(image, PreprocessSpec(image_size=8, channels=3, background=255))
    black = prepare_image(image, PreprocessSpec(image_size=8, channels=3, background=0))
    assert white.shape == (8, 8, 3)
    assert np.all(white[:4] == 255) and np.all(black[:4] == 0)  # transparent -> background
    assert np.all(white[4:] == [255, 0, 0]) and np.all(black[4:] == [255, 0, 0])  # opaque stays
    gray = prepare_image(image, PreprocessSpec(image_size=8, channels=1, background=255))
    assert gray.shape == (8, 8, 1) and np.all(gray[:4] == 255) and np.all(gray[4:] == 76)


def test_half_transparent_pixel_is_blended() -> None:
    image = Image.new("LA", (2, 2), (0, 128))  # black at ~50% opacity
    out = prepare_image(image, PreprocessSpec(image_size=8, channels=1, background=255))
    assert out.shape == (8, 8, 1)
    assert abs(int(out[0, 0, 0]) - 127) <= 2


def test_palette_with_transparency() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255] + [255, 0, 0] * 255)  # index 0 = blue, the rest red
    palette.putpixel((3, 3), 1)
    data = encode(palette, "PNG", transparency=0)
    image = decode_image(data, max_pixels=MAX)
    assert image.mode == "P" and "transparency" in image.info
    out = prepare_image(image, PreprocessSpec(image_size=8, channels=3, background=200))
    assert np.array_equal(out[0, 0], [200, 200, 200])  # transparent blue -> background
    assert np.array_equal(out[3, 3], [255, 0, 0])


def test_palette_gif_with_transparency() -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 255, 0, 10, 20, 30] + [0, 0, 0] * 254)
    palette.putpixel((0, 0), 0)
    image = decode_image(encode(palette, "GIF", transparency=0), max_pixels=MAX)
    out = prepare_image(image, PreprocessSpec(image_size=8, channels=3, background=77))
    assert np.array_equal(out[0, 0], [77, 77, 77])
    assert np.array_equal(out[1, 1], [10, 20, 30])


def test_palette_without_transparency_keeps_colours() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([12, 34, 56] + [0, 0, 0] * 255)
    out = prepare_image(palette, PreprocessSpec(image_size=8, channels=3, background=255))
    assert np.array_equal(out[0, 0], [12, 34, 56])


def test_sixteen_bit_png_is_stretched_to_eight_bits() -> None:
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 900 + 5000).astype(np.uint16)
    image = decode_image(encode(Image.fromarray(values), "PNG"), max_pixels=MAX)
    assert image.mode == "I;16"
    out = prepare_image(image, PreprocessSpec(image_size=8, channels=1))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 1)
    assert out[0, 0, 0] == 0 and out[7, 7, 0] == 255  # min -> 0, max -> 255
    assert np.all(np.diff(out[..., 0].ravel().astype(np.int64)) >= 0)  # order kept
    rgb = prepare_image(image, PreprocessSpec(image_size=8, channels=3))
    assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("mode", ["I", "F"])
def test_wide_modes_and_flat_images(mode: str) -> None:
    ramp = Image.fromarray(np.linspace(-5, 5, 64).reshape(8, 8).astype(np.float32)).convert(mode)
    out = prepare_image(ramp, PreprocessSpec(image_size=8, channels=1))
    assert out[0, 0, 0] == 0 and out[7, 7, 0] == 255
    flat = Image.fromarray(np.full((8, 8), 7, dtype=np.float32)).convert(mode)
    assert np.array_equal(
        prepare_image(flat, PreprocessSpec(image_size=8, channels=1)), np.zeros((8, 8, 1))
    )


@pytest.mark.parametrize(("channels", "expected"), [(3, (255, 0, 0)), (1, (76,))])
def test_cmyk_jpeg(channels: int, expected: tuple[int, ...]) -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    image = decode_image(data, max_pixels=MAX)
    assert image.mode == "CMYK"
    out = prepare_image(image, PreprocessSpec(image_size=8, channels=channels))
    assert out.shape == (8, 8, channels)
    assert np.abs(out[4, 4].astype(np.int64) - expected).max() <= 3


def test_one_by_one_image() -> None:
    image = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), max_pixels=1)
    out = prepare_image(image, PreprocessSpec(image_size=28, channels=3))
    assert out.shape == (28, 28, 3)
    assert np.all(out == np.array([10, 20, 30], dtype=np.uint8))


def test_bilevel_image() -> None:
    image = Image.new("1", (8, 8), 1)
    out = prepare_image(image, PreprocessSpec(image_size=8, channels=1))
    assert np.all(out == 255)


# --------------------------------------------------------------------------- errors


def test_empty_input() -> None:
    error = decode_error(b"")
    assert error.kind == "empty" and "empty" in str(error)


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"hello, this is plain text and not a picture\n" * 10,
        b"<!DOCTYPE html><html><head><title>x</title></head><body><img src=a.png></body></html>",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
    ],
    ids=["random", "text", "html", "pdf-header"],
)
def test_not_an_image(data: bytes) -> None:
    error = decode_error(data)
    assert error.kind == "not_an_image"
    assert "not a recognised image" in str(error) and "PNG" in str(error)


def test_pdf_written_by_pil_is_not_an_image() -> None:
    """PIL can write PDFs but not read them, so a PDF is 'not an image', not 'unsupported'."""
    pdf = encode(Image.new("RGB", (8, 8), "red"), "PDF")
    assert pdf.startswith(b"%PDF")
    assert decode_error(pdf).kind == "not_an_image"


@pytest.mark.parametrize(("fmt", "name"), [("ICO", "ICO"), ("PPM", "PPM"), ("TGA", "TGA")])
def test_images_pil_reads_but_we_do_not_accept(fmt: str, name: str) -> None:
    data = encode(Image.new("RGB", (16, 16), "red"), fmt)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.format == name  # PIL itself recognises it
    error = decode_error(data)
    assert error.kind == "unsupported_format"
    assert f"image format {name} is not accepted" in str(error)


def test_header_claiming_a_huge_image_is_refused_before_decoding() -> None:
    error = decode_error(png_header_only(1_000_000, 1_000_000))
    assert error.kind == "too_many_pixels"


def test_decompression_bomb_warning_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between PIL's limit and twice it, PIL only warns: decode_image turns that into a refusal."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("L", (40, 40)), "PNG")  # 1600 pixels: warning territory
    error = decode_error(data)
    assert error.kind == "too_many_pixels"
    assert "1600" in str(error)


def test_max_pixels_limit() -> None:
    data = encode(Image.new("L", (10, 10)), "PNG")
    error = decode_error(data, max_pixels=99)
    assert error.kind == "too_many_pixels"
    assert str(error) == "image is 10x10 = 100 pixels, over the limit of 99"
    assert decode_image(data, max_pixels=100).size == (10, 10)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_data(fmt: str) -> None:
    data = encode(Image.fromarray(noise(64, 64)), fmt)
    error = decode_error(data[: len(data) // 2])
    assert error.kind == "corrupt"
    assert "truncated or corrupt" in str(error)


@pytest.mark.parametrize(("fmt", "cut"), [("PNG", 20), ("JPEG", 300), ("BMP", 30)])
def test_truncated_header(fmt: str, cut: int) -> None:
    data = encode(Image.fromarray(noise(64, 64)), fmt)
    error = decode_error(data[:cut])
    assert error.kind == "corrupt"
    assert "header could not be read" in str(error)


def test_decode_error_is_a_value_error() -> None:
    error = ImageDecodeError("corrupt", "bad")
    assert isinstance(error, ValueError) and error.kind == "corrupt" and str(error) == "bad"


# --------------------------------------------------------------------------- prepare + input


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 33])
@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "nearest", "lanczos", "box"])
def test_prepare_image_shape_and_dtype(channels: int, size: int, resample: str) -> None:
    spec = PreprocessSpec.model_validate(
        {"image_size": size, "channels": channels, "resample": resample}
    )
    out = prepare_image(Image.fromarray(noise(40, 30)), spec)
    assert out.shape == (size, size, channels)
    assert out.dtype == np.uint8


def test_default_downscale_recovers_a_photo_of_a_small_image() -> None:
    """A 28×28 image sent as a large RGB JPEG comes back closer with the default filter.

    The default (lanczos) must beat bilinear, which blurred such uploads and cost accuracy
    (``bench/photo_uploads.py`` measures that on the real test set).
    """
    from bench.photo_uploads import STYLES, photo_upload

    rng = np.random.default_rng(3)
    # Garment-like: flat blocks with sharp edges on a black background.
    pixels = np.zeros((28, 28, 1), dtype=np.uint8)
    for _ in range(6):
        top, left = rng.integers(2, 20, size=2)
        pixels[top : top + rng.integers(3, 8), left : left + rng.integers(3, 8)] = rng.integers(
            80, 255
        )
    errors = {}
    for resample in ("bilinear", PreprocessSpec().resample):
        spec = PreprocessSpec.model_validate({"resample": resample})
        errors[resample] = [
            float(np.abs(prepare(photo_upload(pixels, style), spec) - pixels).mean())
            for style in STYLES
        ]
    assert PreprocessSpec().resample == "lanczos"
    assert all(a < b for a, b in zip(errors["lanczos"], errors["bilinear"], strict=True)), errors


def prepare(data: bytes, spec: PreprocessSpec) -> np.ndarray[Any, np.dtype[np.int16]]:
    """Bytes through the serving path's decode and prepare, as signed pixels for differences."""
    image = decode_image(data, max_pixels=10**7, draft_size=256)
    return prepare_image(image, spec).astype(np.int16)


def test_prepare_image_same_size_is_untouched() -> None:
    pixels = noise(28, 28, channels=1)
    out = prepare_image(Image.fromarray(pixels), PreprocessSpec())
    assert np.array_equal(out[..., 0], pixels)


def test_prepare_image_grayscale_uses_luminance() -> None:
    out = prepare_image(Image.new("RGB", (8, 8), (0, 255, 0)), PreprocessSpec(image_size=8))
    assert out.shape == (8, 8, 1) and int(out[0, 0, 0]) == 150  # ITU-R 601: 0.587 * 255


def test_to_model_input_layout() -> None:
    arrays = [noise(5, 4, seed=i) for i in range(3)]  # [H=4, W=5, C=3]
    batch = to_model_input(arrays)
    assert batch.shape == (3, 3, 4, 5) and batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    for n in range(3):
        for c in range(3):
            for h in range(4):
                for w in range(5):
                    assert batch[n, c, h, w] == float(arrays[n][h, w, c])
    assert batch.max() <= 255.0 and batch.min() >= 0.0


def test_to_model_input_single_channel() -> None:
    arrays = [
        prepare_image(Image.fromarray(noise(28, 28, 1, seed=i)), PreprocessSpec()) for i in range(2)
    ]
    batch = to_model_input(arrays)
    assert batch.shape == (2, 1, 28, 28)
    assert np.array_equal(batch[1, 0], arrays[1][..., 0].astype(np.float32))


def test_softmax() -> None:
    logits = np.array([[0.0, np.log(3.0)], [1.0, 1.0]], dtype=np.float32)
    probs = softmax(logits)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.5, 0.5]], atol=1e-6)


def test_softmax_is_stable_for_large_logits() -> None:
    logits = np.array([[1000.0, 1001.0, 999.0], [-1e4, -1e4, -1e4]], dtype=np.float32)
    probs = softmax(logits)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-6)
    expected = np.exp([-1.0, 0.0, -2.0]) / np.exp([-1.0, 0.0, -2.0]).sum()
    np.testing.assert_allclose(probs[0], expected, atol=1e-6)
    np.testing.assert_allclose(probs[1], [1 / 3] * 3, atol=1e-6)


def test_spec_defaults_and_validation() -> None:
    spec = PreprocessSpec()
    assert (spec.image_size, spec.channels, spec.input_layout, spec.input_scale) == (
        28,
        1,
        "NCHW",
        "0-255",
    )
    assert PreprocessSpec.model_validate(spec.model_dump(mode="json")) == spec
    with pytest.raises(ValueError, match="image_size"):
        PreprocessSpec(image_size=4)


def test_preprocess_does_not_import_torch() -> None:
    code = "import sys, common.preprocess; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
