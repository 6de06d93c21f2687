"""The training loop: ``train_one_epoch``, ``evaluate``, checkpoints, resume and early stopping.

Knows nothing of MLflow: :func:`fit` reports each epoch through a callback. A checkpoint is one
dict (model, optimizer, scheduler, epoch, RNG states, early-stopping state, best weights), written
atomically; the previous checkpoint is kept beside it so a crash mid-write never loses both.
"""

from __future__ import annotations

import copy
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from loguru import logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from train.config import Precision, TrainConfig
from train.data import BatchSource, StreamBatches, iterate_batches
from train.device import Placement, fits_on_device, resolve_placement, to_device
from train.distributed import SINGLE, DistributedContext, current
from train.transforms import AugmentationPreset, augment_batch

LAST = "last.pt"
PREVIOUS = "previous.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names the file."""


@dataclass
class EpochMetrics:
    """What one epoch measured."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    epoch_seconds: float
    images_per_second: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items() if k != "epoch"}


@dataclass
class EvalResult:
    """Loss, accuracy, and per-image predictions and probabilities."""

    loss: float
    accuracy: float
    predictions: np.ndarray
    probabilities: np.ndarray


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    epoch: int = 0  # epochs completed
    best_metric: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


def set_seed(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator used for shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW; no weight decay on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-batch schedule over the whole run."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "onecycle" and total >= 3:
        # OneCycleLR divides by the length of each phase: keep the warm-up at least 1.5 steps.
        warmup = min(0.5, max(0.25, 1.5 / total))
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=warmup
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def settled(lr_at_start: float, lr_at_end: float, cfg: TrainConfig) -> bool:
    """Whether an epoch counts toward early stopping: the schedule lowered the learning rate
    through it and has brought it to ``early_stopping_lr_fraction`` of its peak or below.

    While a schedule warms up or still holds the rate high, validation accuracy dips and recovers
    as it falls, so a stall then says nothing about convergence.
    """
    if cfg.scheduler == "none":
        return True
    return lr_at_end < lr_at_start and lr_at_end <= cfg.early_stopping_lr_fraction * cfg.lr


def make_training_parts(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, nn.Module]:
    """What :func:`fit` trains ``model`` with: the optimizer, its per-batch schedule, the loss."""
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    return optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def _device(device: torch.device | str | None) -> torch.device | None:
    return None if device is None else torch.device(device)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    data: BatchSource,
    cfg: TrainConfig,
    preset: AugmentationPreset,
    generator: torch.Generator,
    description: str = "train",
    device: torch.device | str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    context: DistributedContext = SINGLE,
    augment_generator: torch.Generator | None = None,
) -> tuple[float, float, int]:
    """One pass over the training images (this process's shard of them), in a shuffled order
    drawn from ``generator``.

    The order and the augmentation's random numbers always come from ``generator``, a CPU
    generator, so a run draws the same wherever it trains. Images held on the CPU are augmented
    there and only the augmented ``uint8`` batch travels to ``device`` (through pinned memory,
    non-blocking, on CUDA); images already on ``device`` (:func:`place_data`) never leave it.

    Args:
        model: The network, in ``device``'s memory (and channels_last if ``cfg`` says so).
        optimizer: Steps once per batch.
        scheduler: Steps once per batch.
        criterion: The loss, ``criterion(logits, labels)``.
        data: ``(uint8 images [N, C, H, W], int64 labels [N])``, on the CPU or on ``device``,
            or :class:`~train.data.StreamBatches` (whose own sampler orders them).
        cfg: Batch size, channels_last, precision and the progress bar setting.
        preset: Augmentation applied to each batch.
        generator: Seeded CPU generator for the order and the augmentation.
        description: Label of the progress bar.
        device: Where the forward and backward passes run; ``None`` = the CPU, with no copies.
        scaler: The gradient scaler of ``fp16`` training (:meth:`Placement.grad_scaler`).
        context: Under ``torchrun``, which shard of the order this process trains on.
        augment_generator: Draws the augmentation instead of ``generator`` (a per-rank one
            under ``torchrun``, while ``generator`` draws the order all ranks share).

    Returns:
        ``(mean loss, accuracy, images seen)`` over the epoch, on this process.

    Raises:
        DeviceError: ``cfg.precision`` is not available on ``device``.
    """
    target = _device(device)
    placement = Placement(target or torch.device("cpu"), cfg.precision)
    model.train()
    # Sums stay on the device: reading them back every batch would wait for the GPU each time.
    total_loss = torch.zeros((), dtype=torch.float64, device=target)
    correct = torch.zeros((), dtype=torch.int64, device=target)
    seen = 0
    show = cfg.progress and sys.stderr.isatty() and context.is_main
    batches, steps = batches_of(data, cfg.batch_size, generator, context)
    for batch_images, batch_labels in tqdm(
        batches, total=steps, desc=description, disable=not show, leave=False
    ):
        inputs = augment_batch(batch_images, preset, augment_generator or generator)
        # uint8 crosses to the device (a quarter of float32's bytes) and becomes float there.
        inputs = to_device(inputs, target, pin=True)
        batch_labels = to_device(batch_labels, target, pin=True)
        inputs = inputs.float()
        if cfg.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with placement.autocast():
            logits = model(inputs)
            loss = criterion(logits, batch_labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        n = int(batch_labels.shape[0])
        total_loss += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == batch_labels).sum()
        seen += n
    return float(total_loss) / max(seen, 1), int(correct) / max(seen, 1), seen


def batches_of(
    data: BatchSource,
    batch_size: int,
    generator: torch.Generator | None = None,
    context: DistributedContext = SINGLE,
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int]:
    """This process's batches of ``data`` (shuffled by ``generator`` when tensors) and how many.

    Tensors are sharded by ``context``; streamed batches already are, by their sampler.
    """
    if isinstance(data, StreamBatches):
        return data, len(data)
    images, labels = data
    steps = (context.shard_size(int(labels.shape[0])) + batch_size - 1) // batch_size
    return iterate_batches(images, labels, batch_size, generator, context), steps


@overload
def place_data(
    data: tuple[torch.Tensor, torch.Tensor], device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def place_data(data: StreamBatches, device: torch.device | str | None) -> StreamBatches: ...
def place_data(data: BatchSource, device: torch.device | str | None) -> BatchSource:
    """``(images, labels)`` moved to ``device`` once when it is a GPU they fit on, else unchanged.

    On the GPU a batch is then an index into device memory: no host-to-device copy per batch.
    Data that does not fit (:func:`train.device.fits_on_device`) stays on the CPU and each batch
    is copied through pinned memory. Streamed batches are returned unchanged.
    """
    target = _device(device)
    if target is None or target.type != "cuda" or isinstance(data, StreamBatches):
        return data
    images, labels = data
    nbytes = images.numel() * images.element_size() + labels.numel() * labels.element_size()
    if not fits_on_device(nbytes, target):
        logger.info("data ({:.0f} MB) stays on the CPU: too big for {}", nbytes / 1e6, target)
        return data
    return images.to(target), labels.to(target)


@dataclass
class Trainer:
    """``model`` with what :func:`fit` trains it with: the parts of :func:`make_training_parts`
    for ``steps_per_epoch`` batches an epoch, ``preset`` and ``generator``, on ``device`` in
    ``cfg.precision`` (with a gradient scaler for ``fp16``). Under ``torchrun``, ``model`` is
    the ``DistributedDataParallel`` wrapper and ``context`` says which shard this process trains.

    :func:`fit`, the recipe search and the tests train and validate through it, so they run the
    same sequence.

    Raises:
        DeviceError: ``cfg.precision`` is not available on ``device`` (e.g. bf16 on the CPU).
    """

    model: nn.Module
    cfg: TrainConfig
    preset: AugmentationPreset
    generator: torch.Generator
    steps_per_epoch: int
    device: torch.device | str | None = None
    context: DistributedContext = SINGLE
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler = field(init=False)
    criterion: nn.Module = field(init=False)
    placement: Placement = field(init=False)
    scaler: torch.amp.GradScaler | None = field(init=False)

    def __post_init__(self) -> None:
        self.placement = Placement(_device(self.device) or torch.device("cpu"), self.cfg.precision)
        self.scaler = self.placement.grad_scaler()
        self.optimizer, self.scheduler, self.criterion = make_training_parts(
            self.model, self.cfg, self.steps_per_epoch
        )

    def epoch(
        self,
        data: BatchSource,
        description: str = "train",
        augment_generator: torch.Generator | None = None,
    ) -> tuple[float, float, int]:
        """:func:`train_one_epoch` over ``data``: mean loss, accuracy, images seen."""
        return train_one_epoch(
            self.model,
            self.optimizer,
            self.scheduler,
            self.criterion,
            data,
            self.cfg,
            self.preset,
            self.generator,
            description=description,
            device=self.device,
            scaler=self.scaler,
            context=self.context,
            augment_generator=augment_generator,
        )

    def evaluate(self, data: BatchSource) -> EvalResult:
        """:func:`evaluate` with the settings' batch size, memory format and precision."""
        return evaluate(
            self.model,
            data,
            self.cfg.eval_batch_size,
            self.cfg.channels_last,
            device=self.device,
            precision=self.cfg.precision,
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: BatchSource,
    batch_size: int,
    channels_last: bool = False,
    device: torch.device | str | None = None,
    precision: Precision = "fp32",
) -> EvalResult:
    """Loss, accuracy and per-image outputs on a fixed set (no augmentation), in order.

    Args:
        model: The network, in ``device``'s memory; put in eval mode here.
        data: ``(uint8 images [N, C, H, W], int64 labels [N])``, on the CPU or on ``device``,
            or unshuffled :class:`~train.data.StreamBatches`.
        batch_size: Images per forward pass (of tensors; streamed batches have their own).
        channels_last: Feed the inputs in channels_last memory format.
        device: Where the forward passes run; ``None`` = the CPU, with no copies. Outputs come
            back to the CPU either way.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast on CUDA (loss and softmax in float32).

    Returns:
        Mean loss, accuracy, and per-image predictions and probabilities as NumPy arrays.

    Raises:
        DeviceError: ``precision`` is not available on ``device``.
    """
    target = _device(device)
    placement = Placement(target or torch.device("cpu"), precision)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    preds: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    for batch_images, batch_labels in batches_of(data, batch_size)[0]:
        truth.append(batch_labels.cpu().numpy())
        inputs = to_device(batch_images, target, pin=True)
        batch_labels = to_device(batch_labels, target, pin=True)
        inputs = inputs.float()
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with placement.autocast():
            logits = model(inputs)
        logits = logits.float()
        total_loss += float(criterion(logits, batch_labels))
        p = torch.softmax(logits, dim=1).cpu()
        probs.append(p.numpy())
        preds.append(p.argmax(1).numpy())
    predictions = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    n = max(len(predictions), 1)
    accuracy = float((predictions == np.concatenate(truth)).mean()) if preds else 0.0
    probabilities = np.concatenate(probs) if probs else np.zeros((0, 0), dtype=np.float32)
    return EvalResult(total_loss / n, accuracy, predictions, probabilities)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(payload: dict[str, Any], directory: Path) -> Path:
    """Write ``last.pt`` atomically, keeping the one before as ``previous.pt``."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / LAST
    tmp = directory / f".{LAST}.{os.getpid()}.tmp"
    torch.save(payload, tmp)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    if target.exists():
        target.replace(directory / PREVIOUS)
    tmp.replace(target)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint dict, or raise :class:`CheckpointError` naming the file and the fallback."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        fallback = path.with_name(PREVIOUS)
        hint = (
            f"; the previous good checkpoint is {fallback}"
            if fallback.exists() and fallback != path
            else ""
        )
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc}){hint}") from exc
    required = {"model", "optimizer", "scheduler", "epoch", "rng", "train_state"}
    if not isinstance(payload, dict) or not required <= set(payload):
        raise CheckpointError(f"checkpoint {path} lacks {sorted(required - set(payload or {}))}")
    return payload


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    # Dropout on a GPU draws from the CUDA generators (untyped in torch 2.14).
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- fit


EpochCallback = Callable[[EpochMetrics], None]


def check_resumable(payload: dict[str, Any], context: DistributedContext) -> None:
    """Refuse a checkpoint written by another number of processes: its learning-rate schedule
    counts that many processes' steps per epoch.

    Raises:
        CheckpointError: the numbers differ; the message says which to launch.
    """
    written_by = int(payload.get("world_size", 1))
    if written_by != context.world_size:
        how = (
            "without torchrun" if written_by == 1 else f"under torchrun with {written_by} processes"
        )
        raise CheckpointError(
            f"the checkpoint was written with world size {written_by} and this run has world "
            f"size {context.world_size}; resume it {how} in all"
        )


def wrap_for_training(
    model: nn.Module, device: torch.device, context: DistributedContext
) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` under a multi-process launch (it averages the
    gradients over the processes and starts them from rank 0's weights), else ``model``."""
    if not context.is_distributed:
        return model
    # A 1-channel conv's weight gradient may come back with another (equally valid) stride on
    # its size-1 dimension; DDP copies it into its bucket and warns on every process. Harmless.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def validate(trainer: Trainer, model: nn.Module, data: BatchSource) -> tuple[float, float]:
    """Validation ``(loss, accuracy)`` of ``model`` (unwrapped) over all of ``data``.

    Under ``torchrun`` each process evaluates its :meth:`DistributedContext.split` of in-memory
    images and the sums are added up, so every process gets the same numbers; streamed
    validation batches are read whole by every process.
    """
    context = trainer.context
    if not context.is_distributed or isinstance(data, StreamBatches):
        result = trainer.evaluate(data)
        return result.loss, result.accuracy
    images, labels = data
    part = context.split(int(labels.shape[0])).to(images.device)
    cfg = trainer.cfg
    result = evaluate(
        model,
        (images[part], labels[part]),
        cfg.eval_batch_size,
        cfg.channels_last,
        device=trainer.device,
        precision=cfg.precision,
    )
    n = len(part)
    loss_sum, correct, total = context.sum(
        [result.loss * n, round(result.accuracy * n), n], trainer.placement.device
    )
    return loss_sum / max(total, 1), correct / max(total, 1)


def fit(
    model: nn.Module,
    train_data: BatchSource,
    val_data: BatchSource,
    cfg: TrainConfig,
    preset: AugmentationPreset,
    checkpoint_dir: Path,
    extra: dict[str, Any] | None = None,
    resume_from: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
    placement: Placement | None = None,
) -> TrainState:
    """Train with per-epoch validation, checkpointing and early stopping.

    Args:
        model: The network (moved to the device, and to channels_last if configured, here).
        train_data: ``(uint8 images [N, C, H, W], labels)`` on the CPU, or shuffled
            :class:`~train.data.StreamBatches` (``set_epoch`` each epoch).
        val_data: Same, for validation (unshuffled).
        cfg: Training settings.
        preset: Augmentation preset.
        checkpoint_dir: Where ``last.pt`` / ``previous.pt`` go.
        extra: Stored in every checkpoint (run id, config, classes, spec).
        resume_from: A checkpoint dict to continue from.
        on_epoch_end: Called after each epoch with its metrics.
        placement: Device and precision; default: ``cfg.device`` and ``cfg.precision`` resolved
            by :func:`train.device.resolve_placement`.

    Under ``torchrun`` (a process group is up, :func:`train.distributed.process_group`) the
    model trains in ``DistributedDataParallel``, each process on its shard of every epoch with
    ``cfg.batch_size`` images a step; the epoch's metrics are those of all processes together,
    ranks agree on improvement and early stopping, and only the main process writes
    checkpoints (the unwrapped model's weights, as a single process writes them).

    Returns:
        The final :class:`TrainState`; the model holds the best validation weights, on the
        training device.

    Raises:
        DeviceError: ``cfg.device`` or ``cfg.precision`` is not available here.
        CheckpointError: ``resume_from`` was written by another number of processes.
    """
    context = current()
    if resume_from is not None:
        check_resumable(resume_from, context)
    placement = placement or resolve_placement(cfg.device, cfg.precision)
    generator = set_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model = model.to(placement.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_data = place_data(train_data, placement.device)
    val_data = place_data(val_data, placement.device)
    steps_per_epoch = batches_of(train_data, cfg.batch_size, context=context)[1]
    trainer = Trainer(
        wrap_for_training(model, placement.device, context),
        cfg,
        preset,
        generator,
        steps_per_epoch,
        placement.device,
        context,
    )
    optimizer, scheduler = trainer.optimizer, trainer.scheduler
    state = TrainState()
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        if trainer.scaler is not None and resume_from.get("scaler"):
            trainer.scaler.load_state_dict(resume_from["scaler"])
        _restore_rng(resume_from["rng"], generator)
        state = resume_from["train_state"]
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        if isinstance(train_data, StreamBatches):
            train_data.set_epoch(epoch)
        start = time.perf_counter()
        lr_at_start = float(optimizer.param_groups[0]["lr"])
        augment = context.seed_epoch(cfg.seed, epoch) if context.is_distributed else None
        train_loss, train_acc, seen = trainer.epoch(
            train_data, description=f"epoch {epoch}/{cfg.epochs}", augment_generator=augment
        )
        if context.is_distributed:
            loss_sum, correct, total = context.sum(
                [train_loss * seen, round(train_acc * seen), seen], placement.device
            )
            train_loss, train_acc, seen = loss_sum / total, correct / total, int(total)
        elapsed = time.perf_counter() - start
        val_loss, val_accuracy = validate(trainer, model, val_data)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_acc,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            lr=float(optimizer.param_groups[0]["lr"]),
            epoch_seconds=elapsed,
            images_per_second=seen / elapsed if elapsed > 0 else 0.0,
        )
        state.epoch = epoch
        state.history.append({"epoch": float(epoch), **metrics.as_dict()})
        # The main process decides, so all agree on the best weights and on stopping.
        if context.from_main(val_accuracy > state.best_metric + cfg.early_stopping_min_delta):
            state.best_metric = val_accuracy
            state.best_epoch = epoch
            state.epochs_without_improvement = 0
            state.best_weights = copy.deepcopy(model.state_dict())
        elif settled(lr_at_start, metrics.lr, cfg):
            state.epochs_without_improvement += 1
            if state.epochs_without_improvement >= cfg.early_stopping_patience:
                state.stopped_early = True
        if on_epoch_end is not None:
            on_epoch_end(metrics)
        if context.is_main:  # the others hold the same state
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
                    "epoch": epoch,
                    "rng": _rng_state(generator),
                    "train_state": state,
                    "world_size": context.world_size,
                    **(extra or {}),
                },
                checkpoint_dir,
            )
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return state
