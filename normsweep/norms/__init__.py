"""The normalization layers: one registry from ``norm.kind`` to a layer and what it needs.

Adding a norm is one entry in :data:`NORMS` and one file ``conf/norm/<kind>.yaml`` (which sets
the entry's ``options``; a key of its own is also a field of ``config.NormConfig``, see
docs/development.md, "Adding a norm"); the config schema's ``NormKind`` and its checks, the models, the plots
and the benchmark all read this registry.

A model never sees ``norm.kind``: it asks for a *norm-act* layer (the pattern of timm's
``create_norm_act``), a :data:`NormAct` callable ``(channels, where, act_first=False)`` built once
from the config by :func:`norm_act`, which returns the modules to place after a conv. A plain norm
comes with the ReLU that follows it (that precedes it with ``act_first``, the study network's
order); a layer that is a norm and an activation in one (``Norm.activates``: FRN + TLU, EvoNorm)
comes alone, with no ReLU around it. The models never special-case a norm. ``where`` names the
layer in error messages.

Layer Normalization for conv feature maps is ``GroupNorm(1, C)``: it normalizes each sample over
(C, H, W) and learns one scale and shift per channel. ``nn.LayerNorm([C, H, W])`` would learn a
scale and shift per *pixel* (2*C*H*W parameters: 20,480 for a 10x32x32 map) and blow the budget.

Batch Renormalization, FRN + TLU and EvoNorm-S0/B0 are :mod:`normsweep.norms.layers` (its
docstring says why not timm's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from torch import nn

from normsweep.base.errors import ConfigError
from normsweep.base.registry import Registry
from normsweep.norms.layers import BatchRenorm2d, EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTLU2d

NormLayer = Callable[[int, str], nn.Module]  # (channels, where) -> the norm layer for that feature map
NormAct = Callable[..., list[nn.Module]]  # (channels, where, act_first=False) -> the modules after a conv


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _groups(channels: int, groups: int, where: str, layer: str) -> int:
    if groups < 1 or channels % groups:
        raise ConfigError(
            f"norm.groups={groups} does not divide the {channels} channels of layer {where!r}; "
            f"{layer} needs a group count that divides every layer's channels "
            f"(choose one of {_divisors(channels)} for this layer, or change model widths)"
        )
    return groups


@dataclass(frozen=True)
class Norm:
    make: Callable[[int, SimpleNamespace, str], nn.Module]  # (channels, norm.* settings, where) -> layer
    options: tuple[str, ...] = ()  # norm.* keys only this norm reads; conf/norm/<kind>.yaml sets them
    activates: bool = False  # a norm and an activation in one layer: the model adds no ReLU
    batch_statistics: bool = False  # normalizes with batch statistics in training, running ones in eval
    grouped: bool = False  # reads norm.groups (GroupNorm, EvoNorm-S0)


BATCH_RENORM_OPTIONS = ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps")

# norm.kind -> its layer. The order is the plots' colour order.
NORMS: Registry[Norm] = Registry("norm.kind")
NORMS.register("batch", Norm(lambda c, s, where: nn.BatchNorm2d(c), batch_statistics=True))
NORMS.register(
    "group", Norm(lambda c, s, where: nn.GroupNorm(_groups(c, s.groups, where, "GroupNorm"), c), grouped=True)
)
NORMS.register("layer", Norm(lambda c, s, where: nn.GroupNorm(1, c)))  # LayerNorm over (C, H, W), per-channel affine
NORMS.register("instance", Norm(lambda c, s, where: nn.GroupNorm(c, c)))  # InstanceNorm with per-channel affine
NORMS.register("none", Norm(lambda c, s, where: nn.Identity()))
NORMS.register(
    "batch_renorm",
    Norm(
        lambda c, s, where: BatchRenorm2d(c, **{k: getattr(s, k) for k in BATCH_RENORM_OPTIONS}),
        options=BATCH_RENORM_OPTIONS,
        batch_statistics=True,
    ),
)
NORMS.register("frn", Norm(lambda c, s, where: FilterResponseNormTLU2d(c, s.eps), options=("eps",), activates=True))
NORMS.register(
    "evonorm_s0",
    Norm(lambda c, s, where: EvoNorm2dS0(c, _groups(c, s.groups, where, "EvoNorm-S0")), activates=True, grouped=True),
)
NORMS.register("evonorm_b0", Norm(lambda c, s, where: EvoNorm2dB0(c), activates=True, batch_statistics=True))


def norm_layer(kind: str, groups: int = 1, **options) -> NormLayer:
    """The constructor of bare ``kind`` norm layers (``norm.groups`` for GroupNorm and EvoNorm-S0;
    ``options``: the entry's own ``norm.*`` keys, e.g. ``eps`` for FRN)."""
    entry = NORMS.entry(kind)
    missing = [k for k in entry.options if options.get(k) is None]
    if missing:
        raise ConfigError(f"norm={kind} needs norm.{missing[0]} (conf/norm/{kind}.yaml sets it)")
    extra = sorted(set(options) - set(entry.options))
    if extra:
        raise ConfigError(f"norm.{extra[0]} is not a setting of norm={kind}")
    settings = SimpleNamespace(groups=groups, **options)
    return lambda channels, where="": entry.make(channels, settings, where)


def norm_act(kind: str, groups: int = 1, **options) -> NormAct:
    """What a model places after a conv for ``kind``: the norm and its ReLU, or the one layer that is both."""
    layer, activates = norm_layer(kind, groups, **options), NORMS[kind].activates

    def make(channels: int, where: str = "", act_first: bool = False) -> list[nn.Module]:
        norm = layer(channels, where)
        if activates:  # FRN + TLU, EvoNorm: the activation is part of the layer
            return [norm]
        relu = nn.ReLU(inplace=True)
        return [relu, norm] if act_first else [norm, relu]

    return make
