"""Monitoring: features, the reference, PSI/KS, alert evaluation, the CLI and the Prometheus rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from common import drift
from common.alerts import AlertSettings, duration_seconds, load_alert_settings
from common.drift import (
    DriftMonitor,
    Reference,
    brightness,
    build_reference,
    ks_statistic,
    psi,
    score_margin,
    top2_margin,
)
from common.settings import SettingsError
from train import monitoring
from train.__main__ import main
from train.monitoring import (
    PROMETHEUS_ALERTS,
    evaluate_alerts,
    prometheus_rules,
    render_prometheus_rule_manifest,
    render_prometheus_rules,
)

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_MANIFEST = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"
CLASSES = ["a", "b", "c"]
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def settings() -> AlertSettings:
    return load_alert_settings(ROOT / "configs" / "alerts.yaml", environ={})


def dark_pixels(count: int, seed: int, level: int = 40) -> np.ndarray[Any, Any]:
    """Dark noise images (brightness about level/2/255) in model-input form."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, level, size=(count, 1, 28, 28)).astype(np.float32)


def confident_probabilities(count: int, seed: int) -> np.ndarray[Any, Any]:
    """Rows that favour one class (cycling) with confidence about 0.8-0.95."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.0, 0.1, size=(count, 3))
    probs[np.arange(count), np.arange(count) % 3] = rng.uniform(0.8, 0.95, size=count)
    normalised: np.ndarray[Any, Any] = probs / probs.sum(axis=1, keepdims=True)
    return normalised


@pytest.fixture
def reference() -> Reference:
    probs = confident_probabilities(600, seed=0)
    return build_reference(
        probs,
        np.arange(600) % 3,
        dark_pixels(600, seed=0),
        CLASSES,
        {"28x28": 600},
        "synthetic",
        sample_size=500,
    )


def predictions_like(
    count: int, seed: int, start: datetime, pixels: np.ndarray[Any, Any] | None = None
) -> list[dict[str, Any]]:
    """Prediction-data entries as the service writes them (times one second apart)."""
    probs = confident_probabilities(count, seed)
    lights = brightness(dark_pixels(count, seed) if pixels is None else pixels)
    margins = top2_margin(probs)
    return [
        {
            "time": start + timedelta(seconds=i),
            **drift.prediction_record(
                request_id=f"r{i}",
                endpoint="/predict",
                label=CLASSES[int(row.argmax())],
                class_id=int(row.argmax()),
                confidence=float(row.max()),
                margin=float(margins[i]),
                image_brightness=float(lights[i]),
                size=(28, 28),
            ),
        }
        for i, row in enumerate(probs)
    ]


def requests_like(
    count: int, start: datetime, status: int = 200, latency_ms: float = 20.0
) -> list[dict[str, Any]]:
    return [
        {
            "time": start + timedelta(seconds=i),
            "logger": monitoring.REQUEST_LOGGER,
            "status": status,
            "latency_ms": latency_ms,
        }
        for i in range(count)
    ]


def by_name(results: list[monitoring.AlertResult]) -> dict[str, monitoring.AlertResult]:
    return {r.name: r for r in results}


# --------------------------------------------------------------------------- features and drift


def test_margins_and_brightness() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    assert top2_margin(probs) == pytest.approx([0.5, 0.05, 0.7])
    assert [score_margin(row) for row in probs.tolist()] == pytest.approx([0.5, 0.05, 0.7])
    assert top2_margin(np.ones((2, 1))).tolist() == [1.0, 1.0]
    pixels = np.stack([np.zeros((1, 4, 4)), np.full((1, 4, 4), 255.0)]).astype(np.float32)
    assert brightness(pixels).tolist() == [0.0, 1.0]


def test_reference_round_trip(reference: Reference, tmp_path: Path) -> None:
    assert reference.images == 600
    assert reference.label_mix == {"a": pytest.approx(1 / 3, abs=1e-5)} | {
        "b": pytest.approx(1 / 3, abs=1e-5),
        "c": pytest.approx(1 / 3, abs=1e-5),
    }
    assert reference.accuracy == 1.0
    assert set(reference.samples) == set(drift.NUMERIC_FEATURES)
    assert all(len(values) == 500 for values in reference.samples.values())
    assert 0.05 < np.mean(reference.samples["brightness"]) < 0.1
    assert Reference.load(reference.save(tmp_path / "r.json")) == reference


def test_psi_and_ks() -> None:
    same = np.array([0.2, 0.3, 0.5])
    assert psi(same, same, 1e-4) == 0.0
    assert psi(same, np.array([0.5, 0.3, 0.2]), 1e-4) > 0.25
    assert psi(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 1e-4) > 10  # empty bins are finite
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0
    assert ks_statistic([], [1.0]) == 0.0


def test_drift_settings_need_increasing_bins(settings: AlertSettings) -> None:
    bad = settings.drift.model_dump() | {"bins": {"confidence": [0, 1], "margin": [0, 1]}}
    with pytest.raises(ValueError, match=r"bins\.confidence"):
        drift.DriftSettings.model_validate(bad)


def test_drift_monitor_adds_one_or_many(reference: Reference, settings: AlertSettings) -> None:
    """A batch written at once, wrapping around the ring, equals the same predictions one by one."""
    small = settings.drift.model_copy(update={"window": 10, "every": 4})
    one, many = DriftMonitor(reference, small), DriftMonitor(reference, small)
    entries = predictions_like(27, seed=9, start=NOW)
    for entry in entries:
        one.add(entry["class_id"], entry["confidence"], entry["margin"], entry["brightness"])
    for chunk in (entries[:3], entries[3:17], entries[17:]):
        many.add_many(
            [e["class_id"] for e in chunk],
            [e["confidence"] for e in chunk],
            [e["margin"] for e in chunk],
            [e["brightness"] for e in chunk],
        )
    assert one.count == many.count == 10 and one.due() and many.due()
    assert one.scores() == many.scores()


def test_drift_monitor_scores_its_window(reference: Reference, settings: AlertSettings) -> None:
    drift = DriftMonitor(reference, settings.drift)
    for entry in predictions_like(settings.drift.every, seed=1, start=NOW):
        drift.add(entry["class_id"], entry["confidence"], entry["margin"], entry["brightness"])
    assert drift.due()
    calm = drift.scores()
    assert not drift.due()
    assert set(calm) == {"confidence", "margin", "brightness", "class_mix"}
    assert max(calm.values()) < settings.rules.drift.psi_threshold
    bright = predictions_like(
        settings.drift.window, 2, NOW, 255 - dark_pixels(settings.drift.window, 2)
    )
    for entry in bright:
        drift.add(entry["class_id"], entry["confidence"], entry["margin"], entry["brightness"])
    assert drift.scores()["brightness"] > settings.rules.drift.psi_threshold


# --------------------------------------------------------------------------- alert evaluation


def test_healthy_traffic_fires_nothing(reference: Reference, settings: AlertSettings) -> None:
    start = NOW - timedelta(minutes=5)
    results = evaluate_alerts(
        requests_like(300, start), predictions_like(300, 3, start), reference, settings, NOW
    )
    assert [r.name for r in results] == ["error_rate", "p99_latency", "drift", "no_traffic"]
    assert not any(r.firing for r in results), [r.line() for r in results]
    assert by_name(results)["drift"].line().startswith("ok     drift: max PSI")


def test_each_rule_fires(reference: Reference, settings: AlertSettings) -> None:
    start = NOW - timedelta(minutes=5)
    requests = requests_like(80, start) + requests_like(20, start, status=503, latency_ms=5000.0)
    inverted = predictions_like(300, 4, start, 255 - dark_pixels(300, 4))
    results = by_name(evaluate_alerts(requests, inverted, reference, settings, NOW))
    assert results["error_rate"].firing and results["error_rate"].value == pytest.approx(0.2)
    assert results["p99_latency"].firing and results["p99_latency"].value == 5000.0
    assert results["drift"].firing and "(brightness)" in results["drift"].detail
    assert results["drift"].line().startswith("FIRING drift:")
    assert not results["no_traffic"].firing
    later = by_name(
        evaluate_alerts(requests, inverted, reference, settings, NOW + timedelta(hours=2))
    )
    assert later["no_traffic"].firing and not later["drift"].firing  # the window moved on
    assert by_name(evaluate_alerts([], [], reference, settings, NOW))["no_traffic"].firing


def test_too_few_samples_never_fire(reference: Reference, settings: AlertSettings) -> None:
    start = NOW - timedelta(minutes=1)
    requests = requests_like(5, start, status=500, latency_ms=9000.0)
    inverted = predictions_like(5, 5, start, 255 - dark_pixels(5, 5))
    results = by_name(evaluate_alerts(requests, inverted, reference, settings, NOW))
    assert not results["error_rate"].firing and "needs 20 requests" in results["error_rate"].detail
    assert not results["p99_latency"].firing
    needs = f"needs {settings.rules.drift.min_predictions} predictions"
    assert not results["drift"].firing and needs in results["drift"].detail
    no_reference = by_name(evaluate_alerts(requests, inverted, None, settings, NOW))
    assert "no reference" in no_reference["drift"].detail


def test_alert_settings_overrides_and_errors(tmp_path: Path) -> None:
    path = ROOT / "configs" / "alerts.yaml"
    env = {"FASHION_SERVE_ALERTS__RULES__DRIFT__PSI_THRESHOLD": "0.5"}
    assert load_alert_settings(path, environ=env).rules.drift.psi_threshold == 0.5
    with pytest.raises(SettingsError, match="psi_threshold"):
        load_alert_settings(
            path, environ={"FASHION_SERVE_ALERTS__RULES__DRIFT__PSI_THRESHOLD": "0"}
        )
    with pytest.raises(SettingsError, match="window"):
        load_alert_settings(path, environ={"FASHION_SERVE_ALERTS__WINDOW": "15 minutes"})
    assert duration_seconds("15m") == 900 and duration_seconds("2h") == 7200
    with pytest.raises(ValueError, match="not a duration"):
        duration_seconds("soon")


# --------------------------------------------------------------------------- reading logs and the CLI


def write_jsonl(path: Path, entries: list[dict[str, Any]]) -> Path:
    lines = [json.dumps(e, default=lambda t: t.isoformat()) for e in entries]
    path.write_text("\n".join(["not json", "{broken", *lines, "[1]"]) + "\n")
    return path


def test_alerts_command(
    reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = NOW - timedelta(minutes=5)
    write_jsonl(tmp_path / "service.worker-1.jsonl", requests_like(60, start))
    healthy = write_jsonl(tmp_path / "predictions.worker-1.jsonl", predictions_like(300, 6, start))
    ref = reference.save(tmp_path / "reference.json")
    args = ["alerts", "--logs", str(tmp_path / "service.*"), "--reference", str(ref)]
    assert main([*args, "--predictions", str(healthy), "--now", NOW.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "read 1 log file(s), 1 prediction file(s), reference of 600 images" in out
    assert "ok     drift" in out and "FIRING" not in out

    drifted = write_jsonl(
        tmp_path / "drifted.jsonl", predictions_like(300, 7, start, 255 - dark_pixels(300, 7))
    )
    assert main([*args, "--predictions", str(drifted), "--now", NOW.isoformat()]) == 1
    assert "FIRING drift: max PSI" in capsys.readouterr().out

    assert main([*args, "--predictions", str(drifted), "--now", "yesterday"]) == 2
    assert "error:" in capsys.readouterr().err


def test_alerts_command_defaults_to_the_serving_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without arguments it reads serving.yaml's log files and the served model's reference."""
    start = datetime.now(UTC) - timedelta(minutes=1)
    write_jsonl(tmp_path / "service.worker-1.jsonl", requests_like(3, start))
    write_jsonl(tmp_path / "predictions.worker-1.jsonl", predictions_like(3, 8, start))
    monkeypatch.setenv(
        "FASHION_SERVE_SERVING__LOGGING__FILE__PATH", str(tmp_path / "service.{worker}.jsonl")
    )
    monkeypatch.setenv(
        "FASHION_SERVE_SERVING__LOGGING__PREDICTIONS__PATH",
        str(tmp_path / "predictions.{worker}.jsonl"),
    )
    monkeypatch.setenv("FASHION_SERVE_SERVING__MODEL_TAG", "no-such-model:v1")
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    assert main(["alerts"]) == 0
    out = capsys.readouterr().out
    assert "read 1 log file(s), 1 prediction file(s), no reference" in out
    assert "no reference distribution for the model" in out


