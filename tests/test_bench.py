"""The serving benchmark (``bench/serving.py``): its pieces, and one short real run.

The fast tests check what the table is built from (scenario parsing, request bodies the service's
own multipart parser accepts, ``/metrics`` arithmetic, errors that stay visible). The slow one
runs the benchmark's core with ``--tiny --duration 1 --scenarios predict:1``: a random model in a
temporary BentoML home, a real ``bentoml serve`` process and a real load generator.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import service
from bench import loadgen, serving


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
        parts = service.parse_multipart(body, bodies.content_type, "images")
        assert len(service.select_files(parts, "images", False, 64)) == 3
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
        [
            "--tiny",
            "--duration=1",
            "--warmup=1",
            "--scenarios=predict:1",
            "--workers=1",
            "--images=32",
            f"--output={tmp_path / 'bench.md'}",
            f"--work-dir={tmp_path / 'work'}",
        ]
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
