"""Import a registered model into the BentoML store: ONNX export, parity check, lineage.

``python -m train import`` resolves the champion in the MLflow registry, takes the ONNX graph of
its pyfunc (:mod:`train.onnx_pyfunc`, exported at ``fit`` by :func:`export_onnx`: the TorchScript
exporter, ``dynamo=False``, dynamic batch axis; a ``pytorch`` model logged before that is exported
here), checks that ONNX Runtime agrees with torch on a real batch, and only then creates a
BentoML model holding that very ``model.onnx`` (its SHA-256 in the metadata), the class
names, the preprocessing spec and the lineage (registered name, version, run id, the run's
metrics, and the git commit: the run's ``mlflow.source.git.commit`` tag, else ``git rev-parse
HEAD``).

With validation images at hand, the model folder also gets ``reference.json``: the ONNX model's
predictions (class mix, confidence, top-2 margin) and image statistics on the validation split,
the reference that monitoring compares live traffic with (:mod:`train.monitoring`).
``python -m train reference`` adds it to a model imported without one.

Every entry is labelled with where it came from (``registered_model``, ``registered_version``,
``alias``, ``run_id``, ``git_commit``) and the service serves the newest entry of its configured
alias (:mod:`serving.lineage`). So an import reuses an existing entry only when it already is the
alias's newest one for that version; otherwise it saves a fresh entry (a new BentoML version), a
copy of an entry already stored for that registered version when there is one (no re-export), so
``promote --version N`` then ``import`` rolls the served model back. Nothing stored is deleted.

The store is the one BentoML resolves itself (public API only): ``$BENTOML_HOME/models``, default
``~/bentoml``; ``bentoml serve`` must run with the same ``BENTOML_HOME``.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import bentoml
import numpy as np
import onnx
import onnxruntime as ort
import torch
from bentoml.exceptions import NotFound
from loguru import logger
from numpy.typing import NDArray
from torch import nn

from common.drift import Reference, build_reference
from common.model_format import (
    BATCH_PROFILE,
    INPUT_NAME,
    LABEL_ALIAS,
    LABEL_COMMIT,
    LABEL_NAME,
    LABEL_RUN,
    LABEL_VERSION,
    ONNX_FILE,
    OUTPUT_NAME,
    REFERENCE_FILE,
)
from common.preprocess import PreprocessSpec, softmax, to_model_input
from serving.lineage import newest_for_alias, store_entries
from train.config import PROJECT_ROOT, ExportConfig, Settings

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ExportError(RuntimeError):
    """The model cannot be exported or imported; the message says why."""


def export_onnx(model: nn.Module, spec: PreprocessSpec, path: Path, opset: int) -> Path:
    """Export ``model`` to ONNX with input ``input`` (raw 0..255 ``float32 [N, C, H, W]``).

    Args:
        model: A :class:`train.models.Classifier` (or any module with that input contract); it is
            switched to eval mode.
        spec: The preprocessing spec, which fixes channels and image size.
        path: Where to write the ``.onnx`` file.
        opset: ONNX opset version (17 or later).

    Returns:
        ``path``.

    Raises:
        ExportError: the exporter or the ONNX checker refused the model.
    """
    model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(2, spec.channels, spec.image_size, spec.image_size, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (the dynamo one needs onnxscript).
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"ONNX export (opset {opset}) failed: {exc}") from exc
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (how the registry's and the served ONNX are compared)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_logits(onnx_path: Path, batch: NDArray[np.float32]) -> NDArray[np.float32]:
    """Run an exported model on ``batch`` with ONNX Runtime on the CPU."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    return np.asarray(outputs[0], dtype=np.float32)


