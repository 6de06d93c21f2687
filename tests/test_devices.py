"""``train.device`` and ``train.precision``: the resolver, the CPU path unchanged, the CLI errors.

The tests run on the CPU. Where a test needs "no CUDA here" or "CUDA here" it says so with
``monkeypatch`` on ``torch.cuda.is_available``, so it means the same on a machine with a GPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import cli_overrides
from tests.test_engine import toy_model
from train.__main__ import main
from train.config import ConfigError, Settings, TrainConfig
from train.data import iterate_batches
from train.device import (
    DeviceError,
    Placement,
    check_precision,
    resolve_device,
    resolve_placement,
    to_device,
)
from train.engine import LAST, Trainer, fit, load_checkpoint, make_training_parts, place_data
from train.engine import evaluate as engine_evaluate
from train.transforms import AugmentationPreset, augment_batch

MakeSettings = Callable[..., Settings]
NO_CUDA = "train.device is cuda but no CUDA device is available"


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no CUDA device, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------- resolver


@pytest.mark.usefixtures("no_cuda")
def test_auto_is_the_cpu_without_cuda_and_cuda_is_an_error() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert message.startswith(NO_CUDA) and "\n" not in message
    assert isinstance(info.value, ConfigError)  # the CLI's known error: one line, exit 2
    with pytest.raises(DeviceError, match=r"^--device is cuda but no CUDA device"):
        resolve_device("cuda", "--device")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_auto_is_cuda_when_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_precision_is_fp32_on_the_cpu_and_checked() -> None:
    cpu = torch.device("cpu")
    assert check_precision("fp32", cpu) == "fp32"
    for half in ("bf16", "fp16"):
        with pytest.raises(DeviceError) as info:
            check_precision(half, cpu)
        assert str(info.value) == (
            f"train.precision is {half} but training runs on the CPU: mixed precision "
            "(autocast) is used on CUDA only; set it to fp32"
        )
    with pytest.raises(DeviceError, match="unknown precision 'fp8'"):
        check_precision("fp8", cpu)
    # No CUDA call is needed to accept fp16 for a CUDA device.
    assert check_precision("fp16", torch.device("cuda")) == "fp16"


@pytest.mark.usefixtures("no_cuda")
def test_placement_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    placement = resolve_placement("auto", "fp32")
    assert placement == Placement(torch.device("cpu"), "fp32")
    assert placement.params() == {"device": "cpu", "device_name": "CPU", "precision": "fp32"}
    assert placement.autocast_dtype is None and placement.grad_scaler() is None
    with pytest.raises(DeviceError, match=r"train\.precision is bf16 but training runs on the CPU"):
        resolve_placement("auto", "bf16")
    with pytest.raises(DeviceError, match=r"^--precision is fp16"):
        resolve_placement("cpu", "fp16", "--device", "--precision")
    with pytest.raises(DeviceError, match=r"train\.precision is fp16"):
        Placement(torch.device("cpu"), "fp16")
    fp16 = Placement(torch.device("cuda"), "fp16")
    assert fp16.autocast_dtype == torch.float16 and fp16.is_cuda
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert Placement(torch.device("cuda"), "bf16").autocast_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    with pytest.raises(DeviceError, match="bf16 but Old GPU has no bfloat16 support"):
        Placement(torch.device("cuda"), "bf16")


def test_settings_validate_device_and_precision(make_settings: MakeSettings) -> None:
    settings = make_settings()
    assert (settings.train.device, settings.train.precision) == ("auto", "fp32")
    assert make_settings("train.device=cpu", "train.precision=bf16").train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.device"):
        make_settings("train.device=tpu")
    with pytest.raises(ConfigError, match=r"train\.precision"):
        make_settings("train.precision=fp8")


def test_cpu_data_stays_put_and_copies_are_no_ops() -> None:
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    labels = torch.zeros(4, dtype=torch.int64)
    for device in (None, "cpu", torch.device("cpu")):
        placed = place_data((images, labels), device)
        assert placed[0] is images and placed[1] is labels
        assert to_device(images, device, pin=True) is images


# --------------------------------------------------------------------------- training


def _data(n: int = 24, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, 2, (n,), generator=g)


def _model(seed: int = 0) -> torch.nn.Module:
    return toy_model(seed, dropout=0.2)


def _cfg(**kwargs: object) -> TrainConfig:
    base: dict[str, object] = {
        "epochs": 2,
        "batch_size": 5,
        "eval_batch_size": 7,
        "lr": 0.05,
        "progress": False,
        "label_smoothing": 0.1,
        "device": "cpu",
    }
    return TrainConfig.model_validate(base | kwargs)


def _loop_before_devices(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    preset: AugmentationPreset,
) -> list[float]:
    """``fit``'s training as it was before devices and precision existed, written out: the same
    seeding, order, augmentation, loss, optimizer and schedule, in float32 on the CPU. Returns
    the mean training loss of each epoch (summed in Python floats, as it was)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = (int(labels.shape[0]) + cfg.batch_size - 1) // cfg.batch_size
    optimizer, scheduler, criterion = make_training_parts(model, cfg, steps)
    losses = []
    for _ in range(cfg.epochs):
        model.train()
        total, seen = 0.0, 0
        for batch_images, batch_labels in iterate_batches(
            images, labels, cfg.batch_size, generator
        ):
            inputs = augment_batch(batch_images, preset, generator).float()
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(inputs), batch_labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * int(batch_labels.shape[0])
            seen += int(batch_labels.shape[0])
        losses.append(total / seen)
    return losses


