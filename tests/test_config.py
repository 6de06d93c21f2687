"""Settings: section files, preset, environment and CLI overrides, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from train.config import (
    DEFAULT_AUGMENTATION,
    DEFAULT_UPLOAD_VARIATION,
    PROJECT_ROOT,
    SECTIONS,
    ConfigError,
    Settings,
    TrackingConfig,
    config_dir,
    load_settings,
    parse_override,
    resolve_path,
)

CONFIGS = PROJECT_ROOT / "configs"
MakeSettings = Callable[..., Settings]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable from the calling shell may leak into these tests."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FASHION_SERVE_CONFIG_DIR", raising=False)
    for name in list(os.environ):
        if name.startswith("FASHION_SERVE__"):
            monkeypatch.delenv(name)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(**kwargs: Any) -> str:
    """Load settings expecting a ConfigError; return its message, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- defaults


def test_defaults_come_from_every_section_file() -> None:
    settings = load_settings()
    checked = 0
    for section in SECTIONS:
        content = yaml.safe_load((CONFIGS / f"{section}.yaml").read_text()) or {}
        values = getattr(settings, section)
        for key, expected in content.items():
            actual = getattr(values, key)
            if (section, key, expected) == ("data", "augmentation", "auto"):
                # Resolved while validating: the source's default preset.
                expected = DEFAULT_AUGMENTATION[settings.data.source]
            if (section, key, expected) == ("data", "upload_variation", "auto"):
                expected = DEFAULT_UPLOAD_VARIATION[settings.data.source]
            if isinstance(expected, list) and isinstance(actual, tuple):
                expected = tuple(expected)
            if isinstance(actual, Path):
                assert actual == Path(expected), f"{section}.{key}"
            else:
                assert actual == expected, f"{section}.{key}"
            checked += 1
    assert checked > 40  # every section file was read, not only one


def test_section_files_win_over_model_defaults() -> None:
    from_files = load_settings().train.model_dump()
    built_in = Settings().train.model_dump()
    train_yaml = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    differing = {k for k in train_yaml if train_yaml[k] != built_in[k] and k != "checkpoint_dir"}
    assert differing, "train.yaml should change at least one built-in default"
    for key in differing:
        assert from_files[key] == train_yaml[key]


def test_empty_directory_gives_built_in_defaults(tmp_path: Path) -> None:
    settings = load_settings(directory=tmp_path)
    assert settings == Settings()
    assert settings.train.epochs == 10
    assert settings.model.name == "resnet_small"


def test_empty_yaml_file_is_an_empty_section(tmp_path: Path) -> None:
    _write(tmp_path / "train.yaml", "# nothing here\n")
    assert load_settings(directory=tmp_path).train.epochs == 10


