"""Batched augmentation on the training device, with per-sample random parameters.

Every transform takes a float batch in [0, 1], shape (N, 3, H, W), on any device, and draws one
random parameter per image from the given ``torch.Generator`` (so a seed reproduces it). The
order follows the study's torchvision pipeline: colour jitter, then crop, flip and rotation.
ColorJitter here applies brightness, contrast, saturation, hue in that fixed order (torchvision
shuffles the order per image); the factors are drawn as torchvision draws them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import AugmentConfig
from .data import MEAN, STD


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    # For each hue sextant i, (r, g, b) is a fixed choice among (v, p, q, t).
    table = torch.stack(
        (
            torch.stack((v, q, p, p, t, v), 1),
            torch.stack((t, v, v, q, p, p), 1),
            torch.stack((p, p, t, v, v, q), 1),
        ),
        1,
    )  # (N, 3, 6, H, W)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


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
        shift = _uniform(n, -cfg.hue, cfg.hue, g, dev).view(-1, 1, 1)
        hsv = rgb_to_hsv(x)
        hsv = torch.stack((torch.remainder(hsv[:, 0] + shift, 1.0), hsv[:, 1], hsv[:, 2]), 1)
        x = hsv_to_rgb(hsv)
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


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Apply every transform that ``cfg`` turns on to a float batch in [0, 1]."""
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        x = color_jitter(x, cfg, g)
    if cfg.crop_padding:
        x = random_crop(x, cfg.crop_padding, g)
    if cfg.flip_p:
        x = random_flip(x, cfg.flip_p, g)
    if cfg.rotate_deg:
        x = random_rotate(x, cfg.rotate_deg, g)
    return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    return x.float().div_(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Standardize with CIFAR-10's per-channel mean and std."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