def batch_profile(
    onnx_path: Path, spec: PreprocessSpec, sizes: list[int], seconds: float, rounds: int = 1
) -> dict[str, Any]:
    """ONNX Runtime's milliseconds per image at each batch size, one thread (as served).

    Each size is timed ``rounds`` times, the sizes taking turns, for ``seconds / rounds`` (and at
    least one call) a time, and keeps its fastest round: the machine's background load then
    slows every size alike instead of whichever ran during it, and the fastest round is the one
    least disturbed. The service caps adaptive batching by this profile
    (``serving.settings.BatchingSettings.batch_size_for``).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_mem_pattern = False
    session = ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    side = spec.image_size
    batches = {
        size: rng.integers(0, 256, size=(size, spec.channels, side, side)).astype(np.float32)
        for size in sorted(set(sizes))
    }
    for batch in batches.values():
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})  # the first run allocates
    fastest: dict[int, float] = {}
    for _ in range(rounds):
        for size, batch in batches.items():
            images, started = 0, time.perf_counter()
            while images == 0 or time.perf_counter() - started < seconds / rounds:
                session.run([OUTPUT_NAME], {INPUT_NAME: batch})
                images += size
            cost = (time.perf_counter() - started) * 1000 / images
            fastest[size] = min(cost, fastest.get(size, cost))
    return {
        "threads": 1,
        "rounds": rounds,
        "ms_per_image": {str(size): round(cost, 4) for size, cost in fastest.items()},
    }


def check_parity(
    model: nn.Module, onnx_path: Path, batch: NDArray[np.float32], atol: float
) -> float:
    """Compare torch and ONNX Runtime logits on ``batch``.

    Args:
        model: The torch model that was exported.
        onnx_path: The exported file.
        batch: Model input, ``float32 [N, C, H, W]`` in 0..255.
        atol: Largest accepted absolute difference.

    Returns:
        The maximum absolute difference between the two sets of logits.

    Raises:
        ExportError: the difference exceeds ``atol`` or either output is not finite.
    """
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    actual = onnx_logits(onnx_path, batch)
    if expected.shape != actual.shape:
        raise ExportError(
            f"ONNX output shape {actual.shape} differs from torch output shape {expected.shape}"
        )
    if not (np.isfinite(expected).all() and np.isfinite(actual).all()):
        raise ExportError("parity check failed: torch or ONNX logits are not finite")
    diff = float(np.abs(expected - actual).max())
    if diff > atol:
        raise ExportError(
            f"parity check failed: ONNX and torch logits differ by up to {diff:.3g} "
            f"on {batch.shape[0]} images (allowed {atol:.3g}); nothing was imported"
        )
    return diff


def without_none(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without its ``None`` entries (BentoML metadata takes no ``None``)."""
    return {key: value for key, value in values.items() if value is not None}


def lineage_labels(lineage: dict[str, Any]) -> dict[str, str]:
    """The BentoML labels of an import (``alias`` only when imported through one)."""
    labels = {
        LABEL_NAME: str(lineage["registered_name"]),
        LABEL_VERSION: str(lineage["version"]),
        LABEL_RUN: str(lineage.get("run_id") or ""),
        LABEL_COMMIT: str(lineage.get("git_commit") or "unknown"),
    }
    if lineage.get("alias"):
        labels[LABEL_ALIAS] = str(lineage["alias"])
    return labels


def reimport(stored: bentoml.Model, alias: str | None, cfg: ExportConfig) -> bentoml.Tag:
    """Save a fresh entry with ``stored``'s files, labelled as imported through ``alias`` now.

    The ONNX graph and reference are the very bytes checked (parity) at the first import.
    """
    metadata = dict(stored.info.metadata)
    lineage = {**cast(dict[str, Any], metadata.get("lineage") or {}), "alias": alias}
    lineage["reimported_from"] = str(stored.tag)
    metadata["lineage"] = without_none(lineage)
    labels = {k: v for k, v in stored.info.labels.items() if k != LABEL_ALIAS}
    if alias:
        labels[LABEL_ALIAS] = alias
    with bentoml.models.create(
        cfg.bento_model_name, labels=labels, metadata=metadata
    ) as bento_model:
        for name in (ONNX_FILE, REFERENCE_FILE):
            source = Path(stored.path_of(name))
            if source.exists():
                shutil.copyfile(source, Path(bento_model.path) / name)
    logger.info(
        "{} version {} imported again through @{} as {} (copy of {})",
        labels[LABEL_NAME],
        labels[LABEL_VERSION],
        alias,
        bento_model.tag,
        stored.tag,
    )
    return bento_model.tag


def reuse_or_copy(
    name: str, version: str, run_id: str, alias: str | None, cfg: ExportConfig
) -> bentoml.Tag | None:
    """The entry to serve for an import that needs no export: reused, or a fresh copy; else None.

    An entry is this model only when name, version and run all match: another MLflow store (a
    fresh checkout, a reset registry) numbers its own versions from 1 again. With ``alias``, an
    entry is reused only when it is the alias's newest (reusing an older one would leave another
    version served); otherwise the newest entry of this model is copied under the alias. Without,
    any entry of this model is reused.
    """
    entries = store_entries(cfg.bento_model_name)
    same = [
        m
        for m in entries
        if m.info.labels.get(LABEL_NAME) == name
        and m.info.labels.get(LABEL_VERSION) == version
        and m.info.labels.get(LABEL_RUN) == run_id
    ]
    if not same:
        return None
    newest_of_version = max(same, key=lambda m: m.creation_time)
    current = newest_for_alias(entries, alias) if alias else newest_of_version
    if current is not None and current in same:
        logger.info("{} version {} is already imported as {}", name, version, current.tag)
        return current.tag
    return reimport(newest_of_version, alias, cfg)


