"""Hostile and odd inputs against ONE real ``bentoml serve`` process (the default limits).

The corpus is generated here with PIL and plain bytes. Valid but unusual images (odd modes,
CMYK and progressive JPEGs, EXIF rotation, 1×1 and 4000×3000, wrong names and content types)
must get 200 and a prediction; garbage (empty, random, truncated, text/HTML/PDF/SVG, formats we
do not accept, decompression bombs small on the wire, oversized bodies, wrong fields and batch
sizes, JSON, URLs and server paths in text fields) must get a 4xx JSON error naming the problem.
Nothing may get a 5xx, no URL may be fetched (a loopback listener counts connections), and
afterwards the server must still be ready and still predict.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving_helpers import (
    TINY_CLASSES,
    bentoml_serve,
    import_tiny,
    serve_env,
    tiny_model,
)
from tests.test_service import Listener

pytestmark = pytest.mark.slow

#: The served process keeps the default limits except a smaller body cap, so the oversized
#: upload stays cheap to send (the declared Content-Length is refused before the body is read).
MAX_UPLOAD_BYTES = 3_000_000
MAX_IMAGES = 64  # configs/serving.yaml's default limits.max_images_per_batch
BOUNDARY = "hostileboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
ENDPOINT_FIELDS = {"/predict": "image", "/batch_predict": "images"}


# --------------------------------------------------------------------------- image makers


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """``image`` encoded as ``fmt`` with PIL's ``save`` options."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A noise image of ``size`` (width, height) in ``mode`` (L, RGB or RGBA)."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def gradient(size: tuple[int, int]) -> Image.Image:
    """A smooth RGB gradient: a large image that stays small on the wire."""
    width, height = size
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    red = np.broadcast_to(xs, (height, width))
    green = np.broadcast_to(ys, (height, width))
    blue = (red + green) / 2
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8), "RGB")


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def sixteen_bit_png() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 65536, size=(30, 40), dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    return png(image)