# --------------------------------------------------------------------------- Prometheus


def test_rules_file_matches_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """deploy/prometheus/alerts.yml and the PrometheusRule are what ``alert-rules`` writes now."""
    stale = "stale: run python -m train alert-rules"
    settings = load_alert_settings()
    assert RULES_FILE.read_text() == render_prometheus_rules(settings), stale
    assert RULE_MANIFEST.read_text() == render_prometheus_rule_manifest(settings), stale
    committed = ["--output", str(RULES_FILE), "--k8s-output", str(RULE_MANIFEST)]
    assert main(["alert-rules", "--check", *committed]) == 0
    written = tmp_path / "rules" / "alerts.yml"
    manifest = tmp_path / "k8s" / "prometheusrule.yaml"
    fresh = ["--output", str(written), "--k8s-output", str(manifest)]
    assert main(["alert-rules", "--check", *fresh]) == 1
    assert main(["alert-rules", *fresh]) == 0
    assert written.read_text() == RULES_FILE.read_text()
    assert manifest.read_text() == RULE_MANIFEST.read_text()
    assert main(["alert-rules", "--check", *fresh]) == 0
    capsys.readouterr()
    manifest.write_text(manifest.read_text() + "# edited\n")
    assert main(["alert-rules", "--check", *fresh]) == 1
    err = capsys.readouterr().err
    assert f"{manifest} is stale" in err and str(written) not in err


