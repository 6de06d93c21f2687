"""Python load generator for ``bench/serving.py`` when Debian's ``wrk`` is not installed.

Run as its own process (``python -m bench.loadgen``), so its CPU use is measured apart from the
server's. It keeps ``--concurrency`` requests in flight for ``--duration`` seconds over aiohttp,
posting the prebuilt multipart bodies ``body-0000.bin``... in rotation, and prints the same
``BENCH_JSON {...}`` summary line as ``bench/post_multipart.lua`` (``status`` here counts every
non-2xx response; ``connect``/``read``/``timeout`` count socket failures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

SUMMARY_PREFIX = "BENCH_JSON "


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none).

    Args:
        sorted_values: Values in ascending order.
        fraction: 0.5 for the median, 0.99 for p99.
    """
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def read_bodies(folder: Path, count: int) -> list[bytes]:
    """The ``count`` prebuilt bodies ``body-0000.bin``... in ``folder``."""
    return [(folder / f"body-{i:04d}.bin").read_bytes() for i in range(count)]


async def generate(
    url: str,
    bodies: Sequence[bytes],
    content_type: str,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
) -> dict[str, float | str]:
    """Keep ``concurrency`` POSTs in flight for ``duration_s`` and summarise them.

    Returns:
        The summary in ``post_multipart.lua``'s schema (durations and latencies in microseconds).
    """
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    counter = 0
    headers = {"Content-Type": content_type}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    started = time.perf_counter()
    deadline = started + duration_s
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal counter
            while time.perf_counter() < deadline:
                body = bodies[counter % len(bodies)]
                counter += 1
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except TimeoutError:
                    errors["timeout"] += 1
                    continue
                except aiohttp.ClientConnectorError:
                    errors["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
                except (aiohttp.ClientError, OSError):
                    errors["read"] += 1
                    continue
                latencies.append((time.perf_counter() - sent) * 1e6)
                if not 200 <= status < 300:
                    errors["status"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "tool": "python-aiohttp",
        "duration_us": elapsed * 1e6,
        "requests": len(latencies),
        **errors,
        "p50_us": percentile(latencies, 0.50),
        "p90_us": percentile(latencies, 0.90),
        "p99_us": percentile(latencies, 0.99),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate load and print the ``BENCH_JSON`` line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="endpoint to POST to")
    parser.add_argument("--bodies", type=Path, required=True, help="folder of body-NNNN.bin")
    parser.add_argument("--count", type=int, required=True, help="number of body files")
    parser.add_argument("--content-type", required=True, help="Content-Type with the boundary")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    args = parser.parse_args(argv)
    bodies = read_bodies(args.bodies, args.count)
    summary = asyncio.run(
        generate(args.url, bodies, args.content_type, args.concurrency, args.duration, args.timeout)
    )
    sys.stdout.write(SUMMARY_PREFIX + json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
