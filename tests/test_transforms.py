"""Batch augmentation: shapes kept, crops are translations, flips and erasing as specified."""

from __future__ import annotations

import pytest
import torch

from train.transforms import PRESETS, AugmentationPreset, augment_batch, get_preset

CROP_ONLY = AugmentationPreset(crop_padding=2)
FLIP_ONLY = AugmentationPreset(hflip=True)
ERASE_ONLY = AugmentationPreset(erase_probability=0.5)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_batch(n: int, c: int = 1, h: int = 28, w: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (n, c, h, w), generator=_gen(seed), dtype=torch.uint8)


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[y, x] = image[y + dy, x + dx]``, zero outside: what a padded crop at offset does."""
    h, w = image.shape[-2:]
    out = torch.zeros_like(image)
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = image[..., ys, xs]
    return out


def test_presets_by_name() -> None:
    assert set(PRESETS) == {"none", "flip", "standard", "strong"}
    assert get_preset("none") == AugmentationPreset()
    assert get_preset("flip") == AugmentationPreset(hflip=True)
    assert get_preset("standard") == AugmentationPreset(crop_padding=2, hflip=True)
    strong = get_preset("strong")
    assert (strong.crop_padding, strong.hflip, strong.erase_probability) == (4, True, 0.5)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_every_preset_keeps_shape_and_dtype(name: str, dtype: torch.dtype) -> None:
    images = _random_batch(6, c=3, h=20, w=24).to(dtype)
    out = augment_batch(images, PRESETS[name], _gen())
    assert out.shape == images.shape and out.dtype == dtype
    assert torch.equal(images, _random_batch(6, c=3, h=20, w=24).to(dtype))  # input untouched


def test_none_is_identity() -> None:
    images = _random_batch(8)
    assert torch.equal(augment_batch(images, PRESETS["none"], _gen()), images)


def test_padded_crop_is_a_pure_translation() -> None:
    images = _random_batch(300, c=2, h=10, w=12)
    out = augment_batch(images, CROP_ONLY, _gen(1))
    seen: set[tuple[int, int]] = set()
    for image, result in zip(images, out, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(result, _shift(image, dy, dx))
        ]
        assert len(matches) == 1, "every output is exactly one shift of its input"
        seen.add(matches[0])
    assert len(seen) == 25  # all offsets in [-pad, pad]^2 occur


def test_single_bright_pixel_moves_at_most_pad() -> None:
    images = torch.zeros(200, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 13, 9] = 250
    out = augment_batch(images, CROP_ONLY, _gen(2))
    assert torch.equal((out > 0).sum(dim=(1, 2, 3)), torch.ones(200, dtype=torch.long))
    assert set(out[out > 0].tolist()) == {250}  # preserved
    where = (out[:, 0] > 0).nonzero()[:, 1:]
    assert (where[:, 0] - 13).abs().max() == 2 and (where[:, 1] - 9).abs().max() == 2


def test_corner_pixel_can_be_shifted_out() -> None:
    images = torch.zeros(200, 1, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = 99
    out = augment_batch(images, CROP_ONLY, _gen(3))
    kept = (out > 0).sum(dim=(1, 2, 3))
    assert set(kept.tolist()) == {0, 1}  # shifted out or kept, never duplicated
    assert 0.2 < (kept == 1).float().mean() < 0.6  # kept iff both offsets <= 0: 9/25


def test_flip_flips_about_half() -> None:
    images = _random_batch(1000, h=6, w=7)
    out = augment_batch(images, FLIP_ONLY, _gen(4))
    same = (out == images).flatten(1).all(dim=1)
    flipped = (out == images.flip(-1)).flatten(1).all(dim=1)
    assert torch.all(same ^ flipped)
    assert 400 < int(flipped.sum()) < 600


def test_erasing_zeroes_one_rectangle_in_selected_images_only() -> None:
    images = torch.full((400, 3, 28, 28), 200, dtype=torch.uint8)
    out = augment_batch(images, ERASE_ONLY, _gen(5))
    erased = 0
    for result in out:
        zero = result == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # all channels
        if not zero.any():
            assert torch.equal(result, images[0])
            continue
        erased += 1
        rows = zero[0].any(dim=1).nonzero().view(-1)
        cols = zero[0].any(dim=0).nonzero().view(-1)
        box = zero[0, int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
        assert bool(box.all()), "the zeros form a filled rectangle"
        assert int(zero[0].sum()) == box.numel()
        assert box.numel() <= 0.25 * 28 * 28 + 1
        assert torch.all(result[~zero] == 200)
    assert 150 < erased < 250


def test_erasing_with_probability_one_and_zero() -> None:
    images = torch.full((50, 1, 16, 16), 9, dtype=torch.uint8)
    always = augment_batch(images, AugmentationPreset(erase_probability=1.0), _gen(6))
    assert torch.all((always == 0).flatten(1).any(dim=1))
    never = augment_batch(images, AugmentationPreset(erase_probability=0.0), _gen(6))
    assert torch.equal(never, images)


@pytest.mark.parametrize("name", ["flip", "standard", "strong"])
def test_same_seed_same_output(name: str) -> None:
    images = _random_batch(64)
    first = augment_batch(images, PRESETS[name], _gen(7))
    assert torch.equal(first, augment_batch(images, PRESETS[name], _gen(7)))
    assert not torch.equal(first, augment_batch(images, PRESETS[name], _gen(8)))


def test_strong_preset_uses_pad_four() -> None:
    images = torch.zeros(300, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 14, 14] = 255
    out = augment_batch(images, AugmentationPreset(crop_padding=4), _gen(9))
    where = (out[:, 0] > 0).nonzero()[:, 1:]
    assert (where - 14).abs().max() == 4
