"""``make bench``: every performance comparison in one run → ``docs/benchmarks.md`` + a plot.

``python -m bench.suite`` (what ``make bench`` runs) does, on the same model and the same real
Fashion-MNIST test images (PNG uploads):

1. **Raw model throughput, no HTTP**: ONNX Runtime and eager torch at batch 64, with one thread
   and with one thread per core (the machine's limit).
2. **Setups**, each a fresh server on loopback, loaded by ``wrk`` (or the aiohttp fallback) from
   its own process with its CPU share measured (``bench/serving.py`` does the load and the
   measuring):

   - ``service``: ``bentoml serve service:Classifier`` as configured (ONNX Runtime, adaptive
     batching); its cold start (spawn to ``/readyz``) is the one the goals refer to;
   - ``batching_off``: the same with ``predict.max_batch_size: 1``;
   - ``torch``: the same service with ``backend: torch`` (eager torch, same weights);
   - ``peer``: ``bench/peer_fastapi.py``, FastAPI + uvicorn + eager torch, no batching, loading
     the registered champion from MLflow, as many workers as the service.
3. **Training speed** (``bench/training.py``), unless ``--skip-training``.
4. Writes ``docs/benchmarks.md`` (tables, goals, machine, date, commit), ``docs/benchmarks.png``
   and the raw numbers in ``docs/benchmarks.json``.

The model: the champion that ``make import`` put in the BentoML store (the torch module for the
``torch`` setup is the same registered version, loaded from MLflow and checked against the
store's lineage label); ``--tiny`` uses a random ``simple_cnn`` instead, no registry needed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import serving
from bench.serving import BenchError, Row, Scenario
from serving.launch import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DOCS = PROJECT_ROOT / "docs"
RAW_BATCH = 64

#: Setup name → (title, default scenarios, serving-setting overrides).
SETUPS: dict[str, tuple[str, str, dict[str, str]]] = {
    "service": (
        "BentoML service (ONNX Runtime, adaptive batching)",
        "predict:1,predict:16,predict:64,batch_predict:4:64",
        {},
    ),
    "batching_off": (
        "same, batching off (predict.max_batch_size 1)",
        "predict:16,predict:64",
        {"PREDICT__MAX_BATCH_SIZE": "1"},
    ),
    "torch": (
        "same service, eager torch backend",
        "predict:1,predict:64,batch_predict:4:64",
        {"BACKEND": "torch"},
    ),
    "peer": (
        "peer: FastAPI + uvicorn + eager torch, no batching",
        "predict:1,predict:16,predict:64,batch_predict:4:64",
        {},
    ),
}

#: The goals of issue 5 (and issue 3's latency and cold start), checked on every run.
GOAL_PEER_RATIO = 3.0
GOAL_P99_MS = 100.0
GOAL_BATCH_OF_RAW = 0.5
GOAL_BATCHING_RATIO = 2.0
GOAL_P50_MS = 5.0
GOAL_COLD_START_S = 5.0


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelFiles:
    """One model in every form the setups need."""

    home: Path
    tag: str
    onnx_path: Path
    module_path: Path
    meta_path: Path
    description: str
    peer_env: dict[str, str]


def _bento_model(home: Path, tag: str) -> Any:
    import bentoml

    from serving.bentoml_bridge import model_store_at

    with model_store_at(home):
        return bentoml.models.get(tag)


def prepare_model(options: Options, workdir: Path) -> ModelFiles:
    """The BentoML model plus its torch module (``torch.save``'d) and metadata for the peer.

    Raises:
        BenchError: no imported model, no registry, or the registry's champion is another
            version than the imported one.
    """
    module_path = workdir / "module.pt"
    home, tag, description = serving.pick_model(
        options.load.tiny, options.load.bentoml_home, options.load.model_tag, workdir, module_path
    )
    if options.load.tiny:
        peer_env = {"FASHION_PEER_TORCH_FILE": str(module_path)}
    else:
        labels = _bento_model(home, tag).info.labels
        uri, version = champion_module(module_path)
        if labels.get("registered_version") != version:
            raise BenchError(
                f"the BentoML store holds {tag} (registered version "
                f"{labels.get('registered_version')}), but {uri} is version {version}: run "
                "`make import` so the service and the torch setups use the same model"
            )
        description = f"{description} = {uri} (version {version})"
        peer_env = {"FASHION_PEER_MODEL_URI": uri}
    stored = _bento_model(home, tag)
    meta_path = workdir / "meta.json"
    metadata = stored.info.metadata
    meta_path.write_text(
        json.dumps({"class_names": metadata["class_names"], "preprocess": metadata["preprocess"]})
    )
    peer_env["FASHION_PEER_META"] = str(meta_path)
    return ModelFiles(
        home,
        tag,
        Path(stored.path_of("model.onnx")),
        module_path,
        meta_path,
        description,
        peer_env,
    )


def champion_module(module_path: Path) -> tuple[str, str]:
    """Load the torch module of the registry's champion and ``torch.save`` it.

    Returns:
        The model URI and its registered version.
    """
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from train.config import load_settings
    from train.tracking import TrackingError, connect, load_torch_model

    settings = load_settings()
    connect(settings.tracking)
    name = settings.tracking.registered_model_name
    alias = settings.registry.champion_alias
    uri = f"models:/{name}@{alias}"
    try:
        version = str(MlflowClient().get_model_version_by_alias(name, alias).version)
        model = load_torch_model(uri)
    except MlflowException as exc:
        raise BenchError(f"cannot load {uri} from MLflow ({exc.message}); run `make run`") from exc
    except TrackingError as exc:
        raise BenchError(f"cannot load {uri} from MLflow ({exc}); run `make run`") from exc
    torch.save(model.eval(), module_path)
    # The peer process reads the same store through this variable.
    os.environ["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    return uri, version


# --------------------------------------------------------------------------- raw throughput


@dataclass(frozen=True)
class RawResult:
    """Model-only throughput at one batch size and thread count."""

    runtime: str
    threads: int
    batch: int
    images_per_s: float
    ms_per_batch: float


def _time_calls(call: Any, seconds: float) -> tuple[int, float]:
    for _ in range(3):
        call()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
        call()
        calls += 1
    return calls, elapsed


def raw_throughput(
    files: ModelFiles, pixels: np.ndarray[Any, Any], thread_counts: Sequence[int], seconds: float
) -> list[RawResult]:
    """ONNX Runtime and eager torch on ``pixels`` (one batch), no HTTP, per thread count."""
    import onnxruntime as ort
    import torch

    module = torch.load(files.module_path, map_location="cpu", weights_only=False).eval()
    results = []
    for threads in thread_counts:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(files.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        torch.set_num_threads(threads)
        # Batch 1 too: how much a batch saves per image is what adaptive batching can win.
        for batch in (1, len(pixels)):
            inputs = pixels[:batch]
            tensor = torch.from_numpy(inputs)

            def eager(tensor: Any = tensor) -> None:
                with torch.inference_mode():
                    module(tensor)

            runs = (
                ("ONNX Runtime", functools.partial(session.run, None, {"input": inputs})),
                ("eager torch", eager),
            )
            for runtime, call in runs:
                calls, elapsed = _time_calls(call, seconds)
                results.append(
                    RawResult(
                        runtime, threads, batch, calls * batch / elapsed, 1000 * elapsed / calls
                    )
                )
    return results


def real_pixels(count: int) -> tuple[np.ndarray[Any, Any], list[bytes], str]:
    """``count`` test images as model input, and as PNG bytes for the uploads."""
    import io

    from PIL import Image

    from common.preprocess import PreprocessSpec, prepare_image, to_model_input

    images, source = serving.load_images(max(count, RAW_BATCH))
    spec = PreprocessSpec()
    arrays = [prepare_image(Image.open(io.BytesIO(data)), spec) for data in images[:RAW_BATCH]]
    return to_model_input(arrays), images, source


# --------------------------------------------------------------------------- setups


@dataclass
class SetupResult:
    """One server configuration and its rows."""

    name: str
    title: str
    cold_start_s: float
    rows: list[Row]
    settings: dict[str, Any] = field(default_factory=dict)
    stopped: str = ""


def setup_env(name: str, files: ModelFiles, options: Options) -> dict[str, str]:
    """The server environment of setup ``name``."""
    env = serving.server_env(files.home, files.tag, options.load.workers)
    for key, value in SETUPS[name][2].items():
        env[serving_key(key)] = value
    if name == "torch":
        env[serving_key("TORCH_MODEL_PATH")] = str(files.module_path)
    if name == "peer":
        settings = serving.effective_settings(env)
        env.update(files.peer_env)
        env["FASHION_PEER_THREADS"] = str(settings["onnx_intra_op_threads"])
    return env


def serving_key(key: str) -> str:
    """``FASHION_SERVE_SERVING__<key>``."""
    return f"FASHION_SERVE_SERVING__{key}"


def peer_command(workers: int) -> list[str]:
    """``bench/peer_serve.py``: ``uvicorn bench.peer_fastapi:app`` with ``workers`` processes."""
    return [sys.executable, "-m", "bench.peer_serve", f"--workers={workers}"]


def run_setup(
    name: str,
    scenarios: Sequence[Scenario],
    files: ModelFiles,
    images: Sequence[bytes],
    tool: str,
    options: Options,
    workdir: Path,
) -> SetupResult:
    """Start setup ``name``'s server, measure its scenarios, stop it."""
    env = setup_env(name, files, options)
    settings = serving.effective_settings(env)
    command = peer_command(int(settings["workers"])) if name == "peer" else None
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    bodies = serving.scenario_bodies(scenarios, images, folder)
    load = options.load
    port = free_port(load.host)
    print(f"[{name}] starting on {load.host}:{port} ...", file=sys.stderr)
    with serving.serving(
        load.host, port, env, folder / "server.log", load.stop_timeout, command
    ) as server:
        cold = server.wait_ready(load.ready_timeout)
        print(f"[{name}] ready after {cold:.1f} s", file=sys.stderr)
        rows = serving.run_scenarios(server, scenarios, bodies, tool, load, folder, f"[{name}] ")
        stopped = server.stop(load.stop_timeout)
    return SetupResult(name, SETUPS[name][0], cold, rows, settings, stopped)


# --------------------------------------------------------------------------- report


@dataclass
class Goal:
    """One goal: what it asks, what was measured, met or not."""

    goal: str
    measured: str
    met: bool | None


def _row(results: Sequence[SetupResult], name: str, endpoint: str, conc: int) -> Row | None:
    for result in results:
        if result.name == name:
            for row in result.rows:
                if row.scenario.endpoint == endpoint and row.scenario.concurrency == conc:
                    return row
    return None


def _ratio_goal(title: str, ours: Row, other: Row, goal: float) -> Goal:
    """``ours`` serves at least ``goal`` times the requests/s of ``other``."""
    ratio = ours.requests_per_s / other.requests_per_s if other.requests_per_s else 0.0
    return Goal(
        title,
        f"{ours.requests_per_s:.0f} vs {other.requests_per_s:.0f} req/s = {ratio:.2f}×",
        ratio >= goal,
    )


def check_goals(results: Sequence[SetupResult], raw: Sequence[RawResult], nproc: int) -> list[Goal]:
    """Compare the run with the goals; a goal whose rows were not measured is ``None``."""
    goals = []
    ours = _row(results, "service", "predict", 64)
    peer = _row(results, "peer", "predict", 64)
    off = _row(results, "batching_off", "predict", 64)
    single = _row(results, "service", "predict", 1)
    batch = next(
        (
            r
            for res in results
            if res.name == "service"
            for r in res.rows
            if r.scenario.endpoint == "batch_predict"
        ),
        None,
    )
    raw_ort = max(
        (
            r.images_per_s
            for r in raw
            if r.runtime == "ONNX Runtime" and r.threads == nproc and r.batch == RAW_BATCH
        ),
        default=None,
    )
    if ours and peer:
        goals.append(
            _ratio_goal(
                f"/predict c=64 ≥ {GOAL_PEER_RATIO:g}× the peer", ours, peer, GOAL_PEER_RATIO
            )
        )
    if ours:
        goals.append(Goal("/predict c=64: 0 errors", ours.error_text(), ours.error_count == 0))
        goals.append(
            Goal(
                f"/predict c=64: p99 ≤ {GOAL_P99_MS:g} ms",
                f"{ours.p99_ms:.0f} ms",
                ours.p99_ms <= GOAL_P99_MS,
            )
        )
    if batch and raw_ort:
        share = batch.images_per_s / raw_ort
        goals.append(
            Goal(
                f"/batch_predict ×64 ≥ {GOAL_BATCH_OF_RAW:.0%} of raw ONNX Runtime ({nproc} threads)",
                f"{batch.images_per_s:.0f} vs {raw_ort:.0f} img/s = {share:.0%}",
                share >= GOAL_BATCH_OF_RAW,
            )
        )
    if ours and off:
        goals.append(
            _ratio_goal(
                f"batching on ≥ {GOAL_BATCHING_RATIO:g}× off at c=64",
                ours,
                off,
                GOAL_BATCHING_RATIO,
            )
        )
    if single:
        goals.append(
            Goal(
                f"/predict c=1: p50 ≤ {GOAL_P50_MS:g} ms",
                f"{single.p50_ms:.1f} ms",
                single.p50_ms <= GOAL_P50_MS,
            )
        )
    service = next((r for r in results if r.name == "service"), None)
    if service:
        goals.append(
            Goal(
                f"cold start to /readyz ≤ {GOAL_COLD_START_S:g} s",
                f"{service.cold_start_s:.1f} s",
                service.cold_start_s <= GOAL_COLD_START_S,
            )
        )
    return goals


def render_rows(results: Sequence[SetupResult]) -> str:
    """One table with every setup's scenarios."""
    lines = [
        "| setup | scenario | conc. | req/s | images/s | p50 ms | p90 ms | p99 ms | errors "
        "| mean batch | client CPU | server CPU | load1 |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for result in results:
        lines += [f"| {result.name} {r.cells()}" for r in result.rows]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict[str, Any], results: Sequence[SetupResult]) -> str:
    """The whole ``docs/benchmarks.md``."""
    machine = report["machine"]
    load = ", ".join(f"{x:.2f}" for x in report["load_before"])
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/suite.py`); rerun it rather than editing this page. "
        "Ratios are what count: absolute numbers drift on a shared machine. Where the time goes "
        "per request, and what was changed because of it: [performance.md](performance.md).",
        "",
        f"- date: {report['date']}; commit: {machine['commit']}",
        f"- machine: {machine['nproc']} CPUs (`nproc`), {machine['cpu']}, Linux "
        f"{machine['kernel']}, Python {machine['python']}",
        f"- load average before the run (1/5/15 min): {load}"
        + (f"; run under `{report['nice']}`" if report.get("nice") else ""),
        f"- model: {report['model']}",
        f"- images: {report['images']}",
        f"- load generator: {report['client']}; closed loop, {report['warmup_s']} s warm-up then "
        f"{report['duration_s']} s per scenario; client and server share the machine (client "
        "CPU column)",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|:-:|",
    ]
    for goal in report["goals"]:
        met = "n/a" if goal["met"] is None else ("yes" if goal["met"] else "**no**")
        lines.append(f"| {goal['goal']} | {goal['measured']} | {met} |")
    lines += ["", "## Serving", "", "![serving benchmark](benchmarks.png)", ""]
    for result in results:
        settings = ", ".join(f"{k}={v}" for k, v in result.settings.items())
        lines.append(
            f"- **{result.name}**: {result.title}; cold start (spawn to `/readyz` = 200) "
            f"{result.cold_start_s:.1f} s; {result.stopped}"
            + (f"; settings: {settings}" if result.name != "peer" else "")
        )
    lines += [
        "",
        render_rows(results),
        "req/s and images/s count 2xx answers only; latency covers every answered request. "
        "errors = bad statuses + socket errors. mean batch = images per model call "
        "(`fashion_serve_batch_size` on `/metrics`; the peer has none: always the request's "
        "images). CPU columns are % of one core over the run "
        f"({machine['nproc']} cores = {100 * int(machine['nproc'])}%); load1 is the 1-minute "
        "load average at the end of the scenario.",
        "",
        "## Model only (no HTTP)",
        "",
        "The same model and images in this process, no server: the machine's limit, and what a "
        "batch saves per image (the most adaptive batching can win).",
        "",
        "| runtime | threads | batch | images/s | ms per call |",
        "|---|--:|--:|--:|--:|",
    ]
    for raw in report["raw"]:
        lines.append(
            f"| {raw['runtime']} | {raw['threads']} | {raw['batch']} "
            f"| {raw['images_per_s']:.0f} | {raw['ms_per_batch']:.2f} |"
        )
    if report.get("training"):
        lines += ["", report["training"].rstrip()]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[SetupResult], raw: Sequence[RawResult], path: Path) -> Path:
    """Two panels: /predict req/s by concurrency per setup; images/s of batches vs the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels = sorted(
        {
            r.scenario.concurrency
            for res in results
            for r in res.rows
            if r.scenario.endpoint == "predict"
        }
    )
    width = 0.8 / max(1, len(results))
    for index, result in enumerate(results):
        by_conc = {
            r.scenario.concurrency: r for r in result.rows if r.scenario.endpoint == "predict"
        }
        xs = [i + index * width for i, c in enumerate(levels) if c in by_conc]
        ys = [by_conc[c].requests_per_s for c in levels if c in by_conc]
        bars = left.bar(xs, ys, width, label=result.name)
        for bar, c in zip(bars, [c for c in levels if c in by_conc], strict=True):
            left.annotate(
                f"p99 {by_conc[c].p99_ms:.0f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
            )
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))])
    left.set_xticklabels([f"c={c}" for c in levels])
    left.set_ylabel("/predict requests/s (2xx)")
    left.set_title("/predict, one image per request (labels: p99 ms)")
    left.legend(fontsize=8)
    names, values = [], []
    for result in results:
        for r in result.rows:
            if r.scenario.endpoint == "batch_predict":
                names.append(f"{result.name}\n/batch_predict ×{r.scenario.images}")
                values.append(r.images_per_s)
    for item in (r for r in raw if r.batch == RAW_BATCH):
        names.append(f"{item.runtime}\n{item.threads} thr, no HTTP")
        values.append(item.images_per_s)
    colours = ["tab:blue" if "batch_predict" in n else "tab:gray" for n in names]
    right.barh(names, values, color=colours)
    right.set_xlabel("images/s")
    right.set_title(f"/batch_predict served vs the model alone (batch {RAW_BATCH})")
    right.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------- the run


@dataclass
class Options:
    """Command-line options (see :func:`parse_args`).

    ``load`` holds what the setups share with ``bench/serving.py`` (model, client, durations,
    limits; its ``scenarios`` stay empty: ``scenarios`` here replaces each setup's own).
    """

    load: serving.Options
    setups: list[str]
    scenarios: str | None
    raw_seconds: float
    training: bool
    training_seconds: float
    output_dir: Path | None


def run(options: Options) -> tuple[dict[str, Any], list[SetupResult]]:
    """Run the whole suite; return the report (JSON-ready) and the setup results."""
    tool = serving.pick_client(options.load.client)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    machine = serving.machine_info()  # the commit the servers start from
    load_before = os.getloadavg()
    nproc = len(os.sched_getaffinity(0))
    with contextlib.ExitStack() as stack:
        workdir = serving.workspace(stack, options.load.work_dir, "suite-")
        print("preparing the model ...", file=sys.stderr)
        files = prepare_model(options, workdir)
        pixels, images, source = real_pixels(options.load.images)
        print("model-only throughput ...", file=sys.stderr)
        raw = raw_throughput(files, pixels, sorted({1, nproc}), options.raw_seconds)
        results = []
        for name in options.setups:
            scenarios = serving.parse_scenarios(options.scenarios or SETUPS[name][1])
            results.append(run_setup(name, scenarios, files, images, tool, options, workdir))
    training = None
    if options.training:
        from bench import training as training_bench

        training = training_bench.render(
            training_bench.run_matrix(
                training_bench.default_matrix(options.load.tiny),
                options.training_seconds,
                tiny=options.load.tiny,
            )
        )
    report: dict[str, Any] = {
        "date": started,
        "machine": machine,
        "load_before": load_before,
        "nice": os.environ.get("BENCH_NICE", ""),
        "model": files.description,
        "images": source,
        "client": serving.client_description(tool),
        "duration_s": options.load.duration,
        "warmup_s": options.load.warmup,
        "raw": [asdict(r) for r in raw],
        "setups": [
            {
                "name": r.name,
                "title": r.title,
                "cold_start_s": r.cold_start_s,
                "settings": r.settings,
                "rows": [
                    {
                        "endpoint": row.scenario.endpoint,
                        "concurrency": row.scenario.concurrency,
                        "images": row.scenario.images,
                        "requests_per_s": row.requests_per_s,
                        "images_per_s": row.images_per_s,
                        "p50_ms": row.p50_ms,
                        "p90_ms": row.p90_ms,
                        "p99_ms": row.p99_ms,
                        "errors": row.errors,
                        "mean_batch": row.mean_batch,
                        "client_cpu_pct": row.client_cpu_pct,
                        "server_cpu_pct": row.server_cpu_pct,
                        "load1": row.load1,
                    }
                    for row in r.rows
                ],
            }
            for r in results
        ],
        "goals": [asdict(g) for g in check_goals(results, raw, nproc)],
        "training": training,
    }
    if options.output_dir is not None:
        options.output_dir.mkdir(parents=True, exist_ok=True)
        plot(results, raw, options.output_dir / "benchmarks.png")
    return report, results


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line into :class:`Options`."""
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__)
    serving.add_model_arguments(parser, "random simple_cnn, no registry")
    serving.add_load_arguments(parser)
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("--scenarios", help="replace every setup's scenarios (quick runs)")
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="per model-only timing")
    parser.add_argument("--skip-training", action="store_true", help="no training-speed table")
    parser.add_argument(
        "--training-seconds", type=float, default=20.0, help="timed seconds per training run"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=DOCS, help="benchmarks.md/.json/.png go here; '-' = none"
    )
    parser.add_argument("--work-dir", type=Path, help="keep bodies, models and server logs here")
    args = parser.parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        parser.error(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    if args.scenarios:
        try:
            serving.parse_scenarios(args.scenarios)
        except BenchError as exc:
            parser.error(str(exc))
    return Options(
        load=serving.load_options(args, scenarios=[], port=0, output=None),
        setups=setups,
        scenarios=args.scenarios,
        raw_seconds=args.raw_seconds,
        training=not args.skip_training,
        training_seconds=args.training_seconds,
        output_dir=None if str(args.output_dir) == "-" else args.output_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite, write the page, the JSON and the plot; 1 on a failed run."""
    options = parse_args(argv)
    outcome = serving.guarded(lambda: run(options), "servers stopped")
    if isinstance(outcome, int):
        return outcome
    report, results = outcome
    page = render_markdown(report, results)
    print(page)
    if options.output_dir is not None:
        (options.output_dir / "benchmarks.md").write_text(page)
        (options.output_dir / "benchmarks.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"written to {options.output_dir}/benchmarks.{{md,json,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
