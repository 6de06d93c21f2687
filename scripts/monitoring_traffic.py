"""Send realistic and drifted traffic to a running service, for the monitoring dashboard and alerts.

``python scripts/monitoring_traffic.py --url http://127.0.0.1:3000 [--images 300] [--drifted 100]
[--drift invert|rotate] [--bad 10] [--metrics-out FILE] [section.key=value ...]``

Three phases, in order: ``--images`` test-split images of the configured data set (three in four
to ``/predict``, the rest to ``/batch_predict`` in groups of ``--batch``), ``--bad`` client
mistakes (empty files, bytes that are not an image), then ``--drifted`` further test images
inverted or rotated by 90 degrees, all to ``/predict``. Requests run ``--concurrency`` at a time.
At the end the ``/metrics`` text is saved to ``--metrics-out`` when given. The trailing
``section.key=value`` overrides go to :func:`train.config.load_settings` (e.g. ``data.path=...``).
It prints one line per phase with the statuses it got.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from numpy.typing import NDArray
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def png(array: NDArray[np.uint8]) -> bytes:
    """An ``[H, W, C]`` uint8 image as PNG bytes."""
    buffer = io.BytesIO()
    pixels = array[..., 0] if array.shape[-1] == 1 else array
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def drifted(array: NDArray[np.uint8], how: Literal["invert", "rotate"]) -> NDArray[np.uint8]:
    """The image inverted (255 - x) or rotated by 90 degrees."""
    if how == "invert":
        return np.asarray(255 - array, dtype=np.uint8)
    return np.ascontiguousarray(np.rot90(array, k=1, axes=(0, 1)))


def test_images(overrides: Sequence[str], count: int) -> NDArray[np.uint8]:
    """The first ``count`` test-split images of the configured data set (never downloaded)."""
    from train.config import load_settings
    from train.data import load_data

    settings = load_settings(overrides=list(overrides))
    bundle = load_data(settings.data.model_copy(update={"allow_download": False}))
    images = bundle.test.images
    if len(images) < count:
        repeats = -(-count // len(images))
        images = np.concatenate([images] * repeats)
    return images[:count]


async def _send(
    client: httpx.AsyncClient, requests: list[tuple[str, list[tuple[str, Any]]]], concurrency: int
) -> Counter[int]:
    gate = asyncio.Semaphore(concurrency)
    statuses: Counter[int] = Counter()

    async def one(path: str, files: list[tuple[str, Any]]) -> None:
        async with gate:
            response = await client.post(path, files=files)
            statuses[response.status_code] += 1

    await asyncio.gather(*(one(path, files) for path, files in requests))
    return statuses


def plan(images: Sequence[bytes], batch: int) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Three in four images one by one to /predict, the rest in groups to /batch_predict."""
    singles = len(images) * 3 // 4
    requests: list[tuple[str, list[tuple[str, Any]]]] = [
        ("/predict", [("image", (f"{i}.png", data, "image/png"))])
        for i, data in enumerate(images[:singles])
    ]
    rest = images[singles:]
    for start in range(0, len(rest), batch):
        group = rest[start : start + batch]
        files = [("images", (f"{start + i}.png", d, "image/png")) for i, d in enumerate(group)]
        requests.append(("/batch_predict", files))
    return requests


def main(argv: list[str] | None = None) -> int:
    """Run the three phases; returns 0 when every good request got 200 and every bad one a 4xx."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--drifted", type=int, default=100)
    parser.add_argument("--drift", choices=["invert", "rotate"], default="invert")
    parser.add_argument("--bad", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--metrics-out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="section.key=value settings overrides")
    args = parser.parse_args(argv)

    arrays = test_images(args.overrides, args.images + args.drifted)
    normal = [png(a) for a in arrays[: args.images]]
    shifted = [png(drifted(a, args.drift)) for a in arrays[args.images :]]
    bad = [b"" if i % 2 == 0 else b"not an image at all" for i in range(args.bad)]
    phases = [
        ("normal", plan(normal, args.batch)),
        ("bad", [("/predict", [("image", ("bad.png", d, "image/png"))]) for d in bad]),
        (f"drifted ({args.drift})", plan(shifted, args.batch)),
    ]
    healthy = True

    async def run() -> None:
        nonlocal healthy
        async with httpx.AsyncClient(base_url=args.url, timeout=60) as client:
            for name, requests in phases:
                statuses = await _send(client, requests, args.concurrency)
                shown = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
                print(f"{name}: {len(requests)} requests ({shown})")
                expected = range(400, 500) if name == "bad" else range(200, 201)
                healthy = healthy and all(code in expected for code in statuses)
            if args.metrics_out is not None:
                text = (await client.get("/metrics")).text
                args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
                args.metrics_out.write_text(text)
                print(f"metrics saved to {args.metrics_out}")

    asyncio.run(run())
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
