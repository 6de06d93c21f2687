"""Serving settings: ``configs/serving.yaml`` with ``FASHION_SERVE_SERVING__KEY`` overrides.

Models only, and the one call that loads them; importing this module reads nothing and imports
no BentoML, so training's ``alerts`` command, containers and benchmarks use it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.settings import PROJECT_ROOT, SettingsError, load_settings_file

ENV_PREFIX = "FASHION_SERVE_SERVING__"
#: ``configs/serving.yaml`` or an override is wrong; the message names the key.
ServingConfigError = SettingsError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogFileSettings(_Strict):
    """One JSON-lines file written by every worker process."""

    enabled: bool = True
    path: str = Field(
        description="File name; '{worker}' becomes the BentoML worker id (the pid outside a worker)."
    )
    rotation: str = Field(description="loguru rotation, e.g. '100 MB' or '1 day'.")
    retention: str = Field(description="loguru retention, e.g. '7 days' or '10 files'.")
    compression: str | None = Field(None, description="e.g. 'gz' for rotated files.")
    flush_interval_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description=(
            "Seconds between batched writes: requests append their lines in memory and a "
            "background thread writes them together; 0 writes each line in the request."
        ),
    )

    def for_worker(self, worker: str) -> Path:
        """The file of one worker; relative paths are below the project root."""
        path = Path(self.path.replace("{worker}", worker))
        return path if path.is_absolute() else PROJECT_ROOT / path

    def pattern(self) -> str:
        """A glob matching every worker's file, rotated ones included."""
        return str(self.for_worker("*")) + "*"


class LoggingSettings(_Strict):
    """The ``logging`` section of ``configs/serving.yaml``."""

    level: str = Field(pattern=r"^(TRACE|DEBUG|INFO|SUCCESS|WARNING|ERROR|CRITICAL)$")
    stream: Literal["stdout", "stderr", "none"] = Field(
        description="Where JSON log lines go besides the file."
    )
    file: LogFileSettings = Field(description="Every log line (request lines included) as JSON.")
    predictions: LogFileSettings = Field(description="One JSON line per prediction, for drift.")


class BatchingSettings(_Strict):
    """Adaptive batching of one endpoint."""

    max_batch_size: int = Field(
        ge=1, description="Most images in one model call (1 turns batching off, for benchmarks)."
    )
    max_latency_ms: int = Field(
        gt=0, description="Estimated queue wait after which the service answers 503 overloaded."
    )

    fit_to_model: bool = Field(
        True,
        description="Cap max_batch_size by the model's measured cost per image (recorded at "
        "import): batch no larger than the model still runs as cheaply per image as it can.",
    )

    def batch_size_for(self, ms_per_image: Mapping[int, float] | None, tolerance: float) -> int:
        """The largest profiled batch size within ``tolerance`` of the cheapest per image, and
        no dearer per image than the smallest profiled size.

        A big network on a CPU runs each image slower in a large batch (its activations leave
        the cache), a small one faster; batching beyond the cheapest size only costs throughput,
        and a batch dearer than one image at a time would make batching a loss. Without a
        profile (or with ``fit_to_model`` off) it is ``max_batch_size``.
        """
        if not self.fit_to_model or not ms_per_image:
            return self.max_batch_size
        sizes = {size: cost for size, cost in ms_per_image.items() if size <= self.max_batch_size}
        if not sizes:
            return self.max_batch_size
        cheapest = min(sizes.values())
        alone = sizes[min(sizes)]
        return max(
            size
            for size, cost in sizes.items()
            if cost <= cheapest * (1 + tolerance) and cost <= alone
        )


class LimitSettings(_Strict):
    """What one request may hold."""

    max_upload_bytes: int = Field(ge=1)
    max_pixels: int = Field(ge=1, description="Width * height of one image.")
    max_images_per_batch: int = Field(ge=1)
    draft_size: int | None = Field(None, ge=1, description="JPEG reduced-size decoding target.")
    inline_decode_max_bytes: int = Field(
        ge=0, description="Bodies up to this size are decoded on the event loop."
    )