def test_prometheus_rule_manifest_holds_the_same_rules(settings: AlertSettings) -> None:
    """The Kubernetes PrometheusRule carries exactly the rules file's groups, with its labels."""
    manifest = yaml.safe_load(render_prometheus_rule_manifest(settings))
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"] == {
        "name": settings.prometheus.k8s_name,
        "labels": settings.prometheus.k8s_labels,
    }
    assert manifest["spec"] == yaml.safe_load(render_prometheus_rules(settings))


def exported_series() -> set[str]:
    """The series names the service's own metrics appear under on ``/metrics``."""
    from serving.telemetry import service_metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    metrics = service_metrics()
    return {
        family.name + suffix
        for field in type(metrics).__dataclass_fields__
        for family in getattr(metrics, field).describe()
        for suffix in suffixes[family.type]
    }


def test_every_alert_has_a_rule_over_exported_metrics(settings: AlertSettings) -> None:
    """One Prometheus alert per rule of configs/alerts.yaml, over series the service exports."""
    assert set(PROMETHEUS_ALERTS) == set(type(settings.rules).model_fields)
    (group,) = prometheus_rules(settings)["groups"]
    by_alert = {rule["alert"]: rule for rule in group["rules"]}
    assert set(by_alert) == set(PROMETHEUS_ALERTS.values())
    exported = exported_series()
    assert "fashion_serve_drift_psi" in exported and "fashion_serve_requests_total" in exported
    for name, alert in PROMETHEUS_ALERTS.items():
        spec = getattr(settings.rules, name)
        rule = by_alert[alert]
        assert (rule["for"], rule["labels"]["severity"]) == (spec.for_, spec.severity)
        used = set(re.findall(r"fashion_serve_\w+", rule["expr"]))
        assert used and used <= exported, f"{alert} uses {used - exported}, not on /metrics"


