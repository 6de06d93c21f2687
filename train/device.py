"""Where training runs and in which precision: one resolver for ``train``, and the recipe search.

``train.device`` is ``auto`` (CUDA when ``torch.cuda.is_available()``, else the CPU), ``cpu`` or
``cuda``; ``cuda`` on a machine without CUDA is a :class:`DeviceError` (a
:class:`~train.config.ConfigError`, so the CLI prints one ``error:`` line and exits with 2).

``train.precision`` is ``fp32``, ``bf16`` or ``fp16``. The half precisions mean
:func:`torch.autocast` on CUDA (forward pass and loss; weights, optimizer and gradients stay
float32), with a gradient scaler for ``fp16``. On the CPU only ``fp32`` is accepted: asking for
``bf16``/``fp16`` where the run resolves to the CPU is a :class:`DeviceError` rather than a silent
fallback, since it changes the numbers a run produces.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import get_args

import torch

from train.config import ConfigError, DeviceName, Precision

__all__ = ["DeviceName", "Precision"]  # re-exported with the resolver
DEVICE_NAMES: tuple[str, ...] = get_args(DeviceName)
PRECISIONS: tuple[str, ...] = get_args(Precision)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Share of the free device memory the in-memory data set may take to be kept on the device.
DEVICE_DATA_SHARE = 0.5


class DeviceError(ConfigError):
    """A device or precision that this machine cannot give; one line naming the setting."""


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto`` = CUDA when available, else the CPU; ``cpu``; ``cuda`` (needs a CUDA device).

    Args:
        name: ``auto``, ``cpu`` or ``cuda``.
        setting: How the caller names the setting in messages (``train.device``, ``--device``).

    Raises:
        DeviceError: an unknown name, or ``cuda`` where torch sees no CUDA device.
    """
    if name not in DEVICE_NAMES:
        raise DeviceError(f"{setting}: unknown device '{name}' (auto, cpu or cuda)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = (
            f"built for CUDA {torch.version.cuda}"
            if torch.version.cuda
            else "a CPU-only build of torch"
        )
        raise DeviceError(
            f"{setting} is cuda but no CUDA device is available (torch {torch.__version__}, "
            f"{build}); use auto or cpu"
        )
    return torch.device(name)


def check_precision(
    precision: str, device: torch.device, setting: str = "train.precision"
) -> Precision:
    """``precision`` if ``device`` can train in it.

    Raises:
        DeviceError: an unknown precision; ``bf16``/``fp16`` on the CPU; ``bf16`` on a GPU
            without bfloat16 support.
    """
    if precision not in PRECISIONS:
        raise DeviceError(f"{setting}: unknown precision '{precision}' (fp32, bf16 or fp16)")
    if precision != "fp32" and device.type != "cuda":
        raise DeviceError(
            f"{setting} is {precision} but training runs on the {device.type.upper()}: "
            "mixed precision (autocast) is used on CUDA only; set it to fp32"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            f"{setting} is bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 "
            "support; use fp16 or fp32"
        )
    return precision  # type: ignore[return-value]


def device_description(device: torch.device) -> str:
    """What the device is: the GPU's name, or ``CPU``."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return "CPU"


@dataclass(frozen=True)
class Placement:
    """A resolved device and the precision training uses there."""

    device: torch.device
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision, self.device)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or ``None`` for plain float32."""
        return _AUTOCAST_DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """:func:`torch.autocast` for ``bf16``/``fp16`` on CUDA; a no-op for ``fp32``."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for ``fp16`` (its small range underflows gradients), else ``None``."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def params(self) -> dict[str, str]:
        """MLflow parameters: the resolved device, its name and the precision in force."""
        return {
            "device": str(self.device),
            "device_name": device_description(self.device),
            "precision": self.precision,
        }


def resolve_placement(
    device: str,
    precision: str = "fp32",
    device_setting: str = "train.device",
    precision_setting: str = "train.precision",
) -> Placement:
    """:func:`resolve_device` then :func:`check_precision`, as one :class:`Placement`."""
    resolved = resolve_device(device, device_setting)
    return Placement(resolved, check_precision(precision, resolved, precision_setting))


def fits_on_device(nbytes: int, device: torch.device, share: float = DEVICE_DATA_SHARE) -> bool:
    """Whether ``nbytes`` of data can live on ``device`` (CUDA only: at most ``share`` of free memory)."""
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


def to_device(
    tensor: torch.Tensor, device: torch.device | str | None, pin: bool = False
) -> torch.Tensor:
    """``tensor`` on ``device`` (``None`` = left where it is); a CPU tensor bound for CUDA goes
    through pinned memory with a non-blocking copy when ``pin`` is set."""
    if device is None:
        return tensor
    target = torch.device(device)
    if tensor.device == target:
        return tensor
    if pin and target.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(target, non_blocking=True)