def palette_png(transparent: bool) -> bytes:
    image = noise((32, 24)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", **({"transparency": 0} if transparent else {}))


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return encode(noise((60, 20)), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [noise((20, 20), "L", seed=s).convert("P") for s in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def float_tiff() -> bytes:
    pixels = np.random.default_rng(2).normal(size=(16, 16)).astype(np.float32)
    return encode(Image.fromarray(pixels), "TIFF")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A grayscale PNG whose header claims ``width`` x ``height`` with one compressed row."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    row = zlib.compress(b"\x00" * (width + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", row) + png_chunk(b"IEND", b"")


def gif_bomb() -> bytes:
    """A GIF header claiming 65535 x 65535 pixels, 40-odd bytes on the wire."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00;"
    return screen + image


def zlib_bomb_png() -> bytes:
    """5000 x 5000 black pixels (25 MP, within the pixel limit) deflated to ~25 kB."""
    return png(Image.new("L", (5000, 5000)))


def flipped_crc_png() -> bytes:
    data = bytearray(png(noise((64, 64), "L")))
    index = data.index(b"IDAT") + 40
    data[index] ^= 0xFF
    return bytes(data)


PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="28" height="28">'
    b'<image href="http://169.254.169.254/latest/meta-data/" width="28" height="28"/></svg>'
)
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"


# --------------------------------------------------------------------------- requests


def files(endpoint: str, *data: bytes, name: str = "x.png", ctype: str = "image/png") -> Any:
    """``httpx`` keyword arguments uploading each of ``data`` in the endpoint's field."""
    field = ENDPOINT_FIELDS[endpoint]
    return {"files": [(field, (name, item, ctype)) for item in data]}


def raw(body: bytes, content_type: str = MULTIPART) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


def text_field(field: str, value: str) -> dict[str, Any]:
    """A multipart body whose field ``field`` is a text value, not a file."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n'
        f"{value}\r\n--{BOUNDARY}--\r\n"
    )
    return raw(body.encode())


@dataclass(frozen=True)
class Case:
    """One request of the corpus and what it must get: 200, or a 4xx with ``kind``."""

    name: str
    endpoint: str
    request: Callable[[Listener], dict[str, Any]]
    status: int = 200
    kind: str | None = None


def ok(
    title: str,
    make: Callable[[], bytes],
    filename: str = "x.png",
    ctype: str = "image/png",
) -> Case:
    """A valid image for ``/predict``, sent as ``filename`` with content type ``ctype``."""
    return Case(title, "/predict", lambda _: files("/predict", make(), name=filename, ctype=ctype))


def bad(
    name: str, endpoint: str, request: Callable[[Listener], Any], status: int, kind: str
) -> Case:
    return Case(name, endpoint, request, status, kind)


VALID = [
    ok("rgba png", lambda: png(noise((40, 30), "RGBA"))),
    ok("la png", lambda: png(noise((20, 20), "L").convert("LA"))),
    ok("palette png", lambda: palette_png(transparent=False)),
    ok("palette png with transparency", lambda: palette_png(transparent=True)),
    ok("16-bit grayscale png", sixteen_bit_png),
    ok("1-bit png", lambda: png(noise((33, 17), "L").convert("1"))),
    ok("cmyk jpeg", lambda: encode(noise((48, 48)).convert("CMYK"), "JPEG")),
    ok("progressive jpeg", lambda: encode(noise((64, 64)), "JPEG", progressive=True)),
    ok("grayscale jpeg", lambda: encode(noise((30, 30), "L"), "JPEG")),
    ok("exif-rotated jpeg", exif_rotated_jpeg),
    ok("1x1 png", lambda: png(Image.new("L", (1, 1), 200))),
    ok("1x2000 png", lambda: png(Image.new("L", (1, 2000), 90))),
    ok("4000x3000 jpeg", lambda: encode(gradient((4000, 3000)), "JPEG", quality=80)),
    ok("4000x3000 png", lambda: png(gradient((4000, 3000)))),
    ok("25 MP zero png (deflate ratio 1000:1, under the pixel limit)", zlib_bomb_png),
    ok("webp", lambda: encode(noise((32, 32)), "WEBP")),
    ok("bmp", lambda: encode(noise((32, 32)), "BMP")),
    ok("animated gif", animated_gif),
    ok("float tiff", float_tiff),
    ok("16-bit tiff", lambda: encode(Image.open(io.BytesIO(sixteen_bit_png())), "TIFF")),
    ok(
        "png named .gif", lambda: png(noise((28, 28), "L")), filename="photo.gif", ctype="image/gif"
    ),
    ok("png sent as text/plain", lambda: png(noise((28, 28), "L")), ctype="text/plain"),
    Case(
        "jpeg with an empty file name and no content type",
        "/predict",
        lambda _: raw(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename=""\r\n\r\n'.encode()
            + encode(noise((28, 28)), "JPEG")
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        ),
    ),
    ok("path-like file name", lambda: png(noise((28, 28), "L")), filename="../../etc/passwd"),
    ok("unicode file name", lambda: png(noise((28, 28), "L")), filename="schuh-ü-靴.png"),
    ok("png with trailing junk", lambda: png(noise((28, 28), "L")) + b"junk" * 100),
    Case(
        "mixed batch",
        "/batch_predict",
        lambda _: files(
            "/batch_predict",
            png(noise((28, 28), "RGBA")),
            encode(noise((40, 40)).convert("CMYK"), "JPEG"),
            sixteen_bit_png(),
            animated_gif(),
        ),
    ),
    Case(
        "full batch",
        "/batch_predict",
        lambda _: files(
            "/batch_predict", *[png(noise((28, 28), "L", s)) for s in range(MAX_IMAGES)]
        ),
    ),
]

GARBAGE = [
    bad("empty file", "/predict", lambda _: files("/predict", b""), 400, "empty"),
    bad(
        "random bytes",
        "/predict",
        lambda _: files("/predict", np.random.default_rng(3).bytes(4096)),
        415,
        "not_an_image",
    ),
    bad(
        "truncated png",
        "/predict",
        lambda _: files("/predict", png(noise((64, 64)))[:3000]),
        422,
        "corrupt",
    ),
    bad(
        "truncated jpeg",
        "/predict",
        lambda _: files("/predict", encode(noise((64, 64)), "JPEG")[:600]),
        422,
        "corrupt",
    ),
    bad(
        "png signature only",
        "/predict",
        lambda _: files("/predict", b"\x89PNG\r\n\x1a\n"),
        415,
        "not_an_image",
    ),
    bad(
        "png with a flipped byte",
        "/predict",
        lambda _: files("/predict", flipped_crc_png()),
        422,
        "corrupt",
    ),
    bad(
        "plain text",
        "/predict",
        lambda _: files("/predict", b"hello, world\n" * 20),
        415,
        "not_an_image",
    ),
    bad(
        "html",
        "/predict",
        lambda _: files("/predict", HTML, ctype="text/html"),
        415,
        "not_an_image",
    ),
    bad(
        "pdf",
        "/predict",
        lambda _: files("/predict", PDF, ctype="application/pdf"),
        415,
        "not_an_image",
    ),
    bad(
        "svg",
        "/predict",
        lambda _: files("/predict", SVG, ctype="image/svg+xml"),
        415,
        "not_an_image",
    ),
    bad(
        "ppm (not accepted)",
        "/predict",
        lambda _: files("/predict", encode(noise((28, 28)), "PPM")),
        415,
        "unsupported_format",
    ),
    bad(
        "ico (not accepted)",
        "/predict",
        lambda _: files("/predict", encode(noise((32, 32)), "ICO")),
        415,
        "unsupported_format",
    ),
    bad(
        "png bomb 100000x100000",
        "/predict",
        lambda _: files("/predict", png_bomb(100_000, 100_000)),
        413,
        "too_many_pixels",
    ),
    bad(
        "gif bomb 65535x65535",
        "/predict",
        lambda _: files("/predict", gif_bomb()),
        413,
        "too_many_pixels",
    ),
    bad(
        "bomb in a batch",
        "/batch_predict",
        lambda _: files("/batch_predict", png(noise((28, 28))), png_bomb(20_000, 20_000)),
        413,
        "too_many_pixels",
    ),
    bad(
        "oversized upload",
        "/predict",
        lambda _: files("/predict", bytes(MAX_UPLOAD_BYTES + 1)),
        413,
        "upload_too_large",
    ),
    bad(
        "missing field",
        "/predict",
        lambda _: raw(f"--{BOUNDARY}--\r\n".encode()),
        400,
        "missing_field",
    ),
    bad(
        "wrong field",
        "/predict",
        lambda _: {"files": [("file", ("x.png", png(noise((8, 8))), "image/png"))]},
        400,
        "unexpected_field",
    ),
    bad(
        "empty batch",
        "/batch_predict",
        lambda _: raw(f"--{BOUNDARY}--\r\n".encode()),
        400,
        "missing_field",
    ),
    bad(
        "batch over the limit",
        "/batch_predict",
        lambda _: files("/batch_predict", *[png(noise((8, 8), "L"))] * (MAX_IMAGES + 1)),
        413,
        "too_many_images",
    ),
    bad(
        "json instead of multipart",
        "/predict",
        lambda lst: {"json": {"image": f"http://127.0.0.1:{lst.port}/x.png"}},
        415,
        "unsupported_media_type",
    ),
    bad(
        "no content type",
        "/batch_predict",
        lambda _: {"content": b"abc"},
        415,
        "unsupported_media_type",
    ),
    bad(
        "loopback url in a text field",
        "/predict",
        lambda lst: text_field("image", f"http://127.0.0.1:{lst.port}/x.png"),
        400,
        "not_a_file",
    ),
    bad(
        "cloud metadata url in a text field",
        "/predict",
        lambda _: text_field("image", "http://169.254.169.254/latest/meta-data/iam/"),
        400,
        "not_a_file",
    ),
    bad(
        "public url in a text field",
        "/batch_predict",
        lambda _: text_field("images", "https://example.com/shirt.png"),
        400,
        "not_a_file",
    ),
    bad(
        "file url in a text field",
        "/predict",
        lambda _: text_field("image", "file:///etc/passwd"),
        400,
        "not_a_file",
    ),
    bad(
        "server path in a text field",
        "/batch_predict",
        lambda _: text_field("images", "/etc/passwd"),
        400,
        "not_a_file",
    ),
    bad(
        "garbage multipart",
        "/predict",
        lambda _: raw(b"\x00\xff" * 500),
        400,
        "malformed_multipart",
    ),
    bad(
        "gzip archive",
        "/predict",
        lambda _: files("/predict", zlib.compress(b"x" * 1000), ctype="application/gzip"),
        415,
        "not_an_image",
    ),
    bad(
        "png bomb 8000x8000 (over max_pixels, under PIL's own limit)",
        "/predict",
        lambda _: files("/predict", png_bomb(8000, 8000)),
        413,
        "too_many_pixels",
    ),
]


# --------------------------------------------------------------------------- the served process


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One ``bentoml serve`` with a tiny model and the default limits (smaller body cap)."""
    home = tmp_path_factory.mktemp("bentoml")
    import_tiny(tiny_model(), home)
    env = serve_env(home, workers=1, limits={"max_upload_bytes": MAX_UPLOAD_BYTES})
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    with bentoml_serve(env, log) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("case", VALID, ids=[c.name for c in VALID])
def test_valid_unusual_images_are_predicted(
    server: httpx.Client, listener: Listener, case: Case
) -> None:
    response = server.post(case.endpoint, **case.request(listener))
    assert response.status_code == 200, response.text
    body = response.json()
    predictions = [body] if case.endpoint == "/predict" else body
    assert predictions
    for prediction in predictions:
        assert prediction["label"] in TINY_CLASSES
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("case", GARBAGE, ids=[c.name for c in GARBAGE])
def test_garbage_is_a_4xx_naming_the_problem(
    server: httpx.Client, listener: Listener, case: Case
) -> None:
    response = server.post(case.endpoint, **case.request(listener))
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["kind"] == case.kind
    assert isinstance(body["error"], str) and len(body["error"]) > 10


def test_after_the_corpus_nothing_was_fetched_and_the_server_still_serves(
    server: httpx.Client, listener: Listener
) -> None:
    assert listener.connections == 0
    assert len(VALID) + len(GARBAGE) >= 30
    assert server.get("/readyz").status_code == 200
    response = server.post("/predict", **files("/predict", png(noise((28, 28), "L"))))
    assert response.status_code == 200 and response.json()["label"] in TINY_CLASSES
    errors = [
        line
        for line in server.get("/metrics").text.splitlines()
        if line.startswith("fashion_serve_errors_total") and 'kind="http_5' in line
    ]
    assert errors == []
