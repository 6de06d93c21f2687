"""Architectures, the normalising wrapper, and pretrained weights checked against a reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-untyped]
from torch import nn

from common.preprocess import PreprocessSpec
from train.config import ModelConfig
from train.models import (
    ARCHITECTURES,
    Classifier,
    ModelError,
    SimpleCNN,
    SmallResNet,
    build_model,
    count_parameters,
    efficientnet_lite0_imagenet,
    efficientnet_lite0_weights_path,
    model_size_mb,
    rename_lite0_state_dict,
)

BIG_BACKBONES = {"efficientnet_lite0", "resnet18"}
GRAY = PreprocessSpec(mean=(0.25,), std=(0.5,))


def _pixels(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Raw ``0..255`` float pixels, as ``to_model_input`` produces them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g).float()


def _lite0_file_state() -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(
        efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True
    )
    return state


def _reference_lite0(image_size: int) -> nn.Module:
    """EfficientNet-Lite0 from ``efficientnet_lite_pytorch`` (the code these weights came with)."""
    model: nn.Module = EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=str(efficientnet_lite0_weights_path()),
        image_size=image_size,
    )
    return model.eval()


# --------------------------------------------------------------------------- architectures


def test_the_architecture_list() -> None:
    assert set(ARCHITECTURES) == {
        "simple_cnn",
        "resnet_small",
        "resnet_small_deep",
        "efficientnet_lite0",
        "resnet18",
    }


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_and_backward_of_every_architecture(name: str) -> None:
    input_size = 32 if name in BIG_BACKBONES else None
    cfg = ModelConfig(name=name, width=4, dropout=0.0, input_size=input_size)
    model = build_model(cfg, GRAY, num_classes=7)
    assert isinstance(model, Classifier)
    x = _pixels(2)
    model.train()
    out = model(x)
    assert out.shape == (2, 7) and bool(torch.isfinite(out).all())
    out.square().mean().backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not without_grad, without_grad
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert not torch.allclose(first[0], first[1])  # different images, different logits


@pytest.mark.parametrize("name", ["simple_cnn", "resnet_small"])
def test_rgb_input_for_the_small_cnns(name: str) -> None:
    spec = PreprocessSpec(image_size=16, channels=3, mean=(0.1, 0.2, 0.3), std=(0.3, 0.3, 0.3))
    model = build_model(ModelConfig(name=name, width=4), spec, num_classes=3).eval()
    assert model.repeat == 1
    with torch.no_grad():
        assert model(_pixels(2, channels=3, size=16)).shape == (2, 3)


def test_deep_resnet_has_twice_the_blocks() -> None:
    small = SmallResNet(1, 10, width=4, dropout=0.0)
    deep = SmallResNet(1, 10, width=4, dropout=0.0, blocks=(2, 2, 2))
    assert len(small.layers) == 3 and len(deep.layers) == 6
    assert count_parameters(deep) > count_parameters(small)


def test_simple_cnn_width_scales_parameters() -> None:
    assert count_parameters(SimpleCNN(1, 10, 8, 0.1)) > count_parameters(SimpleCNN(1, 10, 4, 0.1))


def test_default_input_sizes() -> None:
    assert build_model(ModelConfig(name="simple_cnn", width=4), GRAY, 10).input_size is None
    assert build_model(ModelConfig(name="resnet18"), GRAY, 10).input_size == 64
    assert build_model(ModelConfig(name="resnet18", input_size=40), GRAY, 10).input_size == 40


def test_unknown_architecture() -> None:
    with pytest.raises(ModelError, match=r"unknown architecture 'vit_huge'.*simple_cnn"):
        build_model(ModelConfig(name="vit_huge"), GRAY, 10)


# --------------------------------------------------------------------------- Classifier maths


def test_normalisation_is_folded_into_the_network() -> None:
    model = Classifier(nn.Identity(), (0.25,), (0.5,), 1, 1, None)
    x = torch.tensor([0.25 * 255, 0.0, 255.0, 127.5]).view(1, 1, 2, 2)
    out = model(x)
    torch.testing.assert_close(out.view(-1), torch.tensor([0.0, -0.5, 1.5, 0.5]))
    torch.testing.assert_close(model.scale.view(-1), torch.tensor([1 / (255 * 0.5)]))
    torch.testing.assert_close(model.shift.view(-1), torch.tensor([-0.5]))


def test_grayscale_is_replicated_with_per_channel_statistics() -> None:
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    model = Classifier(nn.Identity(), mean, std, 1, 3, None)
    assert model.repeat == 3
    x = _pixels(2, size=5)
    out = model(x)
    assert out.shape == (2, 3, 5, 5)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (x[:, 0] / 255 - mean[c]) / std[c])


def test_mean_of_pixels_maps_to_zero_for_every_channel() -> None:
    model = Classifier(nn.Identity(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3, 3, None)
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(model(x), torch.zeros(1, 3, 1, 1), atol=1e-6, rtol=0)


def test_single_value_statistics_broadcast_and_three_values_average() -> None:
    broadcast = Classifier(nn.Identity(), (0.5,), (0.25,), 1, 3, None)
    assert broadcast.shift.view(-1).tolist() == [-2.0, -2.0, -2.0]
    averaged = Classifier(nn.Identity(), (0.1, 0.2, 0.3), (0.2, 0.2, 0.2), 1, 1, None)
    torch.testing.assert_close(averaged.shift.view(-1), torch.tensor([-1.0]))
    with pytest.raises(ModelError, match="cannot use 2 normalisation values for 3 channels"):
        Classifier(nn.Identity(), (0.1, 0.2), (0.2, 0.2), 3, 3, None)


def test_inputs_are_resized_inside_the_network() -> None:
    model = Classifier(nn.Identity(), (0.0,), (1.0,), 1, 3, 12)
    out = model(torch.full((2, 1, 28, 28), 51.0))
    assert out.shape == (2, 3, 12, 12)
    torch.testing.assert_close(out, torch.full_like(out, 0.2))
    same = Classifier(nn.Identity(), (0.0,), (1.0,), 1, 1, 28)
    x = _pixels(1)
    torch.testing.assert_close(same(x), x / 255)  # already the right size: untouched


def test_scratch_models_use_the_data_statistics() -> None:
    model = build_model(ModelConfig(name="simple_cnn", width=4), GRAY, 10)
    torch.testing.assert_close(model.shift.view(-1), torch.tensor([-0.5]))
    scratch_lite0 = build_model(ModelConfig(name="efficientnet_lite0", input_size=32), GRAY, 10)
    torch.testing.assert_close(scratch_lite0.shift.view(-1), torch.tensor([-0.5] * 3))


# --------------------------------------------------------------------------- EfficientNet-Lite0


def test_rename_covers_every_tensor_of_the_packaged_weights() -> None:
    import timm

    state = _lite0_file_state()
    renamed = rename_lite0_state_dict(state)
    assert len(renamed) == len(state) == 296
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(renamed) == set(target)
    assert all(renamed[k].shape == target[k].shape for k in target)
    assert renamed["blocks.6.0.conv_pwl.weight"] is state["_blocks.15._project_conv.weight"]
    assert renamed["blocks.0.0.conv_pw.weight"] is state["_blocks.0._project_conv.weight"]
    assert renamed["bn2.running_var"] is state["_bn1.running_var"]
    assert renamed["classifier.bias"] is state["_fc.bias"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("_blocks.16._bn0.weight", "unexpected EfficientNet-Lite0 block index"),
        (
            "_blocks.3._se_reduce.weight",
            "unexpected EfficientNet-Lite0 tensor _blocks.3._se_reduce",
        ),
        ("_blocks.0._expand_conv.weight", "unexpected EfficientNet-Lite0 tensor _blocks.0._expand"),
        ("_head.weight", "unexpected EfficientNet-Lite0 tensor _head.weight"),
    ],
)
def test_rename_refuses_unknown_keys(key: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        rename_lite0_state_dict({key: torch.zeros(1)})


def test_pretrained_lite0_loads_real_batch_norm_statistics() -> None:
    model = efficientnet_lite0_imagenet()
    state = _lite0_file_state()
    assert torch.equal(model.get_parameter("conv_stem.weight"), state["_conv_stem.weight"])
    assert torch.equal(model.get_buffer("bn1.running_var"), state["_bn0.running_var"])
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
        assert bn.running_var is not None and bn.running_mean is not None
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_pretrained_lite0_matches_the_reference_implementation() -> None:
    """timm + our renaming == efficientnet_lite_pytorch, on ImageNet-normalised inputs."""
    ours = efficientnet_lite0_imagenet().eval()
    reference = _reference_lite0(224)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 224, 224, generator=g) * 2 - 1  # (pixels / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    assert expected.shape == (2, 1000)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    assert expected.std() > 0.5  # real logits, not a degenerate network


def test_pretrained_lite0_through_build_model_matches_the_reference() -> None:
    """The whole serving path: raw gray pixels -> Classifier (x/255, mean=std=0.5, x3) -> logits."""
    cfg = ModelConfig(name="efficientnet_lite0", pretrained=True)
    model = build_model(cfg, GRAY, num_classes=1000).eval()
    assert model.input_size == 64 and model.repeat == 3
    torch.testing.assert_close(model.scale.view(-1), torch.full((3,), 1 / 127.5))
    torch.testing.assert_close(model.shift.view(-1), torch.full((3,), -1.0))
    reference = _reference_lite0(64)
    with torch.no_grad():  # build_model replaces the head: give it the ImageNet one back
        for name in ("weight", "bias"):
            ours = model.get_parameter(f"backbone.classifier.{name}")
            ours.copy_(reference.get_parameter(f"_fc.{name}"))
    pixels = _pixels(2, size=64)
    normalised = ((pixels / 255 - 0.5) / 0.5).expand(-1, 3, -1, -1)
    folded = pixels.expand(-1, 3, -1, -1) * model.scale + model.shift  # what Classifier computes
    torch.testing.assert_close(folded, normalised, atol=1e-6, rtol=0)
    with torch.no_grad():
        actual = model(pixels)
        expected = reference(folded)
    # Same input bits -> the two implementations agree to float32 rounding. (Feeding the
    # reference ``normalised`` instead differs by ~1e-5 on logits of ~13: the 1e-7 rounding of
    # the folded multiply-add, amplified by the network, not a modelling difference.)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert torch.equal(actual.argmax(1), expected.argmax(1))


def test_pretrained_lite0_gets_a_fresh_head() -> None:
    cfg = ModelConfig(name="efficientnet_lite0", pretrained=True, input_size=32)
    model = build_model(cfg, GRAY, num_classes=4)
    head = model.get_submodule("backbone.classifier")
    assert isinstance(head, nn.Linear) and head.out_features == 4
    state = _lite0_file_state()
    conv_head = model.get_parameter("backbone.conv_head.weight")
    assert torch.equal(conv_head, state["_conv_head.weight"])


# --------------------------------------------------------------------------- resnet18 weights


def _resnet18_config(path: Path, input_size: int = 32) -> ModelConfig:
    return ModelConfig(name="resnet18", weights_path=path, input_size=input_size)


def test_resnet18_loads_a_local_torchvision_file(tmp_path: Path) -> None:
    saved = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    model = build_model(_resnet18_config(path), GRAY, num_classes=5)
    assert torch.equal(model.get_parameter("backbone.conv1.weight"), saved["conv1.weight"])
    running_var = model.get_buffer("backbone.layer4.1.bn2.running_var")
    assert torch.equal(running_var, saved["layer4.1.bn2.running_var"])
    head = model.get_submodule("backbone.fc")
    assert isinstance(head, nn.Sequential) and isinstance(head[0], nn.Dropout)
    assert isinstance(head[1], nn.Linear) and head[1].out_features == 5
    # a local weights file means ImageNet statistics, not the data's
    torch.testing.assert_close(
        model.shift.view(-1),
        -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]),
    )
    with torch.no_grad():
        assert model.eval()(_pixels(2)).shape == (2, 5)


def test_resnet18_accepts_a_wrapped_state_dict(tmp_path: Path) -> None:
    saved = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": saved, "epoch": 90}, path)
    model = build_model(_resnet18_config(path), GRAY, num_classes=2)
    assert torch.equal(model.get_parameter("backbone.conv1.weight"), saved["conv1.weight"])


def test_resnet18_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match=re.escape(f"weights file not found: {missing}")):
        build_model(_resnet18_config(missing), GRAY, 10)


def test_resnet18_corrupt_weights_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a torch file" * 10)
    with pytest.raises(ModelError, match=re.escape(f"weights file {corrupt} could not be read")):
        build_model(_resnet18_config(corrupt), GRAY, 10)


def test_weights_file_holding_something_else(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ModelError, match="does not hold a state dict"):
        build_model(_resnet18_config(path), GRAY, 10)


def test_resnet18_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(SimpleCNN(3, 10, 4, 0.0).state_dict(), path)
    with pytest.raises(ModelError, match="does not fit torchvision resnet18"):
        build_model(_resnet18_config(path), GRAY, 10)
    wrong_head = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    torch.save(wrong_head, path)
    with pytest.raises(ModelError, match=r"size mismatch for fc\.weight"):
        build_model(_resnet18_config(path), GRAY, 10)


def test_resnet18_pretrained_needs_a_local_file() -> None:
    with pytest.raises(ModelError, match=r"needs model\.weights_path"):
        build_model(ModelConfig(name="resnet18", pretrained=True), GRAY, 10)


# --------------------------------------------------------------------------- sizes


def test_count_parameters_skips_frozen_ones() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    assert count_parameters(model) == 8 + 3
    model[0].requires_grad_(False)
    assert count_parameters(model) == 3


def test_model_size_counts_parameters_and_buffers() -> None:
    assert model_size_mb(nn.Linear(3, 2)) == pytest.approx(8 * 4 / 1e6)
    # weight, bias, running_mean, running_var (float32) + num_batches_tracked (int64)
    assert model_size_mb(nn.BatchNorm1d(4)) == pytest.approx((16 * 4 + 8) / 1e6)
    assert model_size_mb(nn.Linear(3, 2).double()) == pytest.approx(8 * 8 / 1e6)


def test_flip_tta_averages_the_mirror_in_eval_mode_only() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="simple_cnn", width=4, flip_tta=True)
    model = build_model(cfg, PreprocessSpec(), 10)
    x = torch.rand(3, 1, 28, 28) * 255
    model.eval()
    with torch.no_grad():
        normalised = x * model.scale + model.shift
        expected = (model.backbone(normalised) + model.backbone(normalised.flip(-1))) / 2
        torch.testing.assert_close(model(x), expected)
        # A mirrored input gives the same answer: the average is symmetric.
        torch.testing.assert_close(model(x.flip(-1)), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    with torch.no_grad():
        single = model.backbone(x * model.scale + model.shift)
    model.eval()
    assert not torch.allclose(single, expected)


@pytest.mark.parametrize(
    ("flip_tta", "trained_with_flips", "expected"),
    [
        ("auto", False, False),
        ("auto", True, True),
        (True, False, True),
        (False, True, False),
    ],
)
def test_flip_tta_auto_follows_the_training_augmentation(
    flip_tta: bool | str, trained_with_flips: bool, expected: bool
) -> None:
    cfg = ModelConfig.model_validate({"name": "simple_cnn", "width": 4, "flip_tta": flip_tta})
    model = build_model(cfg, PreprocessSpec(), 3, trained_with_flips=trained_with_flips)
    assert model.flip_tta is expected
    # Without a word about the training augmentation, auto means off.
    assert (
        build_model(ModelConfig(name="simple_cnn", width=4), PreprocessSpec(), 3).flip_tta is False
    )


def test_models_pickled_before_flip_tta_still_run() -> None:
    model = build_model(ModelConfig(name="simple_cnn", width=4), PreprocessSpec(), 10).eval()
    del model.__dict__["flip_tta"]  # as unpickled from a run logged before the option existed
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