def test_promtool_accepts_the_prometheus_rule_spec(tmp_path: Path) -> None:
    """What the Prometheus Operator loads from the PrometheusRule is a valid rules file."""
    spec = yaml.safe_load(RULE_MANIFEST.read_text())["spec"]
    (tmp_path / "spec.yml").write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "spec.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(PROMETHEUS_ALERTS)} rules found" in result.stdout


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (make test-deps)")
    return path


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_promtool_rule_tests(tmp_path: Path, settings: AlertSettings) -> None:
    """Each Prometheus alert fires on series that break it, and stays quiet on healthy ones."""
    rules = settings.rules

    def expected(alert: str, rule: Any) -> list[dict[str, Any]]:
        return [
            {
                "exp_labels": {"severity": rule.severity},
                "exp_annotations": {"summary": rule.summary},
            }
        ]

    ok = 'fashion_serve_requests_total{endpoint="/predict",status="200"}'
    failed = 'fashion_serve_requests_total{endpoint="/predict",status="500"}'
    slow = "fashion_serve_request_seconds_bucket"
    psi_series = 'fashion_serve_drift_psi{feature="brightness"}'
    cases = [
        ({ok: "0+60x60", failed: "0+60x60"}, "25m", "FashionServeHighErrorRate", rules.error_rate),
        ({ok: "0+60x60", failed: "0+0x60"}, "25m", "FashionServeHighErrorRate", None),
        (
            {
                ok: "0+60x60",
                f'{slow}{{le="0.5"}}': "0+0x60",
                f'{slow}{{le="10.0"}}': "0+60x60",
                f'{slow}{{le="+Inf"}}': "0+60x60",
            },
            "25m",
            "FashionServeHighP99Latency",
            rules.p99_latency,
        ),
        (
            {ok: "0+60x60", f'{slow}{{le="0.5"}}': "0+60x60", f'{slow}{{le="+Inf"}}': "0+60x60"},
            "25m",
            "FashionServeHighP99Latency",
            None,
        ),
        ({ok: "0+60x60", psi_series: "3x60"}, "25m", "FashionServeInputDrift", rules.drift),
        ({ok: "0+60x60", psi_series: "0.02x60"}, "25m", "FashionServeInputDrift", None),
        ({ok: "100+0x90"}, "80m", "FashionServeNoTraffic", rules.no_traffic),
        ({}, "80m", "FashionServeNoTraffic", rules.no_traffic),
        ({ok: "0+60x90"}, "80m", "FashionServeNoTraffic", None),
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": alert,
                    "exp_alerts": [] if rule is None else expected(alert, rule),
                }
            ],
        }
        for series, at, alert, rule in cases
    ]
    shutil.copy(RULES_FILE, tmp_path / "alerts.yml")
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_cli_module_runs_without_torch(tmp_path: Path) -> None:
    """``alerts``/``alert-rules`` import neither torch nor MLflow (they run where the service runs)."""
    code = (
        "import sys; from train.__main__ import main; "
        f"rc = main(['alert-rules', '--output', {str(tmp_path / 'a.yml')!r}, "
        f"'--k8s-output', {str(tmp_path / 'k.yaml')!r}]); "
        "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules, 'heavy import'; "
        "sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_worker_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import bentoml

    from serving.telemetry import worker_name

    monkeypatch.setattr(bentoml.server_context, "worker_index", None)
    assert worker_name().startswith("pid-")
    monkeypatch.setattr(bentoml.server_context, "worker_index", 3)
    assert worker_name() == "worker-3"


def test_prediction_lines_follow_the_record_schema() -> None:
    rows = [
        ("T-shirt/top", 0, 0.912345678, 0.5, 0.25, (28, 28)),
        ('say "hi"', 3, 1.0, 0.0, 1.0, (640, 480)),
    ]
    text = drift.prediction_lines("2026-01-01T12:00:00+00:00", "abc", "/batch_predict", rows)
    parsed = [json.loads(line) for line in text.split("\n")]
    expected = [
        {"time": "2026-01-01T12:00:00+00:00"}
        | drift.prediction_record(
            request_id="abc",
            endpoint="/batch_predict",
            label=label,
            class_id=class_id,
            confidence=confidence,
            margin=margin,
            image_brightness=light,
            size=size,
        )
        for label, class_id, confidence, margin, light, size in rows
    ]
    assert parsed == expected
