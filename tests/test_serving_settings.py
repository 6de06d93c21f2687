"""Serving settings: the file, environment overrides, and what they turn into (serving/settings.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bentoml
import pytest

from common.preprocess import PreprocessSpec
from serving.bentoml_bridge import model_store_at
from serving.lineage import profiled_costs
from serving.runtime import ModelRuntime, onnx_session_options
from serving.settings import (
    BatchingSettings,
    ServingConfigError,
    load_serving_settings,
)
from train.tiny import import_tiny, tiny_model

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


def test_onnx_memory_pattern_only_for_few_batch_sizes() -> None:
    """Per-shape memory plans grow with every new batch size: auto keeps them for few sizes."""
    config = ROOT / "configs" / "serving.yaml"
    default = load_serving_settings(config, environ={})
    assert default.onnx_memory_pattern == "auto"
    assert onnx_session_options(default, 64).enable_mem_pattern is False
    small = default.memory_pattern_max_batch
    assert onnx_session_options(default, small).enable_mem_pattern is True
    assert onnx_session_options(default, small + 1).enable_mem_pattern is False
    assert default.onnx_intra_op_threads == onnx_session_options(default, 1).intra_op_num_threads
    for value, expected in (("true", True), ("false", False)):
        pinned = load_serving_settings(
            config, environ={"FASHION_SERVE_SERVING__ONNX_MEMORY_PATTERN": value}
        )
        assert onnx_session_options(pinned, 64).enable_mem_pattern is expected
        assert onnx_session_options(pinned, 1).enable_mem_pattern is expected


def test_config_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "serving.yaml").write_text("model_tag: elsewhere:1\n")
    monkeypatch.setenv("FASHION_SERVE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ServingConfigError, match=str(tmp_path / "serving.yaml")):
        load_serving_settings()


def test_batch_size_fits_the_models_cost_per_image() -> None:
    """Batch no larger than the model still runs as cheaply per image as it can."""
    batching = BatchingSettings(max_batch_size=64, max_latency_ms=100)
    small_model = {1: 0.67, 8: 0.63, 16: 0.61, 64: 0.60, 128: 0.59}  # cheaper in a batch
    big_model = {1: 12.06, 2: 12.21, 4: 12.89, 16: 15.98, 64: 17.53}  # dearer in a batch
    assert batching.batch_size_for(small_model, 0.05) == 64  # capped by max_batch_size
    # 2 is within 5% of the cheapest but dearer than one image at a time: no batching.
    assert batching.batch_size_for(big_model, 0.05) == 1
    assert batching.batch_size_for(big_model, 0.0) == 1
    flat = {1: 5.53, 2: 5.50, 4: 5.60, 8: 6.4}
    assert batching.batch_size_for(flat, 0.05) == 2
    assert batching.batch_size_for(None, 0.05) == 64  # a model imported before profiling
    unfitted = batching.model_copy(update={"fit_to_model": False})
    assert unfitted.batch_size_for(big_model, 0.05) == 64


def test_the_service_batches_by_the_served_models_profile(tmp_path: Path) -> None:
    """The runtime caps each API's batcher by the imported model's profile."""
    tag = import_tiny(tiny_model(), tmp_path)
    settings = load_serving_settings(environ={})
    with model_store_at(tmp_path):
        costs = profiled_costs(bentoml.models.get(tag).info.metadata)
        runtime = ModelRuntime.from_bento_model(bentoml.models.get(tag), settings)
    assert costs is not None and sorted(costs) == [1, 2, 4, 8, 16, 32, 64]
    for name, batching in (
        ("predict", settings.predict),
        ("batch_predict", settings.batch_predict),
    ):
        size = batching.batch_size_for(costs, settings.batch_cost_tolerance)
        assert runtime.batchers[name].max_batch_size == size
        assert runtime.batchers[name].seconds_per_image == pytest.approx(costs[size] / 1000)


def test_a_model_without_a_profile_batches_up_to_the_configured_size(tmp_path: Path) -> None:
    """A model imported before the profile existed: no cap from it, the wait estimate timed."""
    tag = import_tiny(tiny_model(), tmp_path)
    settings = load_serving_settings(environ={})
    with model_store_at(tmp_path):
        stored = bentoml.models.get(tag)
        runtime = ModelRuntime(
            Path(stored.path_of("model.onnx")),
            ["a", "b", "c"],
            PreprocessSpec.model_validate(stored.info.metadata["preprocess"]),
            settings,
        )
    assert runtime.batchers["predict"].max_batch_size == settings.predict.max_batch_size
    assert runtime.batchers["batch_predict"].max_batch_size == settings.batch_predict.max_batch_size
    assert 0 < runtime.batchers["predict"].seconds_per_image < 1
