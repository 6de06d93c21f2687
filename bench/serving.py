"""Serving benchmark: ``bentoml serve service:Classifier`` under load, as one Markdown table.

``make bench-serve`` (or ``.venv/bin/python -m bench.serving``) does this:

1. Picks the model: by default the one ``make import`` stored (``BENTOML_HOME``, tag from
   ``configs/serving.yaml``); with ``--tiny`` a random ``simple_cnn`` imported into a temporary
   BentoML home, so it runs without a trained model.
2. Starts ``bentoml serve service:Classifier`` on a free loopback port and times the cold start,
   from process spawn to ``/readyz`` = 200.
3. Encodes Fashion-MNIST test images as PNG (synthetic images if the data set is missing) and
   prebuilds the multipart bodies.
4. Per scenario (``/predict`` at concurrency 1, 16, 64; ``/batch_predict`` with 64 images per
   request at concurrency 4): a warm-up, then ``--duration`` seconds of closed-loop load from a
   separate process, Debian's ``wrk`` with ``bench/post_multipart.lua`` or, without it, the
   aiohttp client in ``bench/loadgen.py``. The client's and the server's CPU use are measured,
   so a client that starves the server shows up in the table.
5. Reads the service's ``fashion_serve_batch_size`` histogram from ``/metrics`` before and after
   each scenario (mean images per ONNX Runtime call).
6. Prints the table and writes it, with machine information, to ``docs/benchmarks-serving.md``.

The server is stopped (SIGTERM to its process group, SIGKILL after ``--stop-timeout``) on every
exit path, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx
import numpy as np
from PIL import Image

from serving.launch import ServeError, Server, default_store_home, free_port
from train.config import ModelConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = Path(__file__).resolve().with_name("post_multipart.lua")
DEFAULT_OUTPUT = PROJECT_ROOT / "docs" / "benchmarks-serving.md"
DEFAULT_SCENARIOS = "predict:1,predict:16,predict:64,batch_predict:4:64"
ENDPOINT_FIELDS = {"predict": "image", "batch_predict": "images"}
BATCH_METRIC = "fashion_serve_batch_size"
ERRORS_METRIC = "fashion_serve_errors_total"
SUMMARY_PREFIX = "BENCH_JSON "
MAX_DURATION_S = 300
MAX_WARMUP_S = 60
MAX_CONCURRENCY = 1024
#: Prebuilt bodies per scenario; requests rotate through them.
MAX_BODIES = 256
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")
#: The random model of ``--tiny``: small enough to import in seconds, Fashion-MNIST's classes.
TINY_MODEL = ModelConfig(name="simple_cnn", width=8)


T = TypeVar("T")


class BenchError(RuntimeError):
    """The benchmark cannot run or a part of it failed; the message says what to do."""


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One load level: an endpoint, requests in flight, images per request."""

    endpoint: str
    concurrency: int
    images: int = 1

    @property
    def name(self) -> str:
        """``/predict`` or ``/batch_predict ×64`` (the images per request when more than one)."""
        return f"/{self.endpoint}" + (f" ×{self.images}" if self.images > 1 else "")


def parse_scenarios(text: str, batch_images: int = 64) -> list[Scenario]:
    """Parse ``endpoint:concurrency[:images],...``, e.g. ``predict:16,batch_predict:4:64``.

    Args:
        text: Comma-separated scenarios.
        batch_images: Images per ``/batch_predict`` request when a scenario does not say.

    Raises:
        BenchError: an unknown endpoint or a value out of range.
    """
    scenarios = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pieces = item.split(":")
        endpoint = pieces[0].lstrip("/")
        if endpoint not in ENDPOINT_FIELDS or len(pieces) not in (2, 3):
            raise BenchError(
                f"bad scenario {item!r}: use predict:<concurrency> or "
                "batch_predict:<concurrency>[:<images per request>]"
            )
        try:
            concurrency = int(pieces[1])
            default_images = 1 if endpoint == "predict" else batch_images
            images = int(pieces[2]) if len(pieces) == 3 else default_images
        except ValueError as exc:
            raise BenchError(f"bad scenario {item!r}: {exc}") from exc
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise BenchError(f"bad scenario {item!r}: concurrency must be 1..{MAX_CONCURRENCY}")
        if images < 1 or (endpoint == "predict" and images != 1):
            raise BenchError(f"bad scenario {item!r}: /predict takes 1 image, batches 1 or more")
        scenarios.append(Scenario(endpoint, concurrency, images))
    if not scenarios:
        raise BenchError("no scenarios given")
    return scenarios


