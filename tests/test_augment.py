"""Batched augmentation: shapes, dtype, value range, per-sample randomness, reproducibility."""

from __future__ import annotations

import pytest
import torch

from normsweep.config import AugmentConfig
from normsweep.run.augment import _from_hue, _hue, augment_batch, normalize, random_crop, random_flip, shift_hue

SEED = AugmentConfig(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1, flip_p=0.3, rotate_deg=10.0)
CROP_FLIP = AugmentConfig(crop_padding=4, flip_p=0.5)


def batch(n: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """HSV through shift_hue's own pieces (augment._hue), to test them against torchvision."""
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    return torch.stack((_hue(x, maxc, cr), s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """RGB from HSV through shift_hue's closed form (augment._from_hue)."""
    h, s, v = x.unbind(1)
    return _from_hue(h, v, v * s)


@pytest.mark.parametrize("cfg", [SEED, CROP_FLIP, AugmentConfig()], ids=["seed", "crop_flip", "none"])
def test_augmentation_keeps_shape_dtype_and_range(cfg: AugmentConfig) -> None:
    x = batch()
    y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("cfg", [SEED, CROP_FLIP], ids=["seed", "crop_flip"])
def test_augmentation_is_reproducible_under_a_seed_and_random_per_sample(cfg: AugmentConfig) -> None:
    x = batch()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Same image repeated: different per-sample parameters give different outputs.
    same = x[:1].expand(16, -1, -1, -1).contiguous()
    out = augment_batch(same, cfg, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:200].tolist()) for o in out}) > 1


def test_no_augmentation_is_identity() -> None:
    x = batch()
    assert torch.equal(augment_batch(x, AugmentConfig(), torch.Generator()), x)


def test_flip_probability_extremes() -> None:
    x = batch()
    assert torch.equal(random_flip(x, 1.0, torch.Generator()), x.flip(3))
    assert torch.equal(random_flip(x, 0.0, torch.Generator()), x)
    flipped = (random_flip(x, 0.3, torch.Generator().manual_seed(0)) != x).flatten(1).any(1).float().mean()
    assert 0.05 < flipped < 0.6


def test_crop_is_a_shifted_window_of_the_padded_image() -> None:
    x = batch(32)
    y = random_crop(x, 4, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(len(x)):  # every output is exactly one 32x32 window of its own padded input
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
        assert (windows == y[i][:, None, None]).flatten(3).all(3).all(0).any()


def test_hsv_round_trip() -> None:
    x = batch(8)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)


def test_hsv_matches_torchvision() -> None:
    from torchvision.transforms.v2 import functional as TF

    x = batch(4)
    x[0, :, :4] = 0.5  # grey pixels: zero chroma
    x[1, :, :, :4] = 0.0  # black pixels
    hsv = rgb_to_hsv(x)
    assert torch.allclose(hsv_to_rgb(torch.stack((torch.remainder(hsv[:, 0] + 0.07, 1.0), hsv[:, 1], hsv[:, 2]), 1)),
                          TF.adjust_hue(x, 0.07), atol=1e-5)  # fmt: skip


def test_batched_hue_shift_matches_torchvision_per_image() -> None:
    from torchvision.transforms.v2 import functional as TF

    x = batch(6)
    x[0, :, :4] = 0.5  # grey pixels keep their colour under any hue shift
    shifts = torch.tensor([-0.5, -0.1, -0.03, 0.0, 0.07, 0.49])
    out = shift_hue(x, shifts)
    for i, s in enumerate(shifts.tolist()):
        assert torch.allclose(out[i], TF.adjust_hue(x[i : i + 1], s)[0], atol=1e-5), s


def test_normalize_standardizes_with_cifar_statistics() -> None:
    from normsweep.data import MEAN, STD

    x = torch.tensor(MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(normalize(x, MEAN, STD), torch.zeros(2, 3, 4, 4), atol=1e-6)
    x = (torch.tensor(MEAN) + torch.tensor(STD)).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(normalize(x, MEAN, STD), torch.ones(2, 3, 4, 4), atol=1e-6)
