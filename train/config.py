"""Typed settings for every stage, loaded from ``configs/*.yaml`` with overrides.

Precedence, lowest first:

1. ``configs/<section>.yaml`` (one file per section: data, model, train, tracking, registry, export, sweep);
2. an optional preset file (``--config configs/presets/best.yaml``) holding any sections;
3. environment variables ``FASHION_SERVE__<SECTION>__<KEY>=value`` (and ``MLFLOW_TRACKING_URI``);
4. command-line ``section.key=value`` overrides.

Every problem is reported as :class:`ConfigError` with one line naming the file or key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from common.preprocess import Resample
from common.settings import (
    PROJECT_ROOT,
    SettingsError,
    config_dir,
    env_overrides,
    parse_value,
    read_yaml_mapping,
    resolve_path,
    set_nested,
    validate,
)

__all__ = ["PROJECT_ROOT", "config_dir", "resolve_path"]  # re-exported for train's modules
ENV_PREFIX = "FASHION_SERVE__"
SECTIONS = ("data", "model", "train", "tracking", "registry", "export", "sweep")

AugmentationName = Literal["none", "flip", "standard", "strong"]
DataSource = Literal["fashion_mnist", "image_folder"]
DeviceName = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]
#: What ``data.augmentation: auto`` means per source. A mirrored Fashion-MNIST garment is the
#: same garment; in an arbitrary image folder the mirror image may be another class (arrows
#: pointing left or right, text, road signs), so nothing flips there unless asked.
DEFAULT_AUGMENTATION: dict[str, AugmentationName] = {
    "fashion_mnist": "flip",
    "image_folder": "none",
}
#: What ``data.upload_variation: auto`` means per source. Fashion-MNIST's 28×28 images are
#: served mostly as larger photos, which training must see; an image folder's files already went
#: through the serving path's decode and resize when loaded.
DEFAULT_UPLOAD_VARIATION: dict[str, float] = {"fashion_mnist": 0.25, "image_folder": 0.0}


#: A configuration problem, with a one-line message that names where it is.
ConfigError = SettingsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where images come from and how they are split."""

    source: DataSource = "fashion_mnist"
    path: Path | None = Field(None, description="Fashion-MNIST idx folder or ImageFolder root.")
    debian_path: Path = Path("/usr/share/datasets/fashion-mnist")
    download_root: Path = Path("data/downloads")
    allow_download: bool = True
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="ImageFolder without test/ only.")
    split_seed: int = 42
    image_size: int = Field(28, ge=8, le=512, description="ImageFolder images are resized to this.")
    channels: Literal[1, 3] = 1
    resample: Resample = Field(
        "lanczos", description="Filter that shrinks images to image_size, in training and serving."
    )
    limit_per_class: int | None = Field(None, ge=1, description="Subsample for quick runs.")
    upload_variation: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of training images replaced by a photo-like upload of themselves "
        "(larger, RGB, JPEG, shrunk back by the serving path). 'auto' (also when not given) is "
        "the source's DEFAULT_UPLOAD_VARIATION.",
    )
    upload_sides: tuple[int, int] = Field((64, 640), description="Upload side range, pixels.")
    upload_jpeg_quality: tuple[int, int] = Field((70, 95), description="JPEG quality range.")
    augmentation: AugmentationName = Field(
        "flip",
        description="Training augmentation preset. 'auto' (also when not given) is replaced "
        "while validating by the source's DEFAULT_AUGMENTATION, so the value is a preset name.",
    )
    loader: Literal["memory", "stream", "auto"] = Field(
        "auto",
        description="ImageFolder: decode everything into memory, stream batches from the files "
        "through DataLoader workers, or auto: stream when the decoded images would exceed "
        "memory_budget_mb. Fashion-MNIST is always in memory.",
    )
    memory_budget_mb: float = Field(
        4096, gt=0, description="Decoded ImageFolder size above which loader auto streams."
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (stream loader).")
    stats_sample_images: int = Field(
        2000, ge=1, description="Training images the stream loader samples for mean/std."
    )
    imbalance_ratio_warning: float = Field(
        3.0, gt=1.0, description="train data: flag largest/smallest class count above this."
    )
    min_class_images: int = Field(
        20, ge=1, description="train data: flag classes with fewer training images."
    )
    stats_path: Path = Path("artifacts/data_stats.json")
    max_image_pixels: int = Field(40_000_000, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _source_defaults(cls, data: Any) -> Any:
        """``auto`` (or nothing given) becomes the source's default augmentation and variation."""
        if not isinstance(data, dict):
            return data
        source = str(data.get("source", "fashion_mnist"))
        if data.get("augmentation", "auto") == "auto":
            data = {**data, "augmentation": DEFAULT_AUGMENTATION.get(source, "none")}
        if data.get("upload_variation", "auto") == "auto":
            data = {**data, "upload_variation": DEFAULT_UPLOAD_VARIATION.get(source, 0.0)}
        return data

    @field_validator("upload_sides", "upload_jpeg_quality")
    @classmethod
    def _ordered_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1]:
            raise ValueError("must be [low, high] with 1 <= low <= high")
        return value

    @field_validator("augmentation", mode="before")
    @classmethod
    def _known_augmentation(cls, value: Any) -> Any:
        if value not in get_args(AugmentationName):
            names = ", ".join(("auto", *get_args(AugmentationName)))
            raise ValueError(f"must be one of {names}")
        return value


class ModelConfig(_Section):
    """Which architecture to build, and its weights."""

    name: str = "resnet_small"
    pretrained: bool = False
    weights_path: Path | None = Field(None, description="Local weights file (e.g. torchvision).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    width: int = Field(32, ge=4, le=256, description="Base channel count for the CNNs.")
    input_size: int | None = Field(
        None, ge=16, le=512, description="Upscale inputs to this size inside the network."
    )
    flip_tta: bool | Literal["auto"] = Field(
        "auto",
        description="In eval mode average the logits of the image and its mirror image "
        "(inside the network, so the exported model does the same). 'auto' = on exactly when "
        "the training augmentation flips images (a model never shown mirrored images should "
        "not be asked about them).",
    )

    @field_validator("flip_tta", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError("must be auto, true or false")

    def resolved_flip_tta(self, trained_with_flips: bool) -> bool:
        """Whether flip TTA is on for a model trained with (or without) horizontal flips."""
        if self.flip_tta == "auto":
            return trained_with_flips
        return self.flip_tta


class TrainConfig(_Section):
    """Optimisation, checkpointing and stopping."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    scheduler: Literal["onecycle", "cosine", "none"] = "onecycle"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    early_stopping_patience: int = Field(5, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    early_stopping_lr_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Epochs without improvement count while a schedule lowers the learning rate "
        "and has it at most this share of train.lr (scheduler none: always).",
    )
    seed: int = 0
    num_threads: int | None = Field(None, ge=1, description="torch threads; None = all cores.")
    channels_last: bool = False
    device: DeviceName = Field(
        "auto", description="auto (CUDA when available, else the CPU) | cpu | cuda"
    )
    precision: Precision = Field(
        "fp32", description="fp32 | bf16 | fp16 (autocast, CUDA only; fp16 with a GradScaler)"
    )
    checkpoint_dir: Path = Path("models/checkpoints")
    max_misclassified: int = Field(36, ge=0)
    progress: bool = True


class TrackingConfig(_Section):
    """MLflow: embedded sqlite store by default, a server when a URI is given.

    The embedded store is ``<store_dir>/mlflow.db`` with ``<store_dir>/artifacts/``, not MLflow 3's
    own default (``./mlflow.db``): plain ``mlflow ui`` does not open it; ``make mlflow`` or
    ``mlflow ui --backend-store-uri <embedded_uri()>`` does.
    """

    tracking_uri: str | None = Field(None, description="None = embedded store below.")
    store_dir: Path = Path("mlflow")
    experiment_name: str = "fashion-serve"
    registered_model_name: str = "fashion-classifier"
    connect_timeout_s: float = Field(5.0, gt=0.0)
    report_experiments: list[str] = Field(
        default_factory=list, description="More experiments for the README's model table."
    )

    def resolved_uri(self) -> str:
        """The tracking URI in force: env var, then config, then the embedded sqlite store."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking_uri:
            return self.tracking_uri
        return self.embedded_uri()

    def uses_embedded_store(self) -> bool:
        """True when no server URI (environment or config) replaces the embedded store."""
        return not (os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri)

    def store_path(self) -> Path:
        """The embedded store's folder (``store_dir``, relative to the project root)."""
        return resolve_path(self.store_dir)

    def embedded_uri(self) -> str:
        """The embedded sqlite store's URI (absolute, so it works from any directory)."""
        return f"sqlite:///{(self.store_path() / 'mlflow.db').as_posix()}"

    def artifact_location(self) -> str | None:
        """Artifact root for a new experiment in the embedded store (a server picks its own)."""
        if not self.uses_embedded_store():
            return None
        return (self.store_path() / "artifacts").as_uri()


class RegistryConfig(_Section):
    """How ``promote`` chooses the champion."""

    metric: str = "val_accuracy"
    floor: float = Field(0.85, ge=0.0, le=1.0)
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    max_runs: int = Field(1000, ge=1)


class ExportConfig(_Section):
    """How ``import`` turns a registered model into a BentoML model."""

    bento_model_name: str = "fashion-classifier"
    opset: int = Field(17, ge=17)
    parity_atol: float = Field(1e-4, gt=0.0)
    parity_batch: int = Field(64, ge=1)
    reference_images: int = Field(
        5000, ge=1, description="Validation images behind the monitoring reference distribution."
    )
    reference_sample: int = Field(
        2000, ge=10, description="Values per feature kept in reference.json (histograms, KS)."
    )
    batch_profile_sizes: list[PositiveInt] = Field(
        [1, 2, 4, 8, 16, 32, 64],
        min_length=1,
        description="Batch sizes whose ONNX Runtime cost per image import records (the service "
        "batches no larger than the cheapest of them).",
    )
    batch_profile_seconds: float = Field(
        0.3, gt=0, le=10, description="Timing per batch size when profiling at import."
    )
    batch_profile_rounds: PositiveInt = Field(
        1,
        le=100,
        description="The sizes take turns this many times, each keeping its fastest round.",
    )


class SweepConfig(_Section):
    """Hyper-parameter sweep: a grid (or a random sample of it) under a budget."""

    strategy: Literal["grid", "random"] = "grid"
    architectures: list[str] = Field(default_factory=lambda: ["simple_cnn", "resnet_small"])
    lrs: list[float] = Field(default_factory=lambda: [0.05, 0.1])
    batch_sizes: list[int] = Field(default_factory=lambda: [128])
    optimizers: list[Literal["sgd", "adamw"]] = Field(default_factory=lambda: ["sgd"])  # type: ignore[arg-type]
    max_runs: int = Field(8, ge=1)
    time_budget_minutes: float = Field(60.0, gt=0.0)
    seed: int = 0
    overrides: dict[str, Any] = Field(default_factory=dict, description="Applied to every run.")


class Settings(_Section):
    """All sections together."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @field_validator("model")
    @classmethod
    def _known_architecture(cls, value: ModelConfig) -> ModelConfig:
        from train.models import ARCHITECTURES  # local: keeps config importable without torch

        if value.name not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture '{value.name}' (known: {', '.join(sorted(ARCHITECTURES))})"
            )
        return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise ConfigError(
            f"{origin}: '{dotted}' must be section.key with section one of {', '.join(SECTIONS)}"
        )
    set_nested(tree, parts, value, origin)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML (so ``3``, ``true``, ``[1,2]`` work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), parse_value(raw, f"override '{text}'")


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    preset: Path | None = None,
    overrides: list[str] | None = None,
    directory: Path | None = None,
) -> Settings:
    """Build :class:`Settings` from section files, a preset, environment and overrides.

    Args:
        preset: Optional YAML file whose top-level keys are section names.
        overrides: ``section.key=value`` strings, applied last.
        directory: Folder of section files; defaults to :func:`config_dir`.

    Raises:
        ConfigError: a missing or malformed file, an unknown key or an invalid value.
    """
    folder = directory or config_dir()
    tree: dict[str, Any] = {}
    for section in SECTIONS:
        file = folder / f"{section}.yaml"
        if file.exists():
            tree[section] = read_yaml_mapping(file)
    if preset is not None:
        preset_tree = read_yaml_mapping(preset)
        unknown = set(preset_tree) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{preset}: unknown section(s) {', '.join(sorted(unknown))}")
        tree = _deep_merge(tree, preset_tree)
    for keys, value, name in env_overrides(ENV_PREFIX, os.environ):
        _set_dotted(tree, ".".join(keys), value, f"environment {name}")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"override '{text}'")
    return validate(Settings, tree, "config value")
