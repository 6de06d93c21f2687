"""Memory and speed of the two ImageFolder loaders (``data.loader: memory | stream``).

``python -m bench.data_loaders`` (or ``make bench-loaders``) writes a synthetic ImageFolder of
``--images`` RGB JPEGs (``--size`` pixels square, ``--classes`` classes: noise plus a class
shape, in parallel processes; kept and reused under ``--root`` when it is already complete), then
runs each loader in a fresh Python process, so their peaks do not mix, and prints:

- ``setup s``: :func:`train.data.open_data` (memory: decode every image; stream: list the files
  and sample the pixel statistics);
- ``pass img/s``: one pass over the training split in training batches, as the engine receives
  them (memory: index the tensors; stream: DataLoader workers decode each batch);
- ``peak RSS MB``: the process's own peak resident memory (``resource.getrusage``);
- ``tree peak MB``: the largest sum of the resident memory of the process and its DataLoader
  workers, sampled every 50 ms (``psutil``; pages the forked workers share with the process are
  counted in each, so this overstates what the tree really holds).

The images are decoded at the training size ``--image-size`` (default: ``--size``, no resize).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image, ImageDraw

LOADERS = ("memory", "stream")
DONE_MARKER = ".complete.json"


def _write_images(job: tuple[Path, int, int, int, int]) -> int:
    """Write images ``start .. start + count - 1`` (class = index % classes); returns the count."""
    root, start, count, size, classes = job
    for index in range(start, start + count):
        label = index % classes
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(image)
        # Class k: a polygon with k + 3 corners in a class colour, at a random place.
        centre = rng.integers(size // 4, 3 * size // 4, size=2)
        angles = np.linspace(0, 2 * np.pi, label + 3, endpoint=False)
        corners = [
            (float(centre[0] + size / 5 * np.cos(a)), float(centre[1] + size / 5 * np.sin(a)))
            for a in angles
        ]
        draw.polygon(corners, fill=(25 * label, 255 - 25 * label, 128))
        image.save(root / f"class_{label:02d}" / f"img_{index:06d}.jpg", quality=90)
    return count


def make_folder(root: Path, images: int, size: int, classes: int, processes: int) -> Path:
    """The synthetic ImageFolder at ``root``, generated unless a complete one is already there."""
    wanted = {"images": images, "size": size, "classes": classes}
    marker = root / DONE_MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"reusing {images} images in {root}", file=sys.stderr)
        return root
    for label in range(classes):
        (root / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    chunk = 500
    jobs = [
        (root, start, min(chunk, images - start), size, classes)
        for start in range(0, images, chunk)
    ]
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        written = sum(pool.imap_unordered(_write_images, jobs))
    marker.write_text(json.dumps(wanted))
    seconds = time.perf_counter() - started
    print(f"wrote {written} images to {root} in {seconds:.0f} s", file=sys.stderr)
    return root


class TreeMemory:
    """The peak sum of resident memory of this process and its children, sampled in a thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        me = psutil.Process()
        while not self._stop.wait(interval_s):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:  # a worker that just exited
                    continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(loader: str, overrides: list[str]) -> dict[str, Any]:
    """Open the folder with ``loader`` and make one training pass; timings and peak memory."""
    from train.config import load_settings
    from train.data import batch_source, open_data
    from train.engine import batches_of  # the engine's own batching of either source

    settings = load_settings(overrides=[*overrides, f"data.loader={loader}"])
    tree = TreeMemory()
    started = time.perf_counter()
    bundle = open_data(settings.data)
    setup = time.perf_counter() - started
    cfg = settings.train
    source = batch_source(bundle.train, cfg.batch_size, settings.data, True, cfg.seed)
    import torch

    started = time.perf_counter()
    batches, _ = batches_of(source, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    seen = sum(int(labels.shape[0]) for _, labels in batches)
    seconds = time.perf_counter() - started
    tree_peak = tree.stop() / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "loader": loader,
        "train_images": seen,
        "setup_s": round(setup, 1),
        "pass_s": round(seconds, 1),
        "images_per_s": round(seen / seconds),
        "peak_rss_mb": round(own),
        "tree_peak_rss_mb": round(max(tree_peak, own)),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/fashion-serve-bench-folder"))
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=224, help="side of the generated JPEGs")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=None, help="training size (--size)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="stream DataLoader workers")
    parser.add_argument(
        "--processes", type=int, default=multiprocessing.cpu_count(), help="generating"
    )
    parser.add_argument("--measure", choices=LOADERS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = [
        "data.source=image_folder",
        f"data.path={args.root}",
        f"data.image_size={args.image_size or args.size}",
        "data.channels=3",
        f"data.num_workers={args.workers}",
        f"train.batch_size={args.batch_size}",
    ]
    if args.measure:
        print(json.dumps(measure(args.measure, overrides)))
        return 0
    make_folder(args.root, args.images, args.size, args.classes, args.processes)
    rows = []
    for loader in LOADERS:
        # A fresh process per loader: ru_maxrss is a high-water mark that never comes down.
        command = [sys.executable, "-m", "bench.data_loaders", *(argv or sys.argv[1:])]
        done = subprocess.run(
            [*command, "--measure", loader], check=True, capture_output=True, text=True
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    size = args.image_size or args.size
    print(
        f"{args.images} JPEGs {args.size}x{args.size}, {args.classes} classes, trained at "
        f"{size}x{size}x3, batch {args.batch_size}, stream workers {args.workers}"
    )
    print("| loader | train images | setup s | pass s | pass img/s | peak RSS MB | tree peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['loader']} | {row['train_images']} | {row['setup_s']} | {row['pass_s']} "
            f"| {row['images_per_s']} | {row['peak_rss_mb']} | {row['tree_peak_rss_mb']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
