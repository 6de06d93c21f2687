"""The soak test (``bench/soak.py``): settings, the RSS probe, the verdict, and one short real run.

The real run is ``make soak``'s core with ``--tiny`` for a few seconds: a random model, a real
``bentoml serve`` process and two real load generators (``/predict`` and ``/batch_predict``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import serving, soak
from tests.serving_helpers import tiny_bench_flags

ROOT = Path(__file__).resolve().parent.parent


def settings(**overrides: object) -> soak.SoakSettings:
    return soak.load_soak_settings(ROOT / "configs" / "soak.yaml", dict(overrides))


def test_defaults_are_the_record_run_and_flags_override() -> None:
    default = settings()
    assert default.duration_s == 600
    assert default.predict_concurrency + default.batch_predict_concurrency == 64
    assert settings(duration_s=5, interval_s=None).duration_s == 5
    with pytest.raises(ValueError, match="interval_s"):
        settings(interval_s=0)
    options = soak.parse_args(["--tiny", "--duration=7", "--output=-"])
    assert options.settings.duration_s == 7 and options.output is None and options.tiny


def test_rss_of_a_process_tree_counts_children() -> None:
    own = soak.process_tree_rss_bytes(os.getpid())
    assert own is not None and own > 10 * 2**20
    # The child says when its interpreter is up: measured earlier, its RSS is still growing.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        with_child = soak.process_tree_rss_bytes(os.getpid())
        alone = soak.process_tree_rss_bytes(child.pid)
        assert alone is not None and with_child is not None and with_child >= own + alone // 2
    finally:
        child.kill()
        child.wait()
    assert soak.process_tree_rss_bytes(2**22 + 1) is None


def test_verdict_needs_zero_errors_and_bounded_growth() -> None:
    def report(
        rss: list[int], errors: int = 0, server: dict[str, float] | None = None
    ) -> soak.SoakReport:
        intervals = [
            soak.Interval(float(i), {"predict": soak.EndpointStats(100, errors, 12.0)}, r)
            for i, r in enumerate(rss)
        ]
        return soak.SoakReport(
            settings(), "m", "wrk", "now", (0.0, 0.0, 0.0), 1000, intervals, server or {}
        )

    assert report([1000, 1050]).passed
    assert report([1000, 1050]).rss_growth == pytest.approx(0.05)
    assert report([1100, 1155]).late_rss_growth == pytest.approx(0.05)
    assert not report([1000, 1150]).passed
    assert not report([1000, 1000], errors=1).passed
    assert not report([1000], server={'fashion_serve_errors_total{kind="http_503"}': 2}).passed
    page = soak.render(report([1000, 1200]), serving.machine_info())
    assert "**Result: FAIL**" in page and "+20.0%" in page
    assert soak.EndpointStats.of({"requests": 3, "status": 1, "timeout": 1, "p99_us": 2500}) == (
        soak.EndpointStats(3, 2, 2.5)
    )


@pytest.mark.slow
def test_short_soak_with_a_tiny_model(tmp_path: Path) -> None:
    options = soak.parse_args(
        tiny_bench_flags(
            tmp_path, "soak.md", "--duration=6", "--interval=2", "--warmup=1", "--images=64"
        )
    )
    report = soak.run(options)
    assert len(report.intervals) == 3
    for interval in report.intervals:
        assert set(interval.stats) == {"predict", "batch_predict"}
        assert all(s.requests > 0 for s in interval.stats.values())
        assert interval.rss_bytes is not None and interval.rss_bytes > 50 * 2**20
    assert report.errors == 0 and report.server_errors == {}
    assert report.rss_growth is not None
    assert report.stopped.startswith("stopped by SIGTERM")
