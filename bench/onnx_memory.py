"""What ONNX Runtime's per-shape memory plans cost a worker under adaptive batching.

``python -m bench.onnx_memory [--batches 4000] [--max-batch 128] [--model-tag TAG] [--tiny]``

Adaptive batching hands the model batches of every size from 1 to ``max_batch_size``; each size
is a new input shape. With ``enable_mem_pattern`` ONNX Runtime plans and keeps one memory layout
per shape, so a worker grows for as long as new sizes turn up (minutes under load). For each
setting of ``onnx_memory_pattern`` this runs, in a fresh process, the session the service would
build (:func:`onnx_session_options`): one warm-up batch of ``--max-batch`` images, then
``--batches`` batches of random sizes, printing the process RSS after the warm-up and at the
end. The model time per image at batch 1, 8 and 64 is then measured for both settings in one
process, alternating (best of 5 rounds), so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench import serving
from serving.runtime import onnx_session_options

SPEED_BATCHES = (1, 8, 64)


def rss_mib() -> float:
    """This process's resident memory (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def session(onnx_path: Path, pattern: bool) -> Any:
    """The ONNX Runtime session the service builds, with ``onnx_memory_pattern`` = ``pattern``."""
    import onnxruntime as ort

    import service

    settings = service.SETTINGS.model_copy(update={"onnx_memory_pattern": pattern})
    return ort.InferenceSession(
        str(onnx_path),
        sess_options=onnx_session_options(settings, settings.predict.max_batch_size),
        providers=["CPUExecutionProvider"],
    )


def batch_of(model: Any, size: int) -> tuple[str, NDArray[np.float32]]:
    """The input name and ``size`` random images in the model's input shape."""
    spec = model.get_inputs()[0]
    shape = [size, *(int(d) for d in spec.shape[1:])]
    return spec.name, np.random.default_rng(0).random(shape, dtype=np.float32)


def memory(onnx_path: Path, pattern: bool, batches: int, max_batch: int) -> dict[str, Any]:
    """One setting, in this (fresh) process: RSS after the warm-up and after random sizes."""
    model = session(onnx_path, pattern)
    name, data = batch_of(model, max_batch)
    model.run(None, {name: data})
    after_warmup = rss_mib()
    for size in np.random.default_rng(1).integers(1, max_batch + 1, size=batches).tolist():
        model.run(None, {name: data[:size]})
    return {"pattern": pattern, "rss_after_warmup": after_warmup, "rss_end": rss_mib()}


def speed(onnx_path: Path, rounds: int = 5) -> dict[bool, dict[int, float]]:
    """Model ms per image for both settings, alternating in one process (best of ``rounds``)."""
    models = {pattern: session(onnx_path, pattern) for pattern in (True, False)}
    name, data = batch_of(models[True], max(SPEED_BATCHES))
    best = {pattern: dict.fromkeys(SPEED_BATCHES, float("inf")) for pattern in models}
    for size in SPEED_BATCHES:
        calls = max(20, 2000 // size)
        for _ in range(rounds):
            for pattern, model in models.items():
                model.run(None, {name: data[:size]})
                started = time.perf_counter()
                for _ in range(calls):
                    model.run(None, {name: data[:size]})
                per_image = (time.perf_counter() - started) / calls / size * 1e3
                best[pattern][size] = min(best[pattern][size], per_image)
    return best


def onnx_file(options: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """The ONNX file of the served model (or of a random tiny one with ``--tiny``)."""
    import bentoml

    from serving.bentoml_bridge import model_store_at
    from serving.launch import default_store_home

    home, tag, _ = serving.pick_model(
        options.tiny, options.bentoml_home or default_store_home(), options.model_tag, workdir
    )
    with model_store_at(home):
        model = bentoml.models.get(tag)
    return Path(model.path_of("model.onnx")), tag


def render(
    tag: str,
    rows: Sequence[dict[str, Any]],
    speeds: dict[bool, dict[int, float]],
    batches: int,
    max_batch: int,
) -> str:
    lines = [
        f"model {tag}; {batches} batches of random size 1-{max_batch} after one of {max_batch}",
        "| onnx_memory_pattern | RSS after warm-up (MiB) | RSS at the end (MiB) | growth | "
        + " | ".join(f"ms/image at batch {b}" for b in SPEED_BATCHES)
        + " |",
        "|---|--:|--:|--:|" + "--:|" * len(SPEED_BATCHES),
    ]
    for row in rows:
        growth = row["rss_end"] / row["rss_after_warmup"] - 1
        times = " | ".join(f"{speeds[row['pattern']][b]:.3f}" for b in SPEED_BATCHES)
        lines.append(
            f"| {str(row['pattern']).lower()} | {row['rss_after_warmup']:.0f} | "
            f"{row['rss_end']:.0f} | {growth:+.1%} | {times} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4000)
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--model-tag", default=None)
    parser.add_argument(
        "--bentoml-home",
        type=Path,
        default=None,
        help="BentoML store holding the imported model (default: $BENTOML_HOME or ~/bentoml)",
    )
    parser.add_argument("--tiny", action="store_true", help="a random tiny model instead")
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if options.one is not None:  # the child: one setting in a fresh process
        row = memory(options.onnx, options.one == "on", options.batches, options.max_batch)
        print(json.dumps(row))
        return 0
    with tempfile.TemporaryDirectory(prefix="onnx-memory-") as workdir:
        try:
            path, tag = onnx_file(options, Path(workdir))
        except serving.BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        rows = []
        for setting in ("on", "off"):
            command = [sys.executable, "-m", "bench.onnx_memory", "--one", setting]
            command += ["--onnx", str(path), "--batches", str(options.batches)]
            command += ["--max-batch", str(options.max_batch)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        speeds = speed(path)
    print(render(tag, rows, speeds, options.batches, options.max_batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
