"""The BentoML service: ``POST /predict``, ``POST /batch_predict`` and ``GET /model`` on the champion.

An upload passes :class:`serving.gate.UploadGate` (API key, body limit, multipart, decode; every
client mistake a 4xx JSON answer), joins the requests that arrived while the model was busy
(:mod:`serving.batching`), and runs on ONNX Runtime in one call with them
(:mod:`serving.runtime`). Settings: ``configs/serving.yaml`` with ``FASHION_SERVE_SERVING__KEY``
overrides. Serving never imports torch or MLflow.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, cast

import bentoml
import numpy as np
from loguru import logger
from numpy.typing import NDArray

from common.alerts import load_alert_settings
from common.drift import DriftMonitor, Reference
from common.model_format import REFERENCE_FILE
from serving.balance import ConnectionBalance, RecentClients
from serving.bentoml_bridge import cancel_request_timers
from serving.gate import ApiKeyGuard, UploadGate
from serving.lineage import model_info, served_tag
from serving.openapi import service_document
from serving.runtime import ModelRuntime
from serving.schema import (
    BatchPredictInput,
    BatchPredictOutput,
    PredictInput,
    Prediction,
    PredictOutput,
)
from serving.settings import load_serving_settings
from serving.telemetry import PredictionRecorder, configure_logging, service_metrics

SETTINGS = load_serving_settings()
ALERTS = load_alert_settings()
SERVED_TAG = served_tag(SETTINGS)
# Before BentoML builds the app: its per-request timeout timers are cancelled when answered.
cancel_request_timers()
# `bentoml serve` imports this module before it spawns the workers, so they inherit the cap on
# glibc's malloc arenas (flat memory under load, docs/soak.md); an explicit environment wins.
if SETTINGS.malloc_arena_max is not None:
    os.environ.setdefault("MALLOC_ARENA_MAX", str(SETTINGS.malloc_arena_max))


@bentoml.service(
    image=bentoml.images.Image(base_image=SETTINGS.image_base, distro="none")
    if SETTINGS.image_base
    else None,
    workers=SETTINGS.workers,
    threads=SETTINGS.threads,
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    logging={"access": {"enabled": SETTINGS.access_log}},
    tracing={"excluded_urls": SETTINGS.tracing_excluded_urls},
)
class Classifier:
    """Image classifier: the current import of the configured alias on ONNX Runtime."""

    # Resolved at import, so `bentoml build` packages exactly this entry (serving.lineage).
    model_ref = bentoml.models.BentoModel(SERVED_TAG)

    def __init__(self) -> None:
        configure_logging(SETTINGS.logging)
        stored = cast(bentoml.Model, self.model_ref)
        self.runtime = ModelRuntime.from_bento_model(stored, SETTINGS)
        self.lineage = model_info(stored)  # GET /model (serving.gate)
        self.clients = RecentClients()  # one client: nothing can join its batch (serving.gate)
        # BentoML gives each `bentoml serve` its own PROMETHEUS_MULTIPROC_DIR, shared by its workers.
        self.balance = ConnectionBalance.for_worker(
            os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
            SETTINGS.workers,
            bentoml.server_context.worker_index,
            SETTINGS.connection_balance_margin,
            self.clients,
        )
        self.recorder = PredictionRecorder(
            service_metrics(),
            prediction_data=SETTINGS.logging.predictions.enabled,
            drift_min_predictions=ALERTS.rules.drift.min_predictions,
        )
        log = logger.bind(logger="fashion_serve", model=str(stored.tag))
        reference_path = Path(stored.path_of(REFERENCE_FILE))
        if reference_path.exists():
            self.recorder.drift = DriftMonitor(Reference.load(reference_path), ALERTS.drift)
        else:
            log.warning(
                "no {}: drift gauges are off (python -m train reference adds one)", REFERENCE_FILE
            )
        log.info(
            "serving {} = {} version {} via @{} ({} classes)",
            stored.tag,
            self.lineage.registered_model,
            self.lineage.version,
            self.lineage.alias,
            len(self.runtime.class_names),
        )
        if SETTINGS.gc_freeze_after_load:
            # What is alive now lives as long as the worker; frozen, full collections skip it.
            gc.collect()
            gc.freeze()

    @bentoml.api(input_spec=PredictInput, output_spec=PredictOutput)  # type: ignore[untyped-decorator]
    async def predict(self, image: NDArray[np.float32]) -> list[Prediction]:
        """Classify one image (multipart file field ``image``); concurrent calls are batched."""
        return await self.runtime.batchers["predict"](image)

    @bentoml.api(input_spec=BatchPredictInput, output_spec=BatchPredictOutput)  # type: ignore[untyped-decorator]
    async def batch_predict(self, images: NDArray[np.float32]) -> list[Prediction]:
        """Classify several images (repeated multipart file field ``images``), in order."""
        return await self.runtime.batchers["batch_predict"](images)


# The decorator made Classifier a bentoml.Service, which mypy cannot see. The guard is built
# here, at import, so `bentoml serve` stops at once when auth is on without a key.
service_any: Any = Classifier
service_any.add_asgi_middleware(
    UploadGate,
    guard=ApiKeyGuard(SETTINGS.auth, os.environ),
    # GET /docs.json: BentoML's document with every status and constraint of the gate.
    openapi=lambda auth_paths: service_document(
        service_any, max_images=SETTINGS.limits.max_images_per_batch, auth_paths=auth_paths
    ),
)
