"""The training loop: one step learns, checkpoints are atomic and resumable, early stopping stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.preprocess import PreprocessSpec
from train.config import ModelConfig, TrainConfig
from train.engine import (
    LAST,
    PREVIOUS,
    CheckpointError,
    EpochMetrics,
    Trainer,
    evaluate,
    fit,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    set_seed,
)
from train.models import build_model
from train.transforms import PRESETS, AugmentationPreset


def _toy_data(n_per_class: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two easily separable classes: bright top half vs bright bottom half."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 40, (2 * n_per_class, 1, 28, 28), generator=g, dtype=torch.uint8)
    images[:n_per_class, :, :14] += 200
    images[n_per_class:, :, 14:] += 200
    labels = torch.cat([torch.zeros(n_per_class), torch.ones(n_per_class)]).long()
    return images, labels


def toy_model(seed: int | None = None, dropout: float = 0.0) -> torch.nn.Module:
    """A two-class ``simple_cnn`` of width 4 (seeded when ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_model(
        ModelConfig(name="simple_cnn", width=4, dropout=dropout), PreprocessSpec(), 2
    )


def _cfg(**kwargs: object) -> TrainConfig:
    base: dict[str, object] = {
        "epochs": 3,
        "batch_size": 8,
        "lr": 0.05,
        "progress": False,
        "scheduler": "none",
    }
    base.update(kwargs)
    return TrainConfig.model_validate(base)


def test_fit_learns_and_reports_each_epoch(tmp_path: Path) -> None:
    seen: list[EpochMetrics] = []
    model = toy_model()
    data = _toy_data()
    state = fit(model, data, data, _cfg(), PRESETS["none"], tmp_path, on_epoch_end=seen.append)
    assert [m.epoch for m in seen] == [1, 2, 3]
    assert state.epoch == 3
    assert state.best_metric >= 0.9
    assert seen[-1].images_per_second > 0
    assert evaluate(model, data, batch_size=7).accuracy == pytest.approx(state.best_metric)
    assert (tmp_path / LAST).exists() and (tmp_path / PREVIOUS).exists()


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = _toy_data()
    initial = toy_model().state_dict()
    straight = toy_model()
    straight.load_state_dict(initial)
    fit(straight, data, data, _cfg(), PRESETS["standard"], tmp_path / "straight")

    class CrashError(Exception):
        pass

    def crash_in_epoch_two(metrics: EpochMetrics) -> None:
        if metrics.epoch == 2:
            raise CrashError

    crashed = toy_model()
    crashed.load_state_dict(initial)
    with pytest.raises(CrashError):
        fit(
            crashed,
            data,
            data,
            _cfg(),
            PRESETS["standard"],
            tmp_path / "run",
            on_epoch_end=crash_in_epoch_two,
        )
    payload = load_checkpoint(tmp_path / "run" / LAST)
    assert payload["epoch"] == 1

    resumed = toy_model()  # fresh weights: everything must come from the checkpoint
    state = fit(
        resumed, data, data, _cfg(), PRESETS["standard"], tmp_path / "run", resume_from=payload
    )
    assert state.epoch == 3
    assert [h["epoch"] for h in state.history] == [1.0, 2.0, 3.0]
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_early_stopping_stops_when_validation_stalls(tmp_path: Path) -> None:
    images, labels = _toy_data()
    # Random validation labels: accuracy cannot keep improving.
    noisy = labels[torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(3))]
    state = fit(
        toy_model(),
        (images, labels),
        (images, noisy),
        _cfg(epochs=30, early_stopping_patience=2, lr=1e-12),
        PRESETS["none"],
        tmp_path,
    )
    assert state.stopped_early
    assert state.epoch < 30
    assert state.epochs_without_improvement == 2


