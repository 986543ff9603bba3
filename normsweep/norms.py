"""The normalization layers: one registry from ``norm.kind`` to a layer constructor.

Adding a norm is one entry in :data:`NORMS` and one file ``conf/norm/<kind>.yaml``; the config
schema's ``NormKind``, the models, the plots and the benchmark all read this registry.

A model never sees ``norm.kind``: it gets a :data:`NormLayer`, a callable ``(channels, where)``
built once from the config by :func:`norm_layer` (the pattern of timm's ``create_norm``), and
calls it wherever it places a norm. ``where`` names the layer in error messages.

Layer Normalization for conv feature maps is ``GroupNorm(1, C)``: it normalizes each sample over
(C, H, W) and learns one scale and shift per channel. ``nn.LayerNorm([C, H, W])`` would learn a
scale and shift per *pixel* (2*C*H*W parameters: 20,480 for a 10x32x32 map) and blow the budget.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .errors import ConfigError

NormLayer = Callable[[int, str], nn.Module]  # (channels, where) -> the norm layer for that feature map


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _group_norm(channels: int, groups: int, where: str) -> nn.Module:
    if groups < 1 or channels % groups:
        raise ConfigError(
            f"norm.groups={groups} does not divide the {channels} channels of layer {where!r}; "
            f"GroupNorm needs a group count that divides every layer's channels "
            f"(choose one of {_divisors(channels)} for this layer, or change model widths)"
        )
    return nn.GroupNorm(groups, channels)


# norm.kind -> (channels, norm.groups, where) -> layer. The order is the plots' colour order.
NORMS: dict[str, Callable[[int, int, str], nn.Module]] = {
    "batch": lambda c, g, where: nn.BatchNorm2d(c),
    "group": _group_norm,
    "layer": lambda c, g, where: nn.GroupNorm(1, c),  # LayerNorm over (C, H, W), per-channel affine
    "instance": lambda c, g, where: nn.GroupNorm(c, c),  # InstanceNorm with per-channel affine
    "none": lambda c, g, where: nn.Identity(),
}


def norm_layer(kind: str, groups: int = 1) -> NormLayer:
    """The constructor of ``kind`` norm layers for a model (``norm.groups`` is used by GroupNorm)."""
    if kind not in NORMS:
        raise ConfigError(f"norm.kind={kind!r} is unknown; expected one of {tuple(NORMS)}")
    make = NORMS[kind]
    return lambda channels, where="": make(channels, groups, where)