@dataclass(frozen=True)
class ReferenceData:
    """Validation images (model input) behind a model's monitoring reference."""

    pixels: NDArray[np.float32]
    labels: NDArray[np.int64]
    sizes: dict[str, int]
    source: str


def compute_reference(
    onnx_path: Path, class_names: list[str], data: ReferenceData, cfg: ExportConfig, seed: int = 0
) -> Reference:
    """The reference distribution: the ONNX model's outputs and the image statistics on ``data``."""
    chunk = 512  # bounds ONNX Runtime's memory on big validation sets
    logits = np.concatenate(
        [
            onnx_logits(onnx_path, data.pixels[i : i + chunk])
            for i in range(0, len(data.pixels), chunk)
        ]
    )
    return build_reference(
        softmax(logits),
        data.labels,
        data.pixels,
        class_names,
        data.sizes,
        data.source,
        cfg.reference_sample,
        seed,
    )


def import_to_bento(
    model: nn.Module,
    class_names: list[str],
    spec: PreprocessSpec,
    lineage: dict[str, Any],
    parity_batch: NDArray[np.float32],
    cfg: ExportConfig,
    reference_data: ReferenceData | None = None,
    registry_onnx: Path | None = None,
) -> bentoml.Tag:
    """Export ``model`` (or take the registry's graph), check parity, save it as a BentoML model.

    Once per registered version.

    Args:
        model: The torch classifier (raw 0..255 pixels in, logits out).
        class_names: Names of the output classes, in logit order.
        spec: The preprocessing spec the model was trained with.
        lineage: ``registered_name``, ``version``, ``alias`` (the registry alias it was imported
            through, if any), ``run_id``, ``metrics`` and ``git_commit``.
        parity_batch: Model input used to compare torch and ONNX Runtime.
        cfg: The export section of the settings.
        reference_data: Validation images for the monitoring reference (``reference.json``);
            without them the model is stored without one.
        registry_onnx: The ONNX graph logged with the registered model (the ONNX pyfunc): it is
            checked against ``model`` and stored as it is, so the registry holds the very bytes
            that are served. Without it, ``model`` is exported here.

    Returns:
        The tag of the new model; of the stored one when it already is the alias's newest entry
        for this version; or of a fresh copy of an earlier import of this version.

    Raises:
        ExportError: export or parity failed (nothing is stored), or the lineage is incomplete.
    """
    missing = [k for k in ("registered_name", "version") if not lineage.get(k)]
    if missing:
        raise ExportError(f"lineage lacks {', '.join(missing)}")
    name, version = str(lineage["registered_name"]), str(lineage["version"])
    alias = str(lineage["alias"]) if lineage.get("alias") else None
    existing = reuse_or_copy(name, version, str(lineage.get("run_id") or ""), alias, cfg)
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory(prefix="fashion-export-") as tmp:
        onnx_path = registry_onnx or export_onnx(model, spec, Path(tmp) / ONNX_FILE, cfg.opset)
        diff = check_parity(model, onnx_path, parity_batch, cfg.parity_atol)
        reference = (
            None
            if reference_data is None
            else compute_reference(onnx_path, class_names, reference_data, cfg)
        )
        profile = batch_profile(
            onnx_path,
            spec,
            cfg.batch_profile_sizes,
            cfg.batch_profile_seconds,
            cfg.batch_profile_rounds,
        )
        labels = lineage_labels(lineage)
        metadata: dict[str, Any] = {
            "class_names": list(class_names),
            "preprocess": spec.model_dump(mode="json"),
            "lineage": without_none(
                {**lineage, "registered_name": name, "version": version, "alias": alias}
            ),
            "onnx": {
                "file": ONNX_FILE,
                "input": INPUT_NAME,
                "output": OUTPUT_NAME,
                "opset": cfg.opset,
                "parity_max_abs_diff": diff,
                "parity_images": int(parity_batch.shape[0]),
                "sha256": file_sha256(onnx_path),
                "source": "registry" if registry_onnx else "exported at import",
            },
        }
        metadata[BATCH_PROFILE] = profile
        if reference is not None:
            metadata["monitoring"] = {
                "reference": REFERENCE_FILE,
                "images": reference.images,
                "accuracy": reference.accuracy,
            }
        with bentoml.models.create(
            cfg.bento_model_name,
            labels=labels,
            metadata=metadata,
        ) as bento_model:
            shutil.copyfile(onnx_path, Path(bento_model.path) / ONNX_FILE)
            if reference is not None:
                reference.save(Path(bento_model.path) / REFERENCE_FILE)
    logger.info(
        "imported {} version {} via @{} as {} (parity {:.2e})",
        name,
        version,
        alias,
        bento_model.tag,
        diff,
    )
    return bento_model.tag