def test_config_dir_env_var_moves_the_section_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config_dir() == CONFIGS
    _write(tmp_path / "train.yaml", "epochs: 7\n")
    monkeypatch.setenv("FASHION_SERVE_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path
    assert load_settings().train.epochs == 7


# --------------------------------------------------------------------------- precedence


@pytest.fixture
def layered(tmp_path: Path) -> tuple[Path, Path]:
    """A section folder (epochs 2, lr 0.5) and a preset (epochs 3, batch_size 16)."""
    folder = tmp_path / "configs"
    _write(folder / "train.yaml", "epochs: 2\nlr: 0.5\nbatch_size: 8\n")
    _write(folder / "model.yaml", "name: simple_cnn\nwidth: 8\n")
    preset = _write(tmp_path / "preset.yaml", "train:\n  epochs: 3\n  batch_size: 16\n")
    return folder, preset


def test_section_file_alone(layered: tuple[Path, Path]) -> None:
    folder, _ = layered
    settings = load_settings(directory=folder)
    assert (settings.train.epochs, settings.train.lr, settings.train.batch_size) == (2, 0.5, 8)
    assert settings.model.width == 8


def test_preset_beats_section_file_and_merges_deeply(layered: tuple[Path, Path]) -> None:
    folder, preset = layered
    settings = load_settings(preset=preset, directory=folder)
    assert settings.train.epochs == 3
    assert settings.train.batch_size == 16
    assert settings.train.lr == 0.5  # kept from the section file: a deep merge
    assert settings.model.width == 8


def test_env_beats_preset(layered: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, preset = layered
    monkeypatch.setenv("FASHION_SERVE__TRAIN__EPOCHS", "4")
    monkeypatch.setenv("FASHION_SERVE__TRAIN__BATCH_SIZE", "32")
    settings = load_settings(preset=preset, directory=folder)
    assert settings.train.epochs == 4
    assert settings.train.batch_size == 32


def test_cli_override_beats_env(
    layered: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, preset = layered
    monkeypatch.setenv("FASHION_SERVE__TRAIN__EPOCHS", "4")
    settings = load_settings(preset=preset, overrides=["train.epochs=5"], directory=folder)
    assert settings.train.epochs == 5
    assert settings.train.batch_size == 16  # the preset still applies to other keys


def test_later_override_wins() -> None:
    settings = load_settings(overrides=["train.epochs=5", "train.epochs=6"])
    assert settings.train.epochs == 6


# --------------------------------------------------------------------------- parsing


def test_override_values_are_yaml() -> None:
    settings = load_settings(
        overrides=[
            "train.num_threads=3",
            "train.progress=false",
            "train.channels_last=true",
            "train.lr=0.25",
            "sweep.lrs=[0.5, 0.25]",
            "sweep.architectures=[simple_cnn, resnet18]",
            "sweep.overrides={train.epochs: 2}",
            "data.limit_per_class=null",
            "tracking.experiment_name=with spaces and = sign",
            " model.name = resnet_small",
        ]
    )
    assert settings.train.num_threads == 3
    assert settings.train.progress is False
    assert settings.train.channels_last is True
    assert settings.train.lr == 0.25
    assert settings.sweep.lrs == [0.5, 0.25]
    assert settings.sweep.architectures == ["simple_cnn", "resnet18"]
    assert settings.sweep.overrides == {"train.epochs": 2}
    assert settings.data.limit_per_class is None
    assert settings.tracking.experiment_name == "with spaces and = sign"
    assert settings.model.name == "resnet_small"


def test_parse_override() -> None:
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("train.lr=0.5") == ("train.lr", 0.5)
    assert parse_override("train.progress=no") == ("train.progress", False)  # YAML 1.1
    assert parse_override("data.path=") == ("data.path", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("sweep.lrs=[1, 2]") == ("sweep.lrs", [1, 2])


def test_env_values_are_yaml_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_SERVE__TRAIN__PROGRESS", "false")
    monkeypatch.setenv("FASHION_SERVE__SWEEP__BATCH_SIZES", "[16, 32]")
    monkeypatch.setenv("FASHION_SERVE__DATA__PATH", "/some/where")
    settings = load_settings()
    assert settings.train.progress is False
    assert settings.sweep.batch_sizes == [16, 32]
    assert settings.data.path == Path("/some/where")


def test_section_file_yaml_types(tmp_path: Path) -> None:
    _write(
        tmp_path / "sweep.yaml",
        "architectures: [simple_cnn]\nlrs: [0.01]\nbatch_sizes: [4, 8]\nmax_runs: 2\n",
    )
    _write(tmp_path / "data.yaml", "allow_download: no\npath: ./rel\n")
    settings = load_settings(directory=tmp_path)
    assert settings.sweep.batch_sizes == [4, 8]
    assert settings.sweep.max_runs == 2
    assert settings.data.allow_download is False
    assert settings.data.path == Path("rel")


def test_settings_reject_invalid_assignment() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.train.epochs = 0


# --------------------------------------------------------------------------- errors


def test_unknown_architecture() -> None:
    message = _error(overrides=["model.name=transformer9000"])
    assert "unknown architecture 'transformer9000'" in message
    assert "at model" in message
    assert "simple_cnn" in message and "resnet18" in message


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("train.epochs=0", "train.epochs"),
        ("data.val_fraction=0.7", "data.val_fraction"),
        ("train.optimizer=adam", "train.optimizer"),
        ("data.channels=2", "data.channels"),
        ("train.batch_size=many", "train.batch_size"),
    ],
)
def test_bad_values_name_the_key(override: str, where: str) -> None:
    message = _error(overrides=[override])
    assert message.startswith(f"invalid config value at {where}:"), message
    assert repr(yaml.safe_load(override.split("=", 1)[1])) in message


def test_unknown_key_is_forbidden() -> None:
    message = _error(overrides=["train.epochz=3"])
    assert "train.epochz" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_key_in_a_section_file(tmp_path: Path) -> None:
    _write(tmp_path / "model.yaml", "name: simple_cnn\ncolour: blue\n")
    assert "model.colour" in _error(directory=tmp_path)


def test_unknown_section_in_override() -> None:
    message = _error(overrides=["optimiser.lr=1"])
    assert "'optimiser.lr'" in message
    assert "data, model, train" in message


def test_unknown_section_in_preset(tmp_path: Path) -> None:
    preset = _write(tmp_path / "preset.yaml", "train:\n  epochs: 2\nserving:\n  port: 1\n")
    message = _error(preset=preset)
    assert str(preset) in message
    assert "unknown section(s) serving" in message


def test_unknown_section_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_SERVE__NOPE__X", "1")
    assert "environment FASHION_SERVE__NOPE__X" in _error()


def test_bad_value_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_SERVE__TRAIN__EPOCHS", "0")
    assert "train.epochs" in _error()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs", "override 'train.epochs' must look like section.key=value"),
        ("=3", "'' must be section.key"),
        ("train=3", "'train' must be section.key"),
        ("train.epochs.x=1", "'epochs' is not a section"),
        ("train.epochs=[1", "override 'train.epochs=[1': value is not valid YAML"),
    ],
)
def test_malformed_overrides(override: str, expected: str) -> None:
    assert expected in _error(overrides=[override])


