"""Serving settings: the file, environment overrides, and what they turn into (serving/settings.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import service
from serving.runtime import onnx_session_options
from serving.settings import (
    BatchingSettings,
    ServingConfigError,
    load_serving_settings,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "2"),  # configs/serving.yaml's malloc_arena_max
        ({"FASHION_SERVE_SERVING__MALLOC_ARENA_MAX": "null"}, "unset"),
        ({"MALLOC_ARENA_MAX": "4"}, "4"),  # an explicit environment wins
    ],
)
def test_malloc_arena_cap_reaches_the_worker_environment(
    environ: dict[str, str], expected: str
) -> None:
    """Importing the service (what `bentoml serve` does before spawning workers) sets the cap."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    code = "import os, service; print(os.environ.get('MALLOC_ARENA_MAX', 'unset'))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, **environ},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == expected


def test_settings_file_and_env_overrides(tmp_path: Path) -> None:
    default = load_serving_settings(ROOT / "configs" / "serving.yaml", environ={})
    assert (default.model_name, default.model_alias, default.model_tag) == (
        "fashion-classifier",
        "champion",
        None,
    )
    env = {
        "FASHION_SERVE_SERVING__PREDICT__MAX_BATCH_SIZE": "8",
        "FASHION_SERVE_SERVING__MODEL_TAG": "other:v1",
        "UNRELATED": "x",
    }
    custom = load_serving_settings(ROOT / "configs" / "serving.yaml", environ=env)
    assert (custom.predict.max_batch_size, custom.model_tag) == (8, "other:v1")
    assert custom.batch_predict == default.batch_predict

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1")
    problems: list[tuple[Path, dict[str, str], str]] = [
        (tmp_path / "missing.yaml", {}, "not found"),
        (bad_yaml, {}, "not valid YAML"),
        (not_mapping, {}, "must hold a mapping"),
        (ROOT / "configs" / "serving.yaml", {"FASHION_SERVE_SERVING__WORKERS": "0"}, "workers"),
        (ROOT / "configs" / "serving.yaml", {"FASHION_SERVE_SERVING__NOPE": "1"}, "nope"),
        (
            ROOT / "configs" / "serving.yaml",
            {"FASHION_SERVE_SERVING__WORKERS__X": "1"},
            "not a section",
        ),
        (ROOT / "configs" / "serving.yaml", {"FASHION_SERVE_SERVING__WORKERS": "[1"}, "YAML"),
    ]
    for path, environ, message in problems:
        with pytest.raises(ServingConfigError, match=message):
            load_serving_settings(path, environ=environ)


def test_onnx_memory_pattern_is_off_unless_configured() -> None:
    """Per-shape memory plans grow with every new batch size; the default turns them off."""
    config = ROOT / "configs" / "serving.yaml"
    default = load_serving_settings(config, environ={})
    assert onnx_session_options(default).enable_mem_pattern is False
    assert default.onnx_intra_op_threads == onnx_session_options(default).intra_op_num_threads
    turned_on = load_serving_settings(
        config, environ={"FASHION_SERVE_SERVING__ONNX_MEMORY_PATTERN": "true"}
    )
    assert onnx_session_options(turned_on).enable_mem_pattern is True


def test_config_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "serving.yaml").write_text("model_tag: elsewhere:1\n")
    monkeypatch.setenv("FASHION_SERVE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ServingConfigError, match=str(tmp_path / "serving.yaml")):
        load_serving_settings()


def test_batch_size_one_turns_batching_off() -> None:
    off = BatchingSettings(max_batch_size=1, max_latency_ms=100)
    assert off.api_options() == {"batchable": False}
    on = service.SETTINGS.predict.api_options()
    assert on["batchable"] is True
    assert on["max_batch_size"] == service.SETTINGS.predict.max_batch_size