def git_commit() -> str:
    """The checked-out commit of the project, or ``"unknown"`` outside a git work tree."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def parity_input(settings: Settings, spec: PreprocessSpec, num_classes: int) -> NDArray[np.float32]:
    """The first ``export.parity_batch`` test images, or seeded random images without data.

    Data is never downloaded for this, and only a few images per class are loaded. A missing or
    mismatching data set falls back to random ``uint8`` images (seeded with ``train.seed``).
    """
    from train.data import DataError, load_data

    count = settings.export.parity_batch
    shape = (spec.image_size, spec.image_size, spec.channels)
    # load_data keeps limit_per_class // 4 test images per class.
    per_class = 4 * math.ceil(count / max(1, num_classes))
    data_cfg = settings.data.model_copy(
        update={
            "allow_download": False,
            "limit_per_class": settings.data.limit_per_class or per_class,
        }
    )
    try:
        images = load_data(data_cfg).test.images[:count]
        if images.shape[1:] == shape and len(images) > 0:
            return to_model_input(list(images))
        logger.warning("test images are {}, the model wants {}", images.shape[1:], shape)
    except (DataError, OSError, ValueError) as exc:
        logger.warning("parity check uses random images: {}", exc)
    rng = np.random.default_rng(settings.train.seed)
    return to_model_input(list(rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)))


def reference_input(
    settings: Settings, spec: PreprocessSpec, num_classes: int
) -> ReferenceData | None:
    """Up to ``export.reference_images`` validation images (seeded), or None without fitting data.

    The split is the one training used (``data`` settings: ``val_fraction``, ``split_seed``);
    data is never downloaded for this.
    """
    from train.data import DataError, open_data, original_sizes

    try:
        # The loader fit used: a folder larger than memory stays on disk, read image by image.
        bundle = open_data(settings.data.model_copy(update={"allow_download": False}))
    except (DataError, OSError, ValueError) as exc:
        logger.warning("no monitoring reference: {}", exc)
        return None
    shape = (bundle.spec.image_size, bundle.spec.image_size, bundle.spec.channels)
    if shape != (spec.image_size, spec.image_size, spec.channels):
        logger.warning(
            "no monitoring reference: validation images are {}, the model wants {}",
            shape,
            (spec.image_size, spec.image_size, spec.channels),
        )
        return None
    if len(bundle.classes) != num_classes:
        logger.warning(
            "no monitoring reference: the data has {} classes, the model {}",
            len(bundle.classes),
            num_classes,
        )
        return None
    rng = np.random.default_rng(settings.train.seed)
    keep = np.sort(rng.permutation(len(bundle.val))[: settings.export.reference_images])
    try:
        images = bundle.val.read(keep)
        sizes = original_sizes(bundle)
    except (DataError, OSError) as exc:
        logger.warning("no monitoring reference: {}", exc)
        return None
    return ReferenceData(
        to_model_input(list(images)),
        bundle.val.labels[keep],
        sizes,
        f"{bundle.source} (validation split, {len(keep)} images)",
    )


def attach_reference(settings: Settings, tag: str | None = None) -> Path:
    """Compute ``reference.json`` for a model already in the BentoML store (no torch needed).

    Args:
        settings: Data settings (validation split) and export settings (sample sizes).
        tag: The BentoML model; default the served one (:func:`serving.lineage.served_tag`).

    Returns:
        The written file.

    Raises:
        ExportError: the model is not in the store or there is no usable validation data.
    """
    from serving.lineage import ServedModelError, served_tag
    from serving.settings import load_serving_settings

    cfg = settings.export
    try:
        stored = bentoml.models.get(tag or served_tag(load_serving_settings()))
    except (NotFound, ServedModelError) as exc:
        raise ExportError(f"no such model in the BentoML store: {exc}") from exc
    spec = PreprocessSpec.model_validate(stored.info.metadata["preprocess"])
    class_names = [str(n) for n in cast(list[Any], stored.info.metadata["class_names"])]
    data = reference_input(settings, spec, len(class_names))
    if data is None:
        raise ExportError("no validation images that fit the model; see the warning above")
    reference = compute_reference(Path(stored.path_of(ONNX_FILE)), class_names, data, cfg)
    path = reference.save(Path(stored.path) / REFERENCE_FILE)
    logger.info("wrote {} ({} images, accuracy {:.4f})", path, reference.images, reference.accuracy)
    return path


def _registered_version(uri: str) -> tuple[str, str, str | None]:
    """Resolve ``models:/name@alias`` or ``models:/name/version`` to (name, version, alias)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = _MODELS_URI.match(uri)
    if match is None:
        raise ExportError(
            f"model URI {uri!r} is not a registered model (use models:/<name>@<alias> "
            "or models:/<name>/<version>)"
        )
    name = match["name"]
    if match["version"]:
        return name, match["version"], None
    try:
        version = MlflowClient().get_model_version_by_alias(name, match["alias"])
    except MlflowException as exc:
        raise ExportError(f"cannot resolve {uri}: {exc.message}") from exc
    return name, str(version.version), match["alias"]