def test_missing_preset_file(tmp_path: Path) -> None:
    missing = tmp_path / "presets" / "nope.yaml"
    assert _error(preset=missing) == f"config file not found: {missing}"


def test_invalid_yaml_in_a_section_file(tmp_path: Path) -> None:
    bad = _write(tmp_path / "train.yaml", "epochs: [1, 2\nlr: 0.1\n")
    message = _error(directory=tmp_path)
    assert message.startswith(f"config file {bad} is not valid YAML:")


def test_invalid_yaml_in_a_preset(tmp_path: Path) -> None:
    bad = _write(tmp_path / "p.yaml", "train:\n  epochs: 2\n bad-indent: [\n")
    assert f"config file {bad} is not valid YAML" in _error(preset=bad)


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("just a string\n", "str")])
def test_non_mapping_yaml(tmp_path: Path, text: str, kind: str) -> None:
    bad = _write(tmp_path / "data.yaml", text)
    assert _error(directory=tmp_path) == f"config file {bad} must hold a mapping, got {kind}"


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    preset = _write(tmp_path / "p.yaml", "train: 5\n")
    message = _error(preset=preset)
    assert message.startswith("invalid config value at train:")


# --------------------------------------------------------------------------- tracking


def test_tracking_uri_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrackingConfig(tracking_uri="http://configured:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert cfg.resolved_uri() == "http://from-env:5000"
    assert cfg.artifact_location() is None


def test_tracking_uri_from_config() -> None:
    cfg = TrackingConfig(tracking_uri="http://configured:5000")
    assert cfg.resolved_uri() == "http://configured:5000"
    assert cfg.artifact_location() is None


def test_tracking_uri_embedded_store(tmp_path: Path) -> None:
    cfg = TrackingConfig(store_dir=tmp_path / "store")
    assert cfg.resolved_uri() == f"sqlite:///{tmp_path.as_posix()}/store/mlflow.db"
    assert cfg.artifact_location() == (tmp_path / "store" / "artifacts").as_uri()
    assert cfg.artifact_location() == f"file://{tmp_path.as_posix()}/store/artifacts"


def test_tracking_relative_store_is_under_the_project() -> None:
    cfg = TrackingConfig(store_dir=Path("mlflow"))
    assert cfg.resolved_uri() == f"sqlite:///{PROJECT_ROOT.as_posix()}/mlflow/mlflow.db"
    assert cfg.artifact_location() == (PROJECT_ROOT / "mlflow" / "artifacts").as_uri()


def test_empty_env_uri_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    cfg = TrackingConfig(store_dir=tmp_path)
    assert cfg.resolved_uri().startswith("sqlite:///")
    assert cfg.artifact_location() is not None


@pytest.fixture
def leaky_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables a developer's shell might hold; requested before ``make_settings``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://leaked:1")
    monkeypatch.setenv("FASHION_SERVE__TRAIN__LR", "0.123")
    monkeypatch.setenv("FASHION_SERVE_CONFIG_DIR", "/nonexistent")


def test_make_settings_fixture_is_hermetic(
    leaky_env: None, make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = make_settings("train.batch_size=4")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not any(name.startswith("FASHION_SERVE_") for name in os.environ)
    assert settings.train.lr == load_settings().train.lr != 0.123
    assert settings.model.name == "simple_cnn"  # the fixture pins the fast baseline
    assert settings.train.epochs == 1 and settings.model.width == 4
    assert settings.train.lr == load_settings().train.lr  # configs/ was read
    assert settings.train.batch_size == 4 and settings.train.progress is False
    assert settings.data.path == tmp_path / "fmnist"
    assert settings.data.allow_download is False
    assert settings.tracking.resolved_uri() == f"sqlite:///{tmp_path.as_posix()}/mlflow/mlflow.db"
    assert settings.train.checkpoint_dir == tmp_path / "checkpoints"
    assert settings.data.stats_path == tmp_path / "artifacts" / "data_stats.json"
    assert make_settings("train.epochs=3").train.epochs == 3  # the caller's overrides win


# --------------------------------------------------------------------------- paths, imports


def test_resolve_path(tmp_path: Path) -> None:
    assert resolve_path(tmp_path) == tmp_path
    assert resolve_path(Path("models/x")) == PROJECT_ROOT / "models" / "x"


def test_config_imports_without_torch() -> None:
    code = "import sys, train.config; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_embedded_store_is_named_even_when_a_server_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``make mlflow`` and the hint after ``fit`` open the embedded store, wherever runs go now."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(store_dir=Path("mlflow"))
    assert cfg.uses_embedded_store()
    assert cfg.store_path() == PROJECT_ROOT / "mlflow"
    assert cfg.embedded_uri() == cfg.resolved_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert not cfg.uses_embedded_store()
    assert cfg.embedded_uri() == f"sqlite:///{PROJECT_ROOT.as_posix()}/mlflow/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert not TrackingConfig(
        store_dir=tmp_path, tracking_uri="http://x:5000"
    ).uses_embedded_store()