# --------------------------------------------------------------------------- images and bodies


def png_bytes(pixels: np.ndarray[Any, np.dtype[np.uint8]]) -> bytes:
    """Encode ``uint8 [H, W]`` or ``[H, W, C]`` pixels as PNG."""
    import io

    array = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def load_images(count: int, seed: int = 0) -> tuple[list[bytes], str]:
    """``count`` Fashion-MNIST test images as PNG bytes, or seeded noise images without the data.

    The data set comes from ``train.config.load_settings()``'s ``data`` section, never downloaded.

    Returns:
        The PNG bytes and a description of where they came from.
    """
    try:
        from train.config import ConfigError, load_settings
        from train.data import DataError, load_fashion_mnist

        data_cfg = load_settings().data.model_copy(update={"allow_download": False})
        _, test, folder = load_fashion_mnist(data_cfg)
        images = test.images[:count]
        return [png_bytes(image) for image in images], (
            f"Fashion-MNIST test set ({len(images)} images from {folder})"
        )
    except (ConfigError, DataError, OSError, ValueError) as exc:
        print(f"note: Fashion-MNIST unavailable ({exc}); using synthetic images", file=sys.stderr)
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    return [png_bytes(image) for image in noise], f"synthetic 28x28 noise PNGs ({count})"


def multipart_body(field_name: str, files: Sequence[bytes], boundary: str) -> bytes:
    """A ``multipart/form-data`` body with each of ``files`` as a PNG upload in ``field_name``."""
    parts = []
    for index, data in enumerate(files):
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field_name}"; filename="img{index}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


@dataclass(frozen=True)
class BodySet:
    """Prebuilt request bodies on disk: ``folder/body-0000.bin``..."""

    folder: Path
    count: int
    content_type: str
    mean_bytes: float


