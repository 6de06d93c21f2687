"""The model at serving time: ONNX Runtime (or eager torch for benchmarks), bytes in, predictions out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import bentoml
import numpy as np
from numpy.typing import NDArray

from common import preprocess
from common.model_format import INPUT_NAME, ONNX_FILE, OUTPUT_NAME
from serving.batching import Batcher
from serving.lineage import profiled_costs
from serving.schema import DECODE_STATUS, BadInputError, Prediction
from serving.settings import ServingConfigError, ServingSettings
from serving.telemetry import service_metrics
from serving.uploads import Upload

if TYPE_CHECKING:
    import onnxruntime as ort


Logits = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def onnx_session_options(settings: ServingSettings, largest_batch: int) -> ort.SessionOptions:
    """ONNX Runtime's session options from the serving settings.

    ``largest_batch``: the most images the service puts in one call (``onnx_memory_pattern:
    auto`` keeps per-shape memory plans only when there are few shapes).
    """
    # Imported here, in the worker: `bentoml serve`'s arbiter imports this module too, only to
    # read the service definition, and every 0.1 s of import there is cold start.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.onnx_intra_op_threads
    options.inter_op_num_threads = settings.onnx_inter_op_threads
    options.enable_mem_pattern = settings.memory_pattern_for(largest_batch)
    return options


def onnx_logits(onnx_path: Path, settings: ServingSettings, largest_batch: int) -> Logits:
    """An ONNX Runtime session on the CPU, as a function from pixels to logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(onnx_path),
        sess_options=onnx_session_options(settings, largest_batch),
        providers=["CPUExecutionProvider"],
    )

    def run(pixels: NDArray[np.float32]) -> NDArray[np.float32]:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return np.asarray(logits, dtype=np.float32)

    return run


