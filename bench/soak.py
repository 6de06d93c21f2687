"""Soak test: ``/predict`` and ``/batch_predict`` under steady load for minutes, on loopback.

``make soak`` (or ``python -m bench.soak``) does this, reusing ``bench/serving.py``'s pieces:

1. Picks the model like the serving benchmark (the imported one, or ``--tiny``: a random
   ``simple_cnn`` in a temporary BentoML home) and starts ``bentoml serve`` on a free loopback port.
2. Keeps ``predict_concurrency`` requests in flight on ``/predict`` and
   ``batch_predict_concurrency`` on ``/batch_predict`` (64 together by default), as two load
   generator processes (``wrk`` or ``bench/loadgen.py``) per interval, for ``duration_s``.
3. After ``warmup_s`` of the same load it takes the server's RSS (summed over the ``bentoml
   serve`` process tree) as the baseline; after every ``interval_s`` it records requests, errors,
   p99 per endpoint and the RSS again.
4. Prints a Markdown report (and writes it to ``--output``, default ``docs/soak.md``): one row
   per interval, the error total (client side and the service's ``fashion_serve_errors_total``)
   and the RSS growth. It exits 1 if any request failed or RSS grew by more than
   ``max_rss_growth``.

Defaults come from ``configs/soak.yaml``; flags override them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bench import serving
from common.settings import config_dir, load_settings_file
from serving.launch import free_port

DEFAULT_CONFIG = config_dir() / "soak.yaml"
ENV_PREFIX = "FASHION_SERVE_SOAK__"
DEFAULT_OUTPUT = serving.PROJECT_ROOT / "docs" / "soak.md"
ENDPOINTS = ("predict", "batch_predict")


class SoakSettings(BaseModel):
    """``configs/soak.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    duration_s: int = Field(ge=1, le=24 * 3600)
    interval_s: int = Field(ge=1, le=3600)
    warmup_s: int = Field(ge=0, le=600)
    predict_concurrency: int = Field(ge=0, le=serving.MAX_CONCURRENCY)
    batch_predict_concurrency: int = Field(ge=0, le=serving.MAX_CONCURRENCY)
    batch_images: int = Field(ge=1, le=1024)
    request_timeout_s: float = Field(gt=0)
    max_rss_growth: float = Field(gt=0)
    images: int = Field(ge=1, le=10_000)


def load_soak_settings(path: Path, overrides: dict[str, Any]) -> SoakSettings:
    """The YAML file with ``overrides`` (flags that were given) on top."""
    return load_settings_file(SoakSettings, "soak.yaml", ENV_PREFIX, path=path, flags=overrides)


# --------------------------------------------------------------------------- memory


def process_tree_rss_bytes(root: int) -> int | None:
    """Resident memory of ``root`` and all its descendants, from ``/proc`` (Linux).

    Pages shared between processes count once per process, so this overstates the machine's
    use, but it grows exactly when some process of the server grows.

    Returns:
        Bytes, or ``None`` where ``/proc`` cannot be read or ``root`` is gone.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    parents: dict[int, int] = {}
    try:
        entries = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for name in entries:
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{name}/stat").read_text()
            parents[int(name)] = int(raw[raw.rindex(")") + 2 :].split()[1])
    if root not in parents:
        return None
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        stack.extend(children.get(pid, []))
    return total


# --------------------------------------------------------------------------- one interval


@dataclass(frozen=True)
class EndpointStats:
    """One endpoint over one interval, from the load generator's summary."""

    requests: int
    errors: int
    p99_ms: float

    @classmethod
    def of(cls, summary: dict[str, Any]) -> EndpointStats:
        errors = sum(int(summary.get(kind, 0)) for kind in serving.ERROR_KINDS)
        return cls(int(summary["requests"]), errors, float(summary["p99_us"]) / 1000)


@dataclass(frozen=True)
class Interval:
    """What one interval measured."""

    end_s: float
    stats: dict[str, EndpointStats]
    rss_bytes: int | None


def drive(
    url: str,
    bodies: dict[str, serving.BodySet],
    concurrency: dict[str, int],
    tool: str,
    seconds: int,
    timeout_s: float,
    workdir: Path,
) -> dict[str, EndpointStats]:
    """Load both endpoints at once for ``seconds`` (one client process each)."""
    active = [e for e in ENDPOINTS if concurrency[e] > 0]

    def one(endpoint: str) -> EndpointStats:
        folder = workdir / f"client-{endpoint}"
        folder.mkdir(parents=True, exist_ok=True)
        command = serving.client_command(
            tool, f"{url}/{endpoint}", bodies[endpoint], concurrency[endpoint], seconds, timeout_s
        )
        return EndpointStats.of(
            serving.run_client(command, seconds + timeout_s + 30, folder).summary
        )

    with ThreadPoolExecutor(max_workers=len(active)) as pool:
        return dict(zip(active, pool.map(one, active), strict=True))


