"""Batched augmentation on the training device, with per-sample random parameters.

Every transform takes a float batch in [0, 1], shape (N, 3, H, W), on any device, and draws one
random parameter per image from the given ``torch.Generator`` (so a seed reproduces it). The
crop's padding scales with the image size (``augment.crop_padding`` is in pixels of a 32x32 image:
:func:`crop_pixels`), and :func:`normalize` takes the data's per-channel mean and std
(``normsweep.data.DataInfo``). The order follows the study's torchvision pipeline: colour jitter,
then crop, flip and rotation.
ColorJitter here applies brightness, contrast, saturation, hue in that fixed order (torchvision
shuffles the order per image); the factors are drawn as torchvision draws them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from normsweep.config import AugmentConfig


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _hue(x: torch.Tensor, maxc: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """HSV hue in [0, 1) of RGB images, given their per-pixel max and chroma (max - min)."""
    r, g, b = x.unbind(1)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    h = torch.where(maxc == r, (g - b) / crd, torch.where(maxc == g, 2.0 + (b - r) / crd, 4.0 + (r - g) / crd))
    return torch.remainder(h / 6.0, 1.0)


# Channel offsets of the closed-form HSV -> RGB: f(n) = V - C * clamp(min(k, 4 - k), 0, 1),
# k = (n + 6H) mod 6, with n = 5, 3, 1 for R, G, B and C = V * S the chroma.
_RGB_OFFSETS = (5.0, 3.0, 1.0)


def _from_hue(h: torch.Tensor, maxc: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    offsets = torch.tensor(_RGB_OFFSETS, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * h.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) - cr.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift[i]`` turns (torchvision's adjust_hue, batched).

    Goes through hue, max and chroma only: saturation and value are never formed, and the
    closed-form HSV -> RGB needs no per-sextant table.
    """
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    h = torch.remainder(_hue(x, maxc, cr) + shift.view(-1, 1, 1), 1.0)
    return _from_hue(h, maxc, cr)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    n, dev = len(x), x.device
    if cfg.brightness:
        f = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, g, dev)
        x = (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)
    if cfg.contrast:
        f = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g, dev)
        x = _blend(x, _grayscale(x).mean((1, 2, 3), keepdim=True), f)
    if cfg.saturation:
        f = _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, g, dev)
        x = _blend(x, _grayscale(x), f)
    if cfg.hue:
        x = shift_hue(x, _uniform(n, -cfg.hue, cfg.hue, g, dev))
    return x


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """A random HxW window of each image reflect-padded by ``padding`` pixels per side."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * padding)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=g, device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_rotate(x: torch.Tensor, max_deg: float, g: torch.Generator) -> torch.Tensor:
    """Rotation by a uniform angle in [-max_deg, max_deg], nearest pixel, zero fill (torchvision's default)."""
    angle = _uniform(len(x), -max_deg, max_deg, g, x.device) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def crop_pixels(crop_padding: int, image_size: int) -> int:
    """The crop's padding for ``image_size`` pixels: ``augment.crop_padding`` is set for 32x32 images and
    scales in proportion, round(crop_padding * image_size / 32) (4 -> 8 at 64x64, 2 at 16x16)."""
    return round(crop_padding * image_size / 32)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Apply every transform that ``cfg`` turns on to a float batch in [0, 1] of square images."""
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        x = color_jitter(x, cfg, g)
    padding = crop_pixels(cfg.crop_padding, x.shape[-1])
    if padding:
        x = random_crop(x, padding, g)
    if cfg.flip_p:
        x = random_flip(x, cfg.flip_p, g)
    if cfg.rotate_deg:
        x = random_rotate(x, cfg.rotate_deg, g)
    return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    return x.float().div_(255)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Standardize with the data's per-channel ``mean`` and ``std`` (``DataInfo``: CIFAR-10's published
    constants, or computed from the training images). Per batch, pass them as tensors on ``x``'s device
    (:func:`~normsweep.run.train.batches` does): from Python floats each call copies them to the device."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
