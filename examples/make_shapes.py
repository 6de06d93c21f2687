"""Write the toy ImageFolder ``examples/shapes/``: 3 classes of small grayscale PNGs.

``python examples/make_shapes.py [ROOT]`` (default ROOT: ``examples/shapes`` next to this file)
draws ``circle``, ``square`` and ``triangle`` outlines of random size, position and brightness on a
dark, slightly noisy background, 12 per class, as 32x32 PNGs in ``ROOT/<class>/<class>_NN.png``.
A fixed seed makes the output identical on every run; the user guide (``docs/user-guide.md``)
trains on it, and ``tests/test_user_guide.py`` checks that the committed folder is this script's
output.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
PER_CLASS = 12
SIZE = 32
SEED = 8
DEFAULT_ROOT = Path(__file__).resolve().parent / "shapes"


def draw_shape(name: str, rng: np.random.Generator) -> Image.Image:
    """One ``SIZE`` x ``SIZE`` grayscale image of shape ``name`` (an outline, 2-3 px wide)."""
    noise = rng.integers(0, 40, size=(SIZE, SIZE), dtype=np.uint8)
    image = Image.fromarray(noise)  # uint8 [H, W] → mode L
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(8, 14))
    cx = int(rng.integers(radius + 1, SIZE - radius - 1))
    cy = int(rng.integers(radius + 1, SIZE - radius - 1))
    ink = int(rng.integers(180, 256))
    width = int(rng.integers(2, 4))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if name == "circle":
        draw.ellipse(box, outline=ink, width=width)
    elif name == "square":
        draw.rectangle(box, outline=ink, width=width)
    elif name == "triangle":
        corners = [
            (
                cx + radius * math.cos(math.radians(angle)),
                cy - radius * math.sin(math.radians(angle)),
            )
            for angle in (90, 210, 330)
        ]
        draw.polygon(corners, outline=ink, width=width)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return image


def make_shapes(root: Path = DEFAULT_ROOT, per_class: int = PER_CLASS) -> Path:
    """(Re)create ``root`` with ``per_class`` PNGs per class; returns ``root``."""
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(SEED)
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            draw_shape(name, rng).save(folder / f"{name}_{index:02d}.png", optimize=True)
    return root


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="Write the toy ImageFolder examples/shapes/.")
    parser.add_argument("root", nargs="?", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args(argv)
    root = make_shapes(args.root)
    files = sorted(root.rglob("*.png"))
    total = sum(f.stat().st_size for f in files)
    print(f"{len(files)} images, {total} bytes in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