def torch_logits(module_path: Path, settings: ServingSettings) -> Logits:
    """Eager torch on the CPU (``backend: torch``, for the ONNX-vs-torch benchmark only).

    torch is imported here and only here: the product (``backend: onnx``) and its container never
    import it.
    """
    import torch

    torch.set_num_threads(settings.onnx_intra_op_threads)
    with contextlib.suppress(RuntimeError):  # settable once per process
        torch.set_num_interop_threads(settings.onnx_inter_op_threads)
    module = torch.load(module_path, map_location="cpu", weights_only=False).eval()

    def run(pixels: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.inference_mode():
            logits: NDArray[np.float32] = module(torch.from_numpy(pixels)).float().numpy()
        return logits

    return run


class ModelRuntime:
    """The model with its classes and preprocessing: bytes in, predictions out."""

    def __init__(
        self,
        onnx_path: Path,
        class_names: Sequence[str],
        spec: preprocess.PreprocessSpec,
        settings: ServingSettings,
        ms_per_image: Mapping[int, float] | None = None,
    ) -> None:
        """``ms_per_image``: the model's cost per image by batch size, measured at import."""
        tolerance = settings.batch_cost_tolerance
        endpoints = {"predict": settings.predict, "batch_predict": settings.batch_predict}
        sizes = {
            name: batching.batch_size_for(ms_per_image, tolerance)
            for name, batching in endpoints.items()
        }
        if settings.backend == "torch":
            if settings.torch_model_path is None:
                raise ServingConfigError("backend torch needs torch_model_path")
            self.logits = torch_logits(settings.torch_model_path, settings)
        else:
            self.logits = onnx_logits(onnx_path, settings, max(sizes.values()))
        self.backend = settings.backend
        self.class_names = list(class_names)
        self.spec = spec
        self.limits = settings.limits
        self.metrics = service_metrics()
        # The first run allocates; do it before the first request.
        self.logits(self.blank(1))
        costs = dict(ms_per_image or {})
        if not costs:  # a model imported before the profile: time one image for the estimate
            started = time.perf_counter()
            self.logits(self.blank(1))
            costs[1] = (time.perf_counter() - started) * 1000
        # Batches too big to run on the event loop go to a thread, `threads` at a time.
        limiter = anyio.CapacityLimiter(settings.threads)
        #: The adaptive batcher of each API (``predict``, ``batch_predict``).
        self.batchers = {
            name: Batcher(
                self.predict,
                max_batch_size=sizes[name],
                max_latency_ms=batching.max_latency_ms,
                inline_max=settings.inline_infer_max_images,
                ms_per_image=costs.get(sizes[name], costs[min(costs)]),
                limiter=limiter,
            )
            for name, batching in endpoints.items()
        }

    @classmethod
    def from_bento_model(cls, model: bentoml.Model, settings: ServingSettings) -> ModelRuntime:
        """Load a model that :func:`train.export.import_to_bento` stored."""
        metadata = model.info.metadata
        return cls(
            Path(model.path_of(ONNX_FILE)),
            [str(name) for name in cast(list[Any], metadata["class_names"])],
            preprocess.PreprocessSpec.model_validate(metadata["preprocess"]),
            settings,
            profiled_costs(metadata),
        )

    def blank(self, count: int) -> NDArray[np.float32]:
        """``count`` black images in model-input form."""
        side = self.spec.image_size
        return np.zeros((count, self.spec.channels, side, side), dtype=np.float32)

    def prepare(
        self,
        files: Sequence[Upload],
        field_name: str,
        sizes: list[tuple[int, int]] | None = None,
    ) -> NDArray[np.float32]:
        """Decode and convert uploaded files into one model-input array.

        Args:
            files: The uploaded files.
            field_name: Their form field, for error messages.
            sizes: If given, receives each image's decoded (width, height), for drift data.

        Raises:
            BadInputError: a file that is empty, not an accepted image, truncated or too large.
        """

        def where(index: int, upload: Upload) -> str:
            return f"{field_name}[{index}]" + (f" ({upload.filename})" if upload.filename else "")

        arrays = []
        for index, upload in enumerate(files):
            started = time.perf_counter()
            try:
                image = preprocess.decode_image(
                    upload.data, self.limits.max_pixels, self.limits.draft_size
                )
            except preprocess.ImageDecodeError as exc:
                raise BadInputError(
                    DECODE_STATUS.get(exc.kind, 422), exc.kind, f"{where(index, upload)}: {exc}"
                ) from exc
            decoded = time.perf_counter()
            if sizes is not None:
                sizes.append(image.size)
            try:
                arrays.append(preprocess.prepare_image(image, self.spec))
            except Exception as exc:
                raise BadInputError(
                    422,
                    "unconvertible",
                    f"{where(index, upload)}: cannot convert {image.mode} image: {exc}",
                ) from exc
            self.metrics.decode_seconds.observe(decoded - started)
            self.metrics.preprocess_seconds.observe(time.perf_counter() - decoded)
        return preprocess.to_model_input(arrays)

    def predict(self, pixels: NDArray[np.float32]) -> list[Prediction]:
        """Run the model on ``float32 [N, C, H, W]`` pixels and describe each result."""
        started = time.perf_counter()
        logits = self.logits(pixels)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(pixels))
        probabilities = preprocess.softmax(logits)
        class_ids = probabilities.argmax(axis=1)
        names = self.class_names
        predictions = []
        confidence = self.metrics.confidence
        # model_construct: the values are ours and already typed, so validation is pure cost on
        # the hot path; the class still documents the response in the OpenAPI schema.
        construct = Prediction.model_construct
        for row, class_id in zip(probabilities.tolist(), class_ids.tolist(), strict=True):
            prediction = construct(
                label=names[class_id],
                class_id=class_id,
                confidence=row[class_id],
                scores=dict(zip(names, row, strict=True)),
            )
            prediction._batch_started = started
            predictions.append(prediction)
            confidence.observe(row[class_id])
        # One counter update per predicted class in the batch, not one per image.
        for class_id, count in enumerate(np.bincount(class_ids, minlength=len(names)).tolist()):
            if count:
                self.metrics.predictions.labels(label=names[class_id]).inc(count)
        return predictions
