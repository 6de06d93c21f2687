"""The serving benchmark (``bench/serving.py``): its pieces, and one short real run.

The fast tests check what the table is built from (scenario parsing, request bodies the service's
own multipart parser accepts, ``/metrics`` arithmetic, errors that stay visible). The slow one
runs the benchmark's core with ``--tiny --duration 1 --scenarios predict:1``: a random model in a
temporary BentoML home, a real ``bentoml serve`` process and a real load generator.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench import loadgen, serving, suite, training
from serving.launch import free_port, wait_ready
from serving.uploads import parse_multipart, select_files
from tests.serving_helpers import ROOT, run_ok, tiny_bench_flags


def test_parse_scenarios() -> None:
    parsed = serving.parse_scenarios("predict:1, /predict:16,batch_predict:4,batch_predict:2:8")
    assert parsed == [
        serving.Scenario("predict", 1, 1),
        serving.Scenario("predict", 16, 1),
        serving.Scenario("batch_predict", 4, 64),
        serving.Scenario("batch_predict", 2, 8),
    ]
    assert parsed[2].name == "/batch_predict ×64"
    for bad in ("", "classify:1", "predict", "predict:0", "predict:1:2", "predict:x"):
        with pytest.raises(serving.BenchError):
            serving.parse_scenarios(bad)


def test_bodies_pass_the_service_parser(tmp_path: Path) -> None:
    images, _ = serving.load_images(6)
    scenario = serving.Scenario("batch_predict", 1, 3)
    bodies = serving.write_bodies(tmp_path, scenario, images)
    assert bodies.count == 2
    for body in loadgen.read_bodies(tmp_path, bodies.count):
        parts = parse_multipart(body, bodies.content_type, "images")
        assert len(select_files(parts, "images", False, 64)) == 3
        assert all(part.data.startswith(b"\x89PNG") for part in parts)


def test_metrics_arithmetic_and_visible_errors() -> None:
    before = {"fashion_serve_batch_size_count": 2.0, "fashion_serve_batch_size_sum": 4.0}
    after = {
        "fashion_serve_batch_size_count": 6.0,
        "fashion_serve_batch_size_sum": 24.0,
        'fashion_serve_errors_total{endpoint="/predict",kind="http_503"}': 3.0,
    }
    summary = {
        "tool": "wrk",
        "duration_us": 2e6,
        "requests": 10,
        "status": 3,
        "timeout": 1,
        "p50_us": 1500.0,
        "p90_us": 2000.0,
        "p99_us": 9000.0,
    }
    run = serving.ClientRun(summary, cpu_s=0.5, wall_s=2.0)
    row = serving.make_row(serving.Scenario("predict", 4), run, 3.0, before, after)
    assert row.mean_batch == 5.0
    assert row.requests_per_s == 3.5
    assert (row.client_cpu_pct, row.server_cpu_pct) == (25.0, 150.0)
    assert row.error_count == 4
    table = serving.render_table([row])
    assert "**4** (status 3, timeout 1)" in table
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert loadgen.percentile([], 0.99) == 0.0


@pytest.mark.slow
def test_benchmark_smoke(tmp_path: Path) -> None:
    options = serving.parse_args(
        tiny_bench_flags(
            tmp_path,
            "bench.md",
            "--duration=1",
            "--warmup=1",
            "--scenarios=predict:1",
            "--images=32",
        )
    )
    report = serving.run(options)
    assert report.cold_start_s > 0
    assert report.stopped.startswith("stopped by SIGTERM")
    (row,) = report.rows
    assert row.requests_per_s > 0
    assert row.error_count == 0, row.error_text()
    assert row.mean_batch == 1.0
    page = serving.render_markdown(report, serving.machine_info())
    assert "| /predict | 1 |" in page
    assert "## Errors" not in page


# --------------------------------------------------------------------------- make bench (suite)


def _row(endpoint: str, conc: int, rps: float, p50: float, p99: float, images: int = 1) -> Any:
    summary = {
        "tool": "wrk",
        "duration_us": 1e6,
        "requests": rps,
        "p50_us": p50 * 1000,
        "p90_us": p99 * 1000,
        "p99_us": p99 * 1000,
    }
    run = serving.ClientRun(summary, cpu_s=0.1, wall_s=1.0)
    return serving.make_row(serving.Scenario(endpoint, conc, images), run, 1.0, {}, {})


def test_goals_are_checked_from_the_rows() -> None:
    results = [
        suite.SetupResult(
            "small",
            "service",
            "s",
            4.0,
            [
                _row("predict", 1, 300, 4.0, 9.0),
                _row("predict", 64, 900, 50.0, 90.0),
                _row("batch_predict", 4, 40, 90.0, 120.0, images=64),
            ],
        ),
        suite.SetupResult(
            "small", "batching_off", "o", 4.0, [_row("predict", 64, 400, 150.0, 300.0)]
        ),
        suite.SetupResult("small", "peer", "p", 4.0, [_row("predict", 64, 350, 180.0, 250.0)]),
        suite.SetupResult("small", "asgi_floor", "f", 1.0, [_row("predict", 64, 3000, 20.0, 30.0)]),
        suite.SetupResult(
            "efficientnet", "service", "s", 4.0, [_row("predict", 32, 290, 100.0, 150.0)]
        ),
        suite.SetupResult(
            "efficientnet", "batching_off", "o", 4.0, [_row("predict", 32, 300, 100.0, 150.0)]
        ),
    ]
    raw = [
        suite.RawResult("small", "ONNX Runtime", 1, 2, 64, 6000.0, 10.0),
        suite.RawResult("small", "ONNX Runtime", 2, 1, 64, 5000.0, 12.0),
        suite.RawResult("small", "ONNX Runtime", 1, 1, 64, 9000.0, 7.0),  # not every core
        suite.RawResult("efficientnet", "ONNX Runtime", 2, 1, 1, 300.0, 6.6),
    ]
    assert suite.raw_limit(raw, "small", 2) == raw[0]
    goals = suite.check_goals(results, raw, 2)
    by_goal = {g.goal: g for g in goals}
    # small: on 900 vs off 400; 900 of 6000 img/s = 15%; p99 90 ms; 900/350 = 2.6x the peer;
    # /batch_predict 2560 img/s = 43%; p50 4 ms; cold start 4 s. The floor is for scale only.
    assert [g.met for g in goals if g.goal.startswith("small:")] == [
        True, False, None, True, False, False, False, True, True,
    ]  # fmt: skip
    floor = by_goal["small: the floor (bare ASGI, no batching) at c=64, for scale"]
    assert floor.measured.endswith("= 50%")
    assert "2.57×" in by_goal["small: /predict c=64 ≥ 3× the peer"].measured
    assert (
        "2 proc × 1 thr"
        not in by_goal["small: /predict c=64 ≥ 50% of the raw model limit"].measured
    )
    # efficientnet: batching on 290 vs off 300 is a loss; 290 of 300 img/s = 97%.
    efficientnet = [g for g in goals if g.goal.startswith("efficientnet:")]
    assert [g.met for g in efficientnet] == [False, True, True]
    assert "97%" in efficientnet[1].measured
    page = suite.render_markdown(
        {
            "date": "d",
            "machine": serving.machine_info() | {"nproc": "2"},
            "load_before": (0.1, 0.2, 0.3),
            "models": {"small": "m", "efficientnet": "e"},
            "images": "i",
            "client": "c",
            "duration_s": 1,
            "warmup_s": 0,
            "raw": [vars(r) for r in raw],
            "goals": [vars(g) for g in goals],
            "training": "## Training speed\n",
        },
        results,
    )
    assert "| small | peer | /predict | 64 | 350.0 | 350 | 6% |" in page
    assert "| efficientnet | service | /predict | 32 | 290.0 | 290 | 97% |" in page
    assert "| small | ONNX Runtime | 1 × 2 | 64 | **6000** |" in page
    assert page.count("**no**") == 5
    assert "| small: the floor (bare ASGI, no batching) at c=64, for scale |" in page
    assert "## Training speed" in page


def test_batching_on_and_off_alternate_and_their_rounds_add_up() -> None:
    everything = list(suite.SIZES["small"].setups)
    assert suite.setup_order(everything) == [
        "service", "batching_off", "batching_off", "service", "torch", "peer", "asgi_floor",
    ]  # fmt: skip
    assert suite.setup_order(["peer", "service"]) == ["peer", "service"]  # no pair, no repeat
    first = suite.SetupResult(
        "small", "service", "s", 3.0, [_row("predict", 1, 100, 4.0, 9.0)], stopped="stopped"
    )
    second = suite.SetupResult(
        "small", "service", "s", 5.0, [_row("predict", 1, 300, 2.0, 12.0)], stopped="stopped"
    )
    second.rows[0].errors["timeout"] = 2
    merged = suite.merge_rounds([first, second])
    (row,) = merged.rows
    assert row.requests_per_s == 200.0  # 400 answers in 2 s
    assert (row.p50_ms, row.p99_ms) == (4.0, 12.0)  # the worse round
    assert row.errors["timeout"] == row.error_count == 2 and merged.cold_start_s == 3.0
    assert merged.round_rates == [[100.0, 300.0]]
    assert "2 rounds (A B B A), req/s per round: /predict c=1 100/300" in suite.round_text(merged)
    assert suite.merge_rounds([first]) is first and suite.round_text(first) == ""


async def worker_pid_app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that answers the process id of the worker that took the connection."""
    if scope["type"] != "http":
        return
    body = str(os.getpid()).encode()
    headers = [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _read_all(connection: socket.socket) -> bytes:
    with connection:
        connection.settimeout(10)
        chunks = []
        while chunk := connection.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_floor_gives_each_worker_a_socket_of_its_own() -> None:
    """``--reuse-port``: new connections reach both workers, and SIGTERM stops them all."""
    port = free_port()
    command = suite.peer_command(2, "tests.test_bench:worker_pid_app", reuse_port=True)
    process = subprocess.Popen([*command, f"--port={port}"], cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 60, lambda: process.poll() is None, path="/")
        # Opened together, as wrk opens them: one shared socket can hand them all to one worker.
        connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        for connection in connections:
            connection.sendall(b"GET / HTTP/1.1\r\nHost: floor\r\n\r\n")
        answers = [_read_all(connection) for connection in connections]
        pids = Counter(answer.rpartition(b"\r\n\r\n")[2].decode() for answer in answers)
        assert len(pids) == 2 and str(process.pid) not in pids, pids
        assert min(pids.values()) >= 4, pids  # spread by address hash: 4 of 32 is 1 in 10^5
    finally:
        process.terminate()
        assert process.wait(30) == 0


@pytest.mark.parametrize(
    ("on_rounds", "off_rounds", "met"),
    [
        ((1033.0, 1051.0), (1051.0, 1044.0), True),  # 0.995×, the rounds overlap: a tie
        ((1000.0, 1040.0), (1045.0, 1050.0), False),  # every round on is slower: a loss
        ((1000.0,), (1045.0,), False),  # one round each: no spread to go by
    ],
)
def test_a_loss_to_batching_must_exceed_the_rounds_spread(
    on_rounds: tuple[float, ...], off_rounds: tuple[float, ...], met: bool
) -> None:
    def merged(name: str, rates: tuple[float, ...]) -> Any:
        rounds = [
            suite.SetupResult("small", name, name, 1.0, [_row("predict", 1, r, 1, 2)])
            for r in rates
        ]
        return suite.merge_rounds(rounds)

    results = [merged("service", on_rounds), merged("batching_off", off_rounds)]
    (goal,) = [g for g in suite.check_goals(results, [], 2) if "batching on" in g.goal]
    assert goal.met is met
    assert ("a tie" in goal.measured) is met


def test_training_table_renders_speedups() -> None:
    rows = [
        training.TrainingSpeed("simple_cnn", "DataLoader", 2, 128, 10, 500.0),
        training.TrainingSpeed("simple_cnn", "in-memory + channels_last", 2, 128, 10, 1500.0),
    ]
    table = training.render(rows)
    assert "| simple_cnn | in-memory + channels_last | 10 | 1500 | 40 | 3.00× |" in table
    assert training.default_matrix(tiny=True) == [("simple_cnn", v) for v in training.VARIANTS]


@pytest.mark.slow
def test_suite_smoke_tiny(tmp_path: Path) -> None:
    """Both model sizes, every setup (service, batching off, torch backend, FastAPI peer)."""
    out = tmp_path / "docs"
    code = suite.main(
        [
            "--tiny",
            "--duration=1",
            "--warmup=1",
            "--scenarios=predict:2",
            "--raw-seconds=0.2",
            "--skip-training",
            "--images=16",
            "--workers=1",
            f"--output-dir={out}",
            f"--work-dir={tmp_path / 'work'}",
        ]
    )
    assert code == 0
    report = json.loads((out / "benchmarks.json").read_text())
    served = [(s["model"], s["name"]) for s in report["setups"]]
    assert served == [(model, name) for model, size in suite.SIZES.items() for name in size.setups]
    for setup in report["setups"]:
        (row,) = setup["rows"]
        assert row["requests_per_s"] > 0 and sum(row["errors"].values()) == 0, setup
    mean_batches = {(s["model"], s["name"]): s["rows"][0]["mean_batch"] for s in report["setups"]}
    rounds = {(s["model"], s["name"]): s["round_rates"] for s in report["setups"]}
    assert len(rounds["small", "batching_off"][0]) == 2 and rounds["small", "peer"] == []
    assert mean_batches["small", "batching_off"] == 1.0 and mean_batches["small", "peer"] is None
    assert {(r["model"], r["runtime"]) for r in report["raw"]} == {
        (model, runtime) for model in suite.SIZES for runtime in ("ONNX Runtime", "eager torch")
    }
    assert "EfficientNet-Lite0" in report["models"]["efficientnet"]
    assert (out / "benchmarks.png").read_bytes().startswith(b"\x89PNG")
    assert "## Goals" in (out / "benchmarks.md").read_text()


def run_bench_module(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench.<args>`` in the project, without our settings or metrics env; must pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_SERVE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return run_ok([sys.executable, "-m", *args], env=env, timeout=300)


@pytest.mark.slow
def test_request_profile_tiny() -> None:
    """The in-process profiler drives the real app and splits a request's CPU into phases."""
    result = run_bench_module(
        "bench.profile_request", "--tiny", "--requests=40", "--warmup=5", "--profile", "--costs"
    )
    assert "ms CPU and" in result.stdout
    phases = re.findall(r"^\s+(\d+) µs\s+(\d+)%\s+(.+)$", result.stdout, re.MULTILINE)
    names = {name for _, _, name in phases}
    assert {"model call", "decode (PIL)", "multipart parsing + body"} <= names
    assert 90 <= sum(int(share) for _, share, _ in phases) <= 110
    # --costs: each operation alone, and a total that is the sum of its rows.
    costs = re.findall(r"^\s+([\d.]+) µs × +([\d.]+) = +([\d.]+) µs  (.+)$", result.stdout, re.M)
    assert {"decode + prepare one PNG", "Prometheus histogram observe"} <= {c[3] for c in costs}
    assert all(float(each) > 0 for each, _, _, _ in costs)
    total = re.search(r"^\s+([\d.]+) µs per request in all$", result.stdout, re.M)
    assert total is not None
    assert float(total.group(1)) == pytest.approx(sum(float(c[2]) for c in costs), abs=0.5)


@pytest.mark.slow
def test_onnx_memory_tiny() -> None:
    """Both memory-pattern settings run in fresh processes and land in one table."""
    result = run_bench_module("bench.onnx_memory", "--tiny", "--batches=50", "--max-batch=16")
    rows = re.findall(
        r"^\| (true|false) \| (\d+) \| (\d+) \| ([+-][\d.]+)% \|", result.stdout, re.M
    )
    assert [row[0] for row in rows] == ["true", "false"]
    assert all(int(after) > 0 and int(end) > 0 for _, after, end, _ in rows)
    assert "50 batches of random size 1-16" in result.stdout


@pytest.mark.slow
def test_photo_uploads_tiny() -> None:
    """PNG and every photo style are scored through the upload path, one row per filter."""
    result = run_bench_module("bench.photo_uploads", "--tiny", "--limit=40", "--resample", "box")
    rows = re.findall(r"^\| (.+?) \| (\w+) \| ([\d.]+)% \| ([+-][\d.]+)? ?\|$", result.stdout, re.M)
    assert rows[0][:2] == ("28×28 grayscale PNG", "none")
    photos = rows[1:]
    assert len(photos) == 6 and {r[1] for r in photos} == {"lanczos", "box"}
    assert all(0 <= float(r[2]) <= 100 for r in rows)
    # The gap column is the PNG accuracy minus the row's, in points.
    png = float(rows[0][2])
    assert all(float(r[3]) == pytest.approx(png - float(r[2]), abs=0.011) for r in photos)


@pytest.mark.slow
def test_data_loaders_tiny(tmp_path: Path) -> None:
    """Both loaders measured in fresh processes on a generated folder, which is then reused."""
    args = ["--root", str(tmp_path / "folder"), "--images=60", "--size=32", "--image-size=16"]
    result = run_bench_module("bench.data_loaders", *args, "--classes=3", "--processes=2")
    rows = re.findall(
        r"^\| (memory|stream) \| (\d+) \| [\d.]+ \| [\d.]+ \| (\d+) \|", result.stdout, re.M
    )
    # 3 classes x 20 images: 4 of each held out for test, 2 of the rest for validation
    assert [(loader, int(n)) for loader, n, _ in rows] == [("memory", 42), ("stream", 42)]
    assert all(int(speed) > 0 for _, _, speed in rows)
    assert len(list((tmp_path / "folder").glob("class_*/*.jpg"))) == 60
    again = run_bench_module("bench.data_loaders", *args, "--classes=3", "--processes=2")
    assert "reusing 60 images" in again.stderr


@pytest.mark.slow
def test_photo_folder_tiny(tmp_path: Path) -> None:
    """The folder is RGB JPEGs per split and class; each model's fit lands in one table row."""
    root = tmp_path / "photos"
    folder_args = ["--root", str(root), "--train-per-class=10", "--test-per-class=2", "--size=32"]
    stores = [
        f"tracking.store_dir={tmp_path / 'mlflow'}",
        f"train.checkpoint_dir={tmp_path / 'checkpoints'}",
        f"data.stats_path={tmp_path / 'stats.json'}",
        "data.image_size=16",
        "train.epochs=1",
        "model.width=4",
        "train.progress=false",
    ]
    result = run_bench_module(
        "bench.photo_folder", *folder_args, "--fit", "--models=resnet_small,resnet18", "--", *stores
    )
    assert len(list(root.glob("train/*/*.jpg"))) == 100
    assert len(list(root.glob("test/*/*.jpg"))) == 20
    with Image.open(next(root.glob("test/bag/*.jpg"))) as image:
        assert (image.mode, image.size, image.format) == ("RGB", (32, 32), "JPEG")
    rows = re.findall(
        r"^\| (\w+) \| (\w+) \| [\d.]+ \| [\d.]+% \| ([\d.]+)% \| `\w+` \|$", result.stdout, re.M
    )
    assert sorted((model, weights) for model, weights, _ in rows) == [
        ("resnet18", "random"),
        ("resnet_small", "random"),
    ]
    assert all(0 <= float(test) <= 100 for *_, test in rows)
    # A complete folder with the same settings is reused, not rewritten.
    stamp = root.joinpath(".complete.json").stat().st_mtime_ns
    again = run_bench_module("bench.photo_folder", *folder_args)
    assert (
        "120 JPEGs" in again.stdout and root.joinpath(".complete.json").stat().st_mtime_ns == stamp
    )


def test_pyspy_shares_count_each_function_once_per_sample(tmp_path: Path) -> None:
    from bench import pyspy_shares

    raw = tmp_path / "worker.raw"
    raw.write_text(
        "run (a/loop.py:10);handle (b/gate.py:5);handle (b/gate.py:9);model (c/rt.py:3) 3\n"
        "run (a/loop.py:10);send (d/http.py:7) 1\n"
    )
    total, inclusive, own = pyspy_shares.shares(raw.read_text().splitlines())
    assert total == 4
    assert inclusive["run (loop.py)"] == 4 and inclusive["handle (gate.py)"] == 3  # not 6
    assert own == {"model (rt.py)": 3, "send (http.py)": 1}
    assert pyspy_shares.main([str(raw), "--top", "2"]) == 0
    (tmp_path / "empty.raw").write_text("")
    assert pyspy_shares.main([str(tmp_path / "empty.raw")]) == 1


def test_batch_profile_command_prints_each_profile_and_its_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import batch_profile
    from train.tiny import tiny_model_in

    tag = tiny_model_in(tmp_path)
    monkeypatch.setenv("FASHION_SERVE__EXPORT__BATCH_PROFILE_SECONDS", "0.05")
    monkeypatch.setenv("FASHION_SERVE__EXPORT__BATCH_PROFILE_ROUNDS", "2")
    assert (
        batch_profile.main(["--bentoml-home", str(tmp_path), "--model-tag", tag, "--repeat", "2"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tag}: 2 rounds, 0.05 s per size (configs/export.yaml)"
    assert len(lines) == 3
    for line in lines[1:]:
        assert "× batch 1: 1: 1.000, 2: " in line and ", 64: " in line
        assert int(line.rsplit("/predict cap ", 1)[1]) in (1, 2, 4, 8, 16, 32, 64)