def import_champion(settings: Settings, model_uri: str | None = None) -> bentoml.Tag:
    """Import a registered model (default: the champion alias) into the BentoML store.

    Args:
        settings: All settings (tracking, registry, data for the parity batch, export).
        model_uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

    Returns:
        The BentoML model tag: the alias's current import (see :func:`import_to_bento`).

    Raises:
        ExportError: the URI cannot be resolved or loaded, lacks metadata, or fails parity.
        train.tracking.TrackingError: the tracking server is unreachable.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from train.tracking import TrackingError, connect, download_onnx, load_torch_model

    connect(settings.tracking)
    uri = model_uri or (
        f"models:/{settings.tracking.registered_model_name}@{settings.registry.champion_alias}"
    )
    name, version, alias = _registered_version(uri)
    client = MlflowClient()
    try:
        model_version = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ExportError(f"cannot load {uri}: {exc.message}") from exc
    # Before loading anything: an import of a model already in the store loads nothing.
    existing = reuse_or_copy(name, version, model_version.run_id or "", alias, settings.export)
    if existing is not None:
        return existing
    try:
        info = mlflow.models.get_model_info(uri)
        model = load_torch_model(uri)
    except MlflowException as exc:
        raise ExportError(f"cannot load {uri}: {exc.message}") from exc
    except TrackingError as exc:
        raise ExportError(f"cannot load {uri}: {exc}") from exc
    metadata = info.metadata or {}
    if "class_names" not in metadata or "preprocess" not in metadata:
        raise ExportError(
            f"{uri} lacks class_names/preprocess metadata (log it with train.tracking)"
        )
    spec = PreprocessSpec.model_validate(metadata["preprocess"])
    run_id = model_version.run_id or info.run_id or ""
    run = client.get_run(run_id) if run_id else None
    lineage: dict[str, Any] = {
        "registered_name": name,
        "version": version,
        "alias": alias,
        "model_uri": uri,
        "run_id": run_id,
        "metrics": dict(run.data.metrics) if run else {},
        "git_commit": (run.data.tags.get("mlflow.source.git.commit") if run else None)
        or git_commit(),
        "torch_version": str(torch.__version__),
    }
    with tempfile.TemporaryDirectory(prefix="fashion-registry-") as tmp:
        try:
            registry_onnx = download_onnx(uri, Path(tmp))
        except MlflowException as exc:
            raise ExportError(f"cannot download the ONNX graph of {uri}: {exc.message}") from exc
        if registry_onnx is None:
            logger.info("{} has no ONNX graph (logged before the ONNX pyfunc): exporting", uri)
        return import_to_bento(
            model,
            list(metadata["class_names"]),
            spec,
            lineage,
            parity_input(settings, spec, len(metadata["class_names"])),
            settings.export,
            reference_input(settings, spec, len(metadata["class_names"])),
            registry_onnx,
        )