def write_bodies(folder: Path, scenario: Scenario, images: Sequence[bytes]) -> BodySet:
    """Write up to :data:`MAX_BODIES` bodies for ``scenario``, cycling through ``images``."""
    folder.mkdir(parents=True, exist_ok=True)
    boundary = f"bench{uuid.uuid4().hex}"
    count = max(1, min(MAX_BODIES, len(images) // scenario.images))
    sizes = []
    for index in range(count):
        start = index * scenario.images
        files = [images[(start + k) % len(images)] for k in range(scenario.images)]
        body = multipart_body(ENDPOINT_FIELDS[scenario.endpoint], files, boundary)
        (folder / f"body-{index:04d}.bin").write_bytes(body)
        sizes.append(len(body))
    return BodySet(
        folder, count, f"multipart/form-data; boundary={boundary}", sum(sizes) / len(sizes)
    )


# --------------------------------------------------------------------------- model


def make_tiny_model(home: Path, module_path: Path | None = None) -> str:
    """Import the benchmarks' random model (:data:`TINY_MODEL`, Fashion-MNIST's classes) into the
    store at ``home`` with :func:`train.tiny.tiny_model_in`; its tag.

    With ``module_path``, the torch module is also ``torch.save``'d there (for the torch backend
    and the peer).
    """
    from train.data import FASHION_MNIST_CLASSES
    from train.tiny import tiny_model_in

    return tiny_model_in(home, TINY_MODEL, list(FASHION_MNIST_CLASSES), module_path)


def pick_model(
    tiny: bool,
    home: Path,
    model_tag: str | None,
    workdir: Path,
    module_path: Path | None = None,
) -> tuple[Path, str, str]:
    """The store and tag to serve: ``--tiny``'s random model in ``workdir``, or the stored one.

    Returns:
        The BentoML store, the model tag and how the report names the model.

    Raises:
        BenchError: the model is not in ``home``.
    """
    if tiny:
        home = workdir / "bentoml"
        print(f"creating a tiny random {TINY_MODEL.name} model ...", file=sys.stderr)
        tag = make_tiny_model(home, module_path)
        return home, tag, f"`{tag}` (--tiny: random {TINY_MODEL.name}, width {TINY_MODEL.width})"
    tag = stored_model(home, model_tag or configured_model_tag(home))
    return home, tag, f"`{tag}` from {home}"


def stored_model(home: Path, tag: str) -> str:
    """The full tag of ``tag`` in the store at ``home``.

    Raises:
        BenchError: the model is not there (with the command that puts it there).
    """
    import bentoml
    from bentoml.exceptions import NotFound

    from serving.bentoml_bridge import model_store_at

    try:
        with model_store_at(home):
            model = bentoml.models.get(tag)
    except (NotFound, OSError) as exc:
        raise BenchError(
            f"model {tag} is not in the BentoML store at {home} ({exc}); run `make import` "
            "first (or pass --tiny for a random model)"
        ) from exc
    return str(model.tag)


# --------------------------------------------------------------------------- processes and CPU


def process_tree_cpu_s(root: int) -> float | None:
    """User + system CPU seconds of ``root`` and all its descendants, from ``/proc`` (Linux).

    Returns:
        The seconds, or ``None`` where ``/proc`` cannot be read.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    try:
        entries = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for name in entries:
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # After "pid (comm) ": state ppid ... utime is field 14, stime 15 (1-based, whole line).
        stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    if root not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += stats[pid][1]
        stack.extend(children.get(pid, []))
    return total


@dataclass(frozen=True)
class ClientRun:
    """What a load-generator process printed and what it cost."""

    summary: dict[str, Any]
    cpu_s: float
    wall_s: float


def run_client(command: Sequence[str], limit_s: float, workdir: Path) -> ClientRun:
    """Run a load generator to completion and measure its own CPU time (``wait4`` rusage).

    Raises:
        BenchError: it failed, ran past ``limit_s`` or printed no ``BENCH_JSON`` line.
    """
    out_path = workdir / "client.out"
    started = time.perf_counter()
    with out_path.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = started + limit_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"load generator ran past {limit_s:.0f}s: {' '.join(command)}")
            time.sleep(0.05)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(process.pid, 0)
        process.returncode = -signal.SIGKILL
        raise
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    output = out_path.read_text(errors="replace")
    lines = [line for line in output.splitlines() if line.startswith(SUMMARY_PREFIX)]
    if process.returncode != 0 or not lines:
        raise BenchError(
            f"load generator failed (exit {process.returncode}): {' '.join(command)}\n{output}"
        )
    summary: dict[str, Any] = json.loads(lines[-1][len(SUMMARY_PREFIX) :])
    return ClientRun(summary, usage.ru_utime + usage.ru_stime, wall)


def client_command(
    tool: str, url: str, bodies: BodySet, concurrency: int, duration_s: int, timeout_s: float
) -> list[str]:
    """The command line of ``wrk`` (one thread) or of the Python fallback client."""
    if tool == "wrk":
        return [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{duration_s}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "--latency",
            "-s",
            str(LUA_SCRIPT),
            url,
            "--",
            str(bodies.folder),
            str(bodies.count),
            bodies.content_type,
        ]
    return [
        sys.executable,
        "-m",
        "bench.loadgen",
        f"--url={url}",
        f"--bodies={bodies.folder}",
        f"--count={bodies.count}",
        f"--content-type={bodies.content_type}",
        f"--concurrency={concurrency}",
        f"--duration={duration_s}",
        f"--timeout={timeout_s}",
    ]


def pick_client(choice: str) -> str:
    """``wrk`` if asked for or found on ``PATH`` (``auto``), else ``python``.

    Raises:
        BenchError: ``wrk`` was asked for and is not installed.
    """
    found = shutil.which("wrk") is not None
    if choice == "wrk" and not found:
        raise BenchError("--client wrk: wrk is not installed (apt-get install wrk)")
    if choice == "auto" and not found:
        print(
            "note: wrk is not installed (apt-get install wrk, or `make setup-dev`); falling back to "
            "the Python aiohttp client, which needs more CPU per request: watch the client CPU "
            "column",
            file=sys.stderr,
        )
    return "wrk" if choice != "python" and found else "python"


# --------------------------------------------------------------------------- server


@contextlib.contextmanager
def serving(
    host: str,
    port: int,
    env: dict[str, str],
    log: Path,
    stop_s: float,
    command: Sequence[str] | None = None,
) -> Iterator[Server]:
    """Start the server, yield it, and always stop it (exceptions and Ctrl-C included).

    A server that exits or does not get ready raises :class:`BenchError` with its log tail.
    """
    server = Server(host, port, env, log, command)
    try:
        yield server
    except ServeError as exc:
        raise BenchError(str(exc)) from exc
    finally:
        print(f"server: {server.stop(stop_s)}", file=sys.stderr)


# --------------------------------------------------------------------------- metrics


def scrape_metrics(url: str) -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}": value}`` (comments and bad lines skipped)."""
    response = httpx.get(f"{url}/metrics", timeout=10.0)
    if response.status_code != 200:  # a server without metrics (the FastAPI peer)
        return {}
    text = response.text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            samples[key] = samples.get(key, 0.0) + float(value)
    return samples


def metric_sum(samples: dict[str, float], name: str) -> float:
    """Sum of every sample of ``name`` over all label sets (and worker processes)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def metric_delta(
    before: dict[str, float], after: dict[str, float], prefix: str
) -> dict[str, float]:
    """Samples of ``prefix`` (with labels) that grew between two scrapes, by how much."""
    return {
        key: value - before.get(key, 0.0)
        for key, value in after.items()
        if key.startswith(prefix) and value - before.get(key, 0.0) > 0
    }


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One scenario's results."""

    scenario: Scenario
    tool: str
    duration_s: float
    requests: int
    ok: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: dict[str, int]
    client_cpu_pct: float
    server_cpu_pct: float | None
    mean_batch: float | None
    load1: float
    server_errors: dict[str, float] = field(default_factory=dict)
    #: Req/s of each round, for a row merged from several (``bench/suite.py``); else empty.
    round_rates: tuple[float, ...] = ()

    @property
    def requests_per_s(self) -> float:
        """Successful (2xx) responses per second."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        """Images classified per second (successful requests × images per request)."""
        return self.requests_per_s * self.scenario.images

    @property
    def error_count(self) -> int:
        """Failed requests: bad statuses and socket errors together."""
        return sum(self.errors.values())

    def cells(self) -> str:
        """The row in :func:`render_table`'s columns, ``| scenario | ... | load1 |``."""
        server_cpu = "n/a" if self.server_cpu_pct is None else f"{self.server_cpu_pct:.0f}%"
        batch = "n/a" if self.mean_batch is None else f"{self.mean_batch:.1f}"
        return (
            f"| {self.scenario.name} | {self.scenario.concurrency} | {self.requests_per_s:.1f} "
            f"| {self.images_per_s:.0f} | {self.p50_ms:.1f} | {self.p90_ms:.1f} "
            f"| {self.p99_ms:.1f} | {self.error_text()} | {batch} | {self.client_cpu_pct:.0f}% "
            f"| {server_cpu} | {self.load1:.2f} |"
        )

    def error_text(self) -> str:
        """``0`` or the total with its breakdown, e.g. ``12 (status 10, timeout 2)``."""
        if not self.error_count:
            return "0"
        parts = ", ".join(f"{kind} {n}" for kind, n in self.errors.items() if n)
        return f"**{self.error_count}** ({parts})"


def make_row(
    scenario: Scenario,
    run: ClientRun,
    server_cpu_s: float | None,
    before: dict[str, float],
    after: dict[str, float],
) -> Row:
    """Combine the client summary, CPU use and the ``/metrics`` deltas into a :class:`Row`."""
    s = run.summary
    errors = {kind: int(s.get(kind, 0)) for kind in ERROR_KINDS}
    duration = float(s["duration_us"]) / 1e6
    requests = int(s["requests"])
    calls = metric_sum(after, f"{BATCH_METRIC}_count") - metric_sum(before, f"{BATCH_METRIC}_count")
    images = metric_sum(after, f"{BATCH_METRIC}_sum") - metric_sum(before, f"{BATCH_METRIC}_sum")
    return Row(
        scenario=scenario,
        tool=str(s.get("tool", "?")),
        duration_s=duration,
        requests=requests,
        ok=max(0, requests - errors["status"]),
        p50_ms=float(s["p50_us"]) / 1000,
        p90_ms=float(s["p90_us"]) / 1000,
        p99_ms=float(s["p99_us"]) / 1000,
        errors=errors,
        client_cpu_pct=100 * run.cpu_s / run.wall_s,
        server_cpu_pct=None if server_cpu_s is None else 100 * server_cpu_s / run.wall_s,
        mean_batch=images / calls if calls > 0 else None,
        load1=os.getloadavg()[0],
        server_errors=metric_delta(before, after, ERRORS_METRIC),
    )


@dataclass
class Report:
    """Everything the Markdown page shows."""

    rows: list[Row]
    cold_start_s: float
    model: str
    images_source: str
    client_tool: str
    settings: dict[str, Any]
    load_before: tuple[float, float, float]
    started: str
    duration_s: int
    warmup_s: int
    stopped: str = ""


def render_table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table."""
    head = (
        "| scenario | conc. | req/s | images/s | p50 ms | p90 ms | p99 ms | errors "
        "| mean batch | client CPU | server CPU | load1 |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    return head + "\n".join(r.cells() for r in rows) + "\n"


def _git(args: list[str], timeout: float) -> str:
    """``git args`` in the project: its output, stripped (raises if git fails)."""
    return subprocess.run(
        ["git", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout.strip()


def machine_info() -> dict[str, str]:
    """CPU count (as ``nproc``), CPU model, kernel, date and git commit (``-dirty`` if changed)."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = _git(["rev-parse", "--short", "HEAD"], timeout=10)
        changed = _git(
            ["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], timeout=30
        )
        commit = head + ("-dirty" if changed else "")
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "commit": commit,
    }


def render_markdown(report: Report, machine: dict[str, str]) -> str:
    """The whole page: how it was measured, the machine, the table and any errors."""
    load = ", ".join(f"{x:.2f}" for x in report.load_before)
    settings = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    lines = [
        "# Serving benchmark",
        "",
        "Written by `make bench-serve` (`bench/serving.py`); rerun it rather than editing this page.",
        "",
        f"- date: {report.started}",
        f"- commit: {machine['commit']}",
        f"- machine: {machine['nproc']} CPUs (`nproc`), {machine['cpu']}, Linux "
        f"{machine['kernel']}, Python {machine['python']}",
        f"- load average before the server started (1/5/15 min): {load}",
        f"- model: {report.model}; serving settings: {settings}",
        f"- images: {report.images_source}",
        f"- load generator: {report.client_tool}; closed loop, {report.warmup_s} s warm-up "
        f"then {report.duration_s} s per scenario, client and server on the same machine",
        f"- cold start (spawn of `bentoml serve` to `/readyz` = 200): {report.cold_start_s:.1f} s",
        "",
        render_table(report.rows),
        "req/s and images/s count 2xx answers only; latency covers every answered request. "
        "errors = bad statuses (wrk: status >= 400; Python client: non-2xx) + socket errors "
        "(connect, read, write, timeout). mean batch = images per ONNX Runtime call "
        f"(`{BATCH_METRIC}` on `/metrics`). CPU columns are % of one core over the run "
        f"({machine['nproc']} cores = {100 * int(machine['nproc'])}%); load1 is the 1-minute "
        "load average at the end of the scenario (our own server and client included).",
    ]
    failing = [r for r in report.rows if r.error_count or r.server_errors]
    if failing:
        lines += ["", "## Errors", ""]
        for r in failing:
            server = ", ".join(f"`{k}` +{v:.0f}" for k, v in r.server_errors.items()) or "none"
            lines.append(
                f"- {r.scenario.name} c={r.scenario.concurrency}: client {r.error_text()}; "
                f"server counters: {server}"
            )
    if report.stopped:
        lines += ["", f"Server: {report.stopped}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


@dataclass
class Options:
    """Command-line options (see :func:`parse_args`)."""

    tiny: bool
    bentoml_home: Path
    model_tag: str | None
    scenarios: list[Scenario]
    duration: int
    warmup: int
    images: int
    client: str
    host: str
    port: int
    workers: int | None
    timeout: float
    ready_timeout: float
    stop_timeout: float
    output: Path | None
    work_dir: Path | None


def server_env(home: Path, tag: str, workers: int | None) -> dict[str, str]:
    """The server's environment: our own plus the store, the model tag and optional workers."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "FASHION_SERVE_SERVING__MODEL_TAG": tag,
    }
    if workers is not None:
        env["FASHION_SERVE_SERVING__WORKERS"] = str(workers)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def configured_model_tag(home: Path | None = None) -> str:
    """The model the service would serve (:func:`serving.lineage.served_tag`) from ``home``.

    ``home`` is a BentoML home (default: BentoML's own store, ``BENTOML_HOME``).
    """
    from contextlib import nullcontext

    from serving.bentoml_bridge import model_store_at
    from serving.lineage import served_tag
    from serving.settings import load_serving_settings

    with nullcontext() if home is None else model_store_at(home):
        return served_tag(load_serving_settings())


def effective_settings(env: dict[str, str]) -> dict[str, Any]:
    """The serving settings the server will use (``configs/serving.yaml`` + overrides)."""
    from serving.settings import load_serving_settings

    s = load_serving_settings(environ=env)
    return {
        "workers": s.workers,
        "threads": s.threads,
        "onnx_intra_op_threads": s.onnx_intra_op_threads,
        "predict.max_batch_size": s.predict.max_batch_size,
        "batch_predict.max_batch_size": s.batch_predict.max_batch_size,
        "max_concurrency": s.max_concurrency,
        "log_level": s.logging.level,
    }


def run_scenario(
    server: Server,
    scenario: Scenario,
    bodies: BodySet,
    tool: str,
    options: Options,
    workdir: Path,
) -> Row:
    """Warm up, then measure one scenario."""
    url = f"{server.url}/{scenario.endpoint}"
    slack = options.timeout + 30
    if options.warmup > 0:
        warm = client_command(
            tool, url, bodies, scenario.concurrency, options.warmup, options.timeout
        )
        run_client(warm, options.warmup + slack, workdir)
    server.check_alive()
    before = scrape_metrics(server.url)
    cpu_before = process_tree_cpu_s(server.process.pid)
    command = client_command(
        tool, url, bodies, scenario.concurrency, options.duration, options.timeout
    )
    run = run_client(command, options.duration + slack, workdir)
    cpu_after = process_tree_cpu_s(server.process.pid)
    server.check_alive()
    after = scrape_metrics(server.url)
    server_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return make_row(scenario, run, server_cpu, before, after)


def workspace(stack: contextlib.ExitStack, work_dir: Path | None, prefix: str) -> Path:
    """``work_dir`` (created if missing), or a temporary folder that ``stack`` removes."""
    if work_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def client_description(tool: str) -> str:
    """The load generator ``tool`` as the reports name it."""
    if tool == "wrk":
        return "`wrk -t1` + `bench/post_multipart.lua`"
    return "Python aiohttp (`bench/loadgen.py`; wrk not installed)"


def scenario_bodies(
    scenarios: Sequence[Scenario], images: Sequence[bytes], folder: Path
) -> dict[tuple[str, int], BodySet]:
    """One body set per (endpoint, images per request), shared by its concurrency levels."""
    bodies: dict[tuple[str, int], BodySet] = {}
    for s in scenarios:
        if (s.endpoint, s.images) not in bodies:
            sub = folder / f"bodies-{s.endpoint}-{s.images}"
            bodies[s.endpoint, s.images] = write_bodies(sub, s, images)
    return bodies


def run_scenarios(
    server: Server,
    scenarios: Sequence[Scenario],
    bodies: dict[tuple[str, int], BodySet],
    tool: str,
    options: Options,
    workdir: Path,
    label: str = "",
) -> list[Row]:
    """:func:`run_scenario` for each scenario in turn, with progress lines (``label`` first)."""
    rows = []
    for scenario in scenarios:
        print(
            f"{label}{scenario.name} concurrency {scenario.concurrency}: {options.warmup} s "
            f"warm-up + {options.duration} s ({tool}) ...",
            file=sys.stderr,
        )
        body = bodies[scenario.endpoint, scenario.images]
        rows.append(run_scenario(server, scenario, body, tool, options, workdir))
        print(label + render_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    return rows


def run(options: Options) -> Report:
    """Run the whole benchmark (model, server, scenarios) and return the report.

    Raises:
        BenchError: no model, a server that does not start or dies, or a failing load generator.
    """
    tool = pick_client(options.client)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        workdir = workspace(stack, options.work_dir, "bench-")
        home, tag, shown = pick_model(
            options.tiny, options.bentoml_home, options.model_tag, workdir
        )
        env = server_env(home, tag, options.workers)
        settings = effective_settings(env)
        images, source = load_images(options.images)
        bodies = scenario_bodies(options.scenarios, images, workdir)
        port = options.port or free_port(options.host)
        print(f"starting bentoml serve ({tag}) on {options.host}:{port} ...", file=sys.stderr)
        server = stack.enter_context(
            serving(options.host, port, env, workdir / "server.log", options.stop_timeout)
        )
        cold = server.wait_ready(options.ready_timeout)
        print(f"ready after {cold:.1f} s", file=sys.stderr)
        rows = run_scenarios(server, options.scenarios, bodies, tool, options, workdir)
        report = Report(
            rows=rows,
            cold_start_s=cold,
            model=shown,
            images_source=source,
            client_tool=client_description(tool),
            settings=settings,
            load_before=load_before,
            started=started,
            duration_s=options.duration,
            warmup_s=options.warmup,
        )
        report.stopped = server.stop(options.stop_timeout)
    return report


def loopback(text: str) -> str:
    """``text`` if it is a loopback address (argparse type)."""
    if not ipaddress.ip_address(text).is_loopback:
        raise argparse.ArgumentTypeError(f"{text} is not a loopback address")
    return text


def _bounded(low: int, high: int) -> Any:
    def convert(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {value}")
        return value

    return convert


def add_model_arguments(parser: argparse.ArgumentParser, tiny_help: str) -> None:
    """The flags every loopback benchmark takes: which model, and which load generator."""
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument(
        "--bentoml-home",
        type=Path,
        default=default_store_home(),
        help="BentoML store holding the imported model (default: $BENTOML_HOME or ~/bentoml)",
    )
    parser.add_argument("--model-tag", help="default: model_tag in configs/serving.yaml")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario-run flags of this benchmark and ``bench/suite.py`` (see :func:`load_options`)."""
    parser.add_argument(
        "--duration", type=_bounded(1, MAX_DURATION_S), default=15, help="seconds per scenario"
    )
    parser.add_argument(
        "--warmup", type=_bounded(0, MAX_WARMUP_S), default=2, help="warm-up seconds per scenario"
    )
    parser.add_argument("--images", type=_bounded(1, 10_000), default=512, help="distinct images")
    parser.add_argument("--host", type=loopback, default="127.0.0.1", help="loopback address")
    parser.add_argument(
        "--workers", type=_bounded(1, 64), default=None, help="override serving workers"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="cold start limit (s)")
    parser.add_argument("--stop-timeout", type=float, default=20.0, help="SIGTERM → SIGKILL (s)")


def load_options(
    args: argparse.Namespace, scenarios: list[Scenario], port: int, output: Path | None
) -> Options:
    """:class:`Options` from flags parsed with :func:`add_model_arguments`,
    :func:`add_load_arguments` and ``--work-dir`` (each flag sets the field of its name)."""
    named = {f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)}
    given = {"scenarios": scenarios, "port": port, "output": output}
    return Options(**{**named, **given, "bentoml_home": args.bentoml_home.resolve()})


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line into :class:`Options` (``--help`` lists the flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description="Benchmark `bentoml serve service:Classifier` on loopback.",
    )
    add_model_arguments(parser, "random simple_cnn in a temp store")
    add_load_arguments(parser)
    parser.add_argument(
        "--scenarios",
        default=DEFAULT_SCENARIOS,
        help="endpoint:concurrency[:images],... (default: %(default)s)",
    )
    parser.add_argument("--port", type=_bounded(0, 65535), default=0, help="0 = a free port")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="Markdown file to write (default: docs/benchmarks-serving.md); '-' = none",
    )
    parser.add_argument("--work-dir", type=Path, help="keep bodies and server log here")
    args = parser.parse_args(argv)
    try:
        scenarios = parse_scenarios(args.scenarios)
    except BenchError as exc:
        parser.error(str(exc))
    output = None if str(args.output) == "-" else args.output
    return load_options(args, scenarios, args.port, output)


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so the servers are stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def guarded(work: Callable[[], T], stopped: str = "server stopped") -> T | int:
    """``work()``, or the exit code after a :class:`BenchError` (1) or an interrupt (130).

    SIGTERM is turned into an interrupt first, so the servers are stopped on every exit path.
    """
    signal.signal(signal.SIGTERM, terminate)
    try:
        return work()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; {stopped}", file=sys.stderr)
        return 130


def publish(page: str, output: Path | None) -> None:
    """Print the Markdown ``page`` and write it to ``output`` (``None``: nowhere)."""
    print(page)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(page)
        print(f"written to {output}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the page and write it to ``--output``; 1 on failure."""
    options = parse_args(argv)
    machine = machine_info()  # the commit the servers start from, not the one at the end
    report = guarded(lambda: run(options))
    if isinstance(report, int):
        return report
    publish(render_markdown(report, machine), options.output)
    failing = [r.scenario.name for r in report.rows if r.error_count]
    if failing:
        print(
            f"error: requests failed in {len(failing)} scenario(s); see the table", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