def test_early_stopping_waits_for_the_schedule_to_lower_the_lr(tmp_path: Path) -> None:
    """Under onecycle, stalled epochs while the lr warms up or is still high do not count."""
    images, labels = _toy_data()
    cfg = _cfg(epochs=12, early_stopping_patience=2, lr=1e-12, scheduler="onecycle")
    state = fit(toy_model(), (images, labels), (images, labels), cfg, PRESETS["none"], tmp_path)
    lrs = [cfg.lr / 25, *(entry["lr"] for entry in state.history)]  # OneCycleLR starts at 1/25
    # Epoch e ran from lrs[e - 1] to lrs[e]: it counts when the lr fell through it to half or less.
    counted = [e for e in range(1, len(lrs)) if lrs[e] < lrs[e - 1] and lrs[e] <= 0.5 * cfg.lr]
    # At lr 1e-12 the weights do not move: only epoch 1 improves. Without the rule the run would
    # stop after epoch 1 + patience; with it, `patience` counted epochs after that.
    assert counted[0] > 1 + cfg.early_stopping_patience
    assert state.stopped_early and state.best_epoch == 1
    assert state.epoch == counted[0] + cfg.early_stopping_patience - 1 == counted[1]


def test_checkpoint_is_atomic_and_keeps_the_previous(tmp_path: Path) -> None:
    save_checkpoint({"value": 1}, tmp_path)
    save_checkpoint({"value": 2}, tmp_path)
    assert torch.load(tmp_path / LAST, weights_only=False)["value"] == 2
    assert torch.load(tmp_path / PREVIOUS, weights_only=False)["value"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_checkpoint_names_the_file_and_the_fallback(tmp_path: Path) -> None:
    model = toy_model()
    data = _toy_data(4)
    fit(model, data, data, _cfg(epochs=2), PRESETS["none"], tmp_path)
    good = (tmp_path / PREVIOUS).read_bytes()
    last = tmp_path / LAST
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(last)
    assert str(tmp_path / PREVIOUS) in str(info.value)
    assert (tmp_path / PREVIOUS).read_bytes() == good
    assert load_checkpoint(tmp_path / PREVIOUS)["epoch"] == 1


def test_checkpoint_missing_or_incomplete(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(tmp_path / "partial.pt")


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "none"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizers_and_schedules(scheduler: str, optimizer: str) -> None:
    model = toy_model()
    cfg = _cfg(scheduler=scheduler, optimizer=optimizer, epochs=2)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=4)
    decays = sorted(group["weight_decay"] for group in opt.param_groups)
    assert decays == [0.0, cfg.weight_decay]
    lrs = []
    for _ in range(8):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    if scheduler == "none":
        assert set(lrs) == {cfg.lr}
    else:
        assert lrs[-1] < cfg.lr


def test_channels_last_training_runs(tmp_path: Path) -> None:
    data = _toy_data(4)
    state = fit(
        toy_model(),
        data,
        data,
        _cfg(epochs=1, channels_last=True, num_threads=1),
        PRESETS["strong"],
        tmp_path,
    )
    assert state.epoch == 1


@pytest.mark.parametrize("total_steps", range(1, 11))
def test_onecycle_works_for_very_short_runs(total_steps: int) -> None:
    model = toy_model()
    cfg = _cfg(scheduler="onecycle", epochs=total_steps)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=1)
    for _ in range(total_steps):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] <= cfg.lr


def test_an_explicit_cpu_device_gives_the_same_results_as_none() -> None:
    """``device="cpu"`` goes through the copy path; it must change nothing on the CPU."""
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (24, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 2, (24,), generator=g)
    preset = AugmentationPreset(crop_padding=2, hflip=True, erase_probability=0.5)
    cfg = _cfg(epochs=1, batch_size=5, eval_batch_size=7, scheduler="onecycle", label_smoothing=0.1)
    initial = toy_model().state_dict()
    runs = []
    for device in (None, "cpu"):
        model = toy_model()
        model.load_state_dict(initial)
        trainer = Trainer(model, cfg, preset, set_seed(7), steps_per_epoch=5, device=device)
        trained = trainer.epoch((images, labels))
        result = trainer.evaluate((images, labels))
        runs.append((trained, result, model.state_dict()))
    (loss, accuracy, seen), result, weights = runs[0]
    (loss_cpu, accuracy_cpu, seen_cpu), result_cpu, weights_cpu = runs[1]
    assert seen == seen_cpu == 24
    assert (loss, accuracy) == (loss_cpu, accuracy_cpu)
    for name, tensor in weights.items():
        assert torch.equal(tensor, weights_cpu[name]), name
    assert result.accuracy == result_cpu.accuracy
    assert result.loss == pytest.approx(result_cpu.loss)
    assert (result.predictions == result_cpu.predictions).all()
    assert result_cpu.probabilities.shape == (24, 2)
    assert (result.probabilities == result_cpu.probabilities).all()