# --------------------------------------------------------------------------- report


@dataclass
class SoakReport:
    """The whole run."""

    settings: SoakSettings
    model: str
    client_tool: str
    started: str
    load_before: tuple[float, float, float]
    baseline_rss: int | None
    intervals: list[Interval]
    server_errors: dict[str, float]
    stopped: str = ""

    @property
    def errors(self) -> int:
        """Failed requests seen by the clients (statuses and socket errors)."""
        return sum(s.errors for i in self.intervals for s in i.stats.values())

    @property
    def requests(self) -> int:
        """Requests answered in all intervals."""
        return sum(s.requests for i in self.intervals for s in i.stats.values())

    @property
    def rss_growth(self) -> float | None:
        """Last interval's RSS over the baseline, minus one (``None`` without measurements)."""
        last = self.intervals[-1].rss_bytes if self.intervals else None
        if not self.baseline_rss or last is None:
            return None
        return last / self.baseline_rss - 1

    @property
    def late_rss_growth(self) -> float | None:
        """Last interval's RSS over the first interval's, minus one: growth once warm."""
        first = self.intervals[0].rss_bytes if self.intervals else None
        last = self.intervals[-1].rss_bytes if self.intervals else None
        if not first or last is None:
            return None
        return last / first - 1

    @property
    def passed(self) -> bool:
        """0 errors (client and server side) and RSS growth under the goal."""
        growth = self.rss_growth
        return (
            self.errors == 0
            and not self.server_errors
            and growth is not None
            and growth < self.settings.max_rss_growth
        )


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def render(report: SoakReport, machine: dict[str, str]) -> str:
    """The Markdown page."""
    s = report.settings
    growth = report.rss_growth
    load = ", ".join(f"{x:.2f}" for x in report.load_before)
    lines = [
        "# Soak test",
        "",
        "Written by `make soak` (`bench/soak.py`, settings in `configs/soak.yaml`); rerun it "
        "rather than editing this page.",
        "",
        f"- date: {report.started}; commit: {machine['commit']}",
        f"- machine: {machine['nproc']} CPUs (`nproc`), {machine['cpu']}, Linux "
        f"{machine['kernel']}; load average before (1/5/15 min): {load}",
        f"- model: {report.model}; load generator: {report.client_tool}, client and server on "
        "the same machine (loopback)",
        f"- load: {s.predict_concurrency} requests in flight on `/predict` + "
        f"{s.batch_predict_concurrency} on `/batch_predict` ({s.batch_images} images each), "
        f"closed loop, {s.warmup_s} s warm-up then {s.duration_s} s in {s.interval_s} s intervals",
        "",
        f"**Result: {'PASS' if report.passed else 'FAIL'}**: {report.requests} requests, "
        f"{report.errors} client errors, server error counters "
        + (", ".join(f"`{k}` +{v:.0f}" for k, v in report.server_errors.items()) or "unchanged")
        + f"; server RSS (sum over the process tree) {mib(report.baseline_rss)} MiB after the "
        f"warm-up → {mib(report.intervals[-1].rss_bytes if report.intervals else None)} MiB at "
        "the end ("
        + ("n/a" if growth is None else f"{100 * growth:+.1f}%")
        + f"; goal < {100 * s.max_rss_growth:.0f}%); from the end of the first interval to the "
        "end: "
        + ("n/a" if report.late_rss_growth is None else f"{100 * report.late_rss_growth:+.1f}%")
        + ".",
        "",
        "| end (s) | /predict req | errors | p99 (ms) | /batch_predict req | errors | p99 (ms) "
        "| server RSS (MiB) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    empty = EndpointStats(0, 0, 0.0)
    for interval in report.intervals:
        p = interval.stats.get("predict", empty)
        b = interval.stats.get("batch_predict", empty)
        lines.append(
            f"| {interval.end_s:.0f} | {p.requests} | {p.errors} | {p.p99_ms:.1f} "
            f"| {b.requests} | {b.errors} | {b.p99_ms:.1f} | {mib(interval.rss_bytes)} |"
        )
    if report.stopped:
        lines += ["", f"Server: {report.stopped}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


@dataclass
class SoakOptions:
    """Command-line options (see :func:`parse_args`)."""

    settings: SoakSettings
    tiny: bool
    bentoml_home: Path
    model_tag: str | None
    client: str
    workers: int | None
    output: Path | None
    work_dir: Path | None
    ready_timeout: float = 180.0
    stop_timeout: float = 20.0


def run(options: SoakOptions) -> SoakReport:
    """Start the server, warm up, soak, stop; the report.

    Raises:
        serving.BenchError: no model, a server that does not start or dies, a failing client.
    """
    s = options.settings
    tool = serving.pick_client(options.client)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    load_before = os.getloadavg()
    concurrency = {"predict": s.predict_concurrency, "batch_predict": s.batch_predict_concurrency}
    with contextlib.ExitStack() as stack:
        workdir = serving.workspace(stack, options.work_dir, "soak-")
        home, tag, shown = serving.pick_model(
            options.tiny, options.bentoml_home, options.model_tag, workdir
        )
        env = serving.server_env(home, tag, options.workers)
        images, _ = serving.load_images(s.images)
        scenarios = {
            "predict": serving.Scenario("predict", max(1, s.predict_concurrency)),
            "batch_predict": serving.Scenario(
                "batch_predict", max(1, s.batch_predict_concurrency), s.batch_images
            ),
        }
        bodies = {
            e: serving.write_bodies(workdir / f"bodies-{e}", scenarios[e], images)
            for e in ENDPOINTS
        }
        host = "127.0.0.1"
        server = stack.enter_context(
            serving.serving(
                host, free_port(host), env, workdir / "server.log", options.stop_timeout
            )
        )
        server.wait_ready(options.ready_timeout)
        print(f"server ready ({tag}); warm-up {s.warmup_s} s ...", file=sys.stderr)
        if s.warmup_s:
            drive(server.url, bodies, concurrency, tool, s.warmup_s, s.request_timeout_s, workdir)
        server.check_alive()
        before = serving.scrape_metrics(server.url)
        baseline = process_tree_rss_bytes(server.process.pid)
        intervals: list[Interval] = []
        began = time.perf_counter()
        remaining = s.duration_s
        while remaining > 0:
            seconds = min(s.interval_s, remaining)
            stats = drive(
                server.url, bodies, concurrency, tool, seconds, s.request_timeout_s, workdir
            )
            server.check_alive()
            interval = Interval(
                time.perf_counter() - began, stats, process_tree_rss_bytes(server.process.pid)
            )
            intervals.append(interval)
            remaining -= seconds
            print(render_row(interval), file=sys.stderr)
        after = serving.scrape_metrics(server.url)
        report = SoakReport(
            settings=s,
            model=shown,
            client_tool="`wrk -t1`" if tool == "wrk" else "Python aiohttp (`bench/loadgen.py`)",
            started=started,
            load_before=load_before,
            baseline_rss=baseline,
            intervals=intervals,
            server_errors=serving.metric_delta(before, after, serving.ERRORS_METRIC),
        )
        report.stopped = server.stop(options.stop_timeout)
    return report


def render_row(interval: Interval) -> str:
    """One progress line for stderr."""
    parts = [
        f"/{e}: {st.requests} req, {st.errors} err, p99 {st.p99_ms:.1f} ms"
        for e, st in interval.stats.items()
    ]
    return f"t={interval.end_s:.0f}s " + "; ".join(parts) + f"; RSS {mib(interval.rss_bytes)} MiB"


def parse_args(argv: Sequence[str] | None = None) -> SoakOptions:
    """Parse the command line into :class:`SoakOptions`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="soak settings YAML")
    parser.add_argument("--duration", type=int, dest="duration_s", help="seconds of soak")
    parser.add_argument("--interval", type=int, dest="interval_s", help="seconds per row")
    parser.add_argument("--warmup", type=int, dest="warmup_s", help="seconds before the baseline")
    parser.add_argument("--predict-concurrency", type=int, dest="predict_concurrency")
    parser.add_argument("--batch-concurrency", type=int, dest="batch_predict_concurrency")
    parser.add_argument("--batch-images", type=int, dest="batch_images")
    parser.add_argument("--images", type=int, dest="images", help="distinct images")
    serving.add_model_arguments(parser, "random simple_cnn in a temp store")
    parser.add_argument("--workers", type=int, help="override serving workers")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown file ('-' = none)"
    )
    parser.add_argument("--work-dir", type=Path, help="keep bodies and the server log here")
    args = parser.parse_args(argv)
    keys = [k for k in SoakSettings.model_fields if k in vars(args)]
    try:
        settings = load_soak_settings(args.config, {k: getattr(args, k) for k in keys})
    except ValueError as exc:
        parser.error(str(exc))
    return SoakOptions(
        settings=settings,
        tiny=args.tiny,
        bentoml_home=args.bentoml_home.resolve(),
        model_tag=args.model_tag,
        client=args.client,
        workers=args.workers,
        output=None if str(args.output) == "-" else args.output,
        work_dir=args.work_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak, print the page and write it to ``--output``; 1 if it failed its goals."""
    options = parse_args(argv)
    machine = serving.machine_info()  # the commit the server starts from, not the one at the end
    report = serving.guarded(lambda: run(options))
    if isinstance(report, int):
        return report
    serving.publish(render(report, machine), options.output)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
