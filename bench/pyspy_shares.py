"""Share of a worker's CPU samples per function, from a ``py-spy record -f raw`` file.

A served worker under load, profiled without stopping it::

    py-spy record -p <worker pid> -r 250 -d 14 -f raw -o worker.raw --nonblocking
    python -m bench.pyspy_shares worker.raw --top 40

Each function's inclusive share counts every sample with it anywhere on the stack (once per
sample); its own share counts the samples where it is the innermost frame, which for a Python
function includes the C code it calls (ONNX Runtime, a socket write). py-spy samples only running
threads, so the shares are of CPU time.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path


def frame_name(frame: str) -> str:
    """``function (file.py)`` of a py-spy frame ``function (path/file.py:line)``."""
    function, _, location = frame.partition(" (")
    if not location:
        return frame
    return f"{function} ({location.rsplit('/', 1)[-1].split(':', 1)[0].rstrip(')')})"


def shares(lines: Iterable[str]) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, and samples per function: inclusive and innermost."""
    inclusive: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [frame_name(frame) for frame in stack.split(";")]
        for name in set(frames):
            inclusive[name] += samples
        innermost[frames[-1]] += samples
    return total, inclusive, innermost


def main(argv: Sequence[str] | None = None) -> int:
    """Print the top functions by inclusive and by own share."""
    parser = argparse.ArgumentParser(prog="python -m bench.pyspy_shares", description=__doc__)
    parser.add_argument("raw", type=Path, help="a py-spy record -f raw file")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    total, inclusive, innermost = shares(args.raw.read_text().splitlines())
    if not total:
        print(f"no samples in {args.raw}", file=sys.stderr)
        return 1
    for title, counts in (("inclusive", inclusive), ("own", innermost)):
        print(f"== {title} share of {total} samples")
        for name, samples in counts.most_common(args.top):
            print(f"{samples / total:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