def test_fit_on_the_cpu_is_the_training_from_before(tmp_path: Path) -> None:
    """``train.device=cpu`` (and ``auto`` without CUDA) trains bit for bit as before."""
    images, labels = _data()
    preset = AugmentationPreset(crop_padding=2, hflip=True, erase_probability=0.5)
    cfg = _cfg()
    reference = _model()
    expected_losses = _loop_before_devices(reference, images, labels, cfg, preset)
    model = _model()
    state = fit(model, (images, labels), (images, labels), cfg, preset, tmp_path)
    assert [h["train_loss"] for h in state.history] == expected_losses
    last = load_checkpoint(tmp_path / LAST)[
        "model"
    ]  # the last epoch's weights (fit keeps the best)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, last[name]), name


def test_auto_without_cuda_trains_like_cpu(tmp_path: Path, no_cuda: None) -> None:
    images, labels = _data()
    preset = AugmentationPreset(hflip=True)
    weights = []
    for device in ("cpu", "auto"):
        model = _model()
        fit(
            model,
            (images, labels),
            (images, labels),
            _cfg(device=device),
            preset,
            tmp_path / device,
        )
        weights.append(load_checkpoint(tmp_path / device / LAST)["model"])
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_half_precision_on_the_cpu_stops_before_training(tmp_path: Path, no_cuda: None) -> None:
    data = _data()
    for precision in ("bf16", "fp16"):
        with pytest.raises(DeviceError, match=f"train.precision is {precision}"):
            fit(
                _model(),
                data,
                data,
                _cfg(device="auto", precision=precision),
                AugmentationPreset(),
                tmp_path,
            )
        with pytest.raises(DeviceError, match=f"train.precision is {precision}"):
            Trainer(_model(), _cfg(precision=precision), AugmentationPreset(), torch.Generator(), 1)
        with pytest.raises(DeviceError, match=f"train.precision is {precision}"):
            engine_evaluate(_model(), data, batch_size=8, precision=precision)
    with pytest.raises(DeviceError, match=NO_CUDA):
        fit(_model(), data, data, _cfg(device="cuda"), AugmentationPreset(), tmp_path)
    assert not list(tmp_path.iterdir())  # no checkpoint written


# --------------------------------------------------------------------------- command line


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("command", ["fit", "sweep", "evaluate"])
def test_cli_cuda_without_cuda_is_one_error_line_and_exit_2(
    command: str, make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    assert main([command, *cli_overrides(settings), "train.device=cuda"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: {NO_CUDA} (torch ")
    # Nothing was written: no tracking store, no checkpoint.
    assert not Path(settings.tracking.store_dir).exists()
    assert not Path(settings.train.checkpoint_dir).exists()


@pytest.mark.usefixtures("no_cuda")
def test_cli_device_from_the_environment(
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings()
    monkeypatch.setenv("FASHION_SERVE__TRAIN__DEVICE", "cuda")
    assert main(["fit", *cli_overrides(settings)]) == 2
    assert _error_lines(capsys)[0].startswith(f"error: {NO_CUDA}")


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cli_half_precision_on_the_cpu_is_one_error_line(
    device: str, make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    argv = ["fit", *cli_overrides(settings), f"train.device={device}", "train.precision=bf16"]
    assert main(argv) == 2
    lines = _error_lines(capsys)
    assert lines == [
        "error: train.precision is bf16 but training runs on the CPU: mixed precision "
        "(autocast) is used on CUDA only; set it to fp32"
    ]
    assert not Path(settings.tracking.store_dir).exists()