class AuthSettings(_Strict):
    """Optional API key for the prediction endpoints (off by default)."""

    enabled: bool = False
    key_env: str = Field(
        "FASHION_SERVE_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the key; the key is never in a file or a log.",
    )
    header: str = Field(
        "x-api-key",
        pattern=r"^[A-Za-z0-9-]+$",
        description="Request header carrying the key (``Authorization: Bearer`` works too).",
    )
    min_key_length: int = Field(16, ge=1, description="Shorter keys refuse to start.")
    protect_health: bool = Field(False, description="Also require the key on /livez, /readyz.")
    protect_metrics: bool = Field(False, description="Also require the key on /metrics.")


class ServingSettings(_Strict):
    """Everything ``service.py`` reads from ``configs/serving.yaml``."""

    model_name: str = Field(
        "fashion-classifier", description="BentoML model name (export.bento_model_name)."
    )
    model_alias: str = Field(
        "champion",
        description="Serve the store's current import of this registry alias "
        "(python -m train import through models:/<name>@<alias>).",
    )
    model_tag: str | None = Field(
        None,
        description="Pin an explicit BentoML model (name:version) instead of the alias's import.",
    )
    workers: int = Field(ge=1)
    threads: int = Field(ge=1)
    onnx_intra_op_threads: int = Field(ge=1)
    onnx_inter_op_threads: int = Field(ge=1)
    onnx_memory_pattern: bool | Literal["auto"] = Field(
        "auto",
        description="ONNX Runtime's per-input-shape memory plan cache (enable_mem_pattern). "
        "Every batch size is a new shape and the cache grows for as long as new sizes turn up; "
        "auto keeps it only when the largest batch is at most memory_pattern_max_batch.",
    )
    memory_pattern_max_batch: int = Field(
        8, ge=1, description="onnx_memory_pattern auto: the most batch sizes worth a plan each."
    )
    backend: Literal["onnx", "torch"] = Field(
        "onnx", description="onnx (the product) or torch (eager, for benchmarks; needs torch)."
    )
    torch_model_path: Path | None = Field(
        None,
        description="A torch.save'd nn.Module, the same model as the served one (backend torch).",
    )
    inline_infer_max_images: int = Field(
        0,
        ge=0,
        description="Batches up to this size run on the event loop (no thread hop); larger in a "
        "worker thread so request parsing goes on meanwhile.",
    )
    connection_balance_margin: int = Field(
        2,
        ge=0,
        description="A worker with this many more requests in flight than the least busy "
        "worker closes the connection after answering, so the client reconnects to a freer one "
        "(serving.balance); 0 = off.",
    )
    predict: BatchingSettings
    batch_predict: BatchingSettings
    batch_cost_tolerance: float = Field(
        0.05,
        ge=0,
        le=1,
        description="fit_to_model: a batch size counts as cheapest when its cost per image is "
        "within this share of the cheapest measured.",
    )
    timeout_s: float = Field(gt=0)
    max_concurrency: int = Field(ge=1)
    limits: LimitSettings
    tracing_excluded_urls: list[str] = Field(
        description="URL patterns without OpenTelemetry spans (spans cost per request)."
    )
    logging: LoggingSettings
    access_log: bool
    auth: AuthSettings = AuthSettings()
    gc_freeze_after_load: bool = Field(
        True,
        description="gc.freeze() once the model is loaded: the garbage collector's full passes "
        "stop rescanning the objects that live as long as the worker (p99 under load).",
    )
    malloc_arena_max: int | None = Field(
        None,
        ge=1,
        description="MALLOC_ARENA_MAX for the worker processes (glibc); None leaves glibc's default.",
    )
    image_base: str | None = Field(
        None,
        description="Container base image for `bentoml build` (python3 and uv inside); "
        "None = BentoML's standard image for bentofile.yaml's python version.",
    )

    def memory_pattern_for(self, largest_batch: int) -> bool:
        """Whether ONNX Runtime keeps a memory plan per batch size, for batches up to this many."""
        if self.onnx_memory_pattern == "auto":
            return largest_batch <= self.memory_pattern_max_batch
        return self.onnx_memory_pattern


def load_serving_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> ServingSettings:
    """``serving.yaml`` (or ``path``) with ``FASHION_SERVE_SERVING__A__B=value`` overrides.

    Raises:
        ServingConfigError: a missing or malformed file, or an unknown key or invalid value.
    """
    return load_settings_file(
        ServingSettings, "serving.yaml", ENV_PREFIX, path=path, environ=environ
    )
