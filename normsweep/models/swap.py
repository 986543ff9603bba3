"""Swap every feature-map norm of any ``nn.Module`` (torchvision's ResNet, MobileNet, ConvNeXt, your own) for a
norm of :data:`normsweep.norms.NORMS`, in place: :func:`swap_norms`.

Rules, in the order :func:`swap_norms` applies them:

* **What is replaced**: ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm2d`` and
  torchvision's channels-first ``LayerNorm2d`` (ConvNeXt), subclasses included, with the channel count
  ``num_features`` / ``num_channels`` / ``normalized_shape[0]``. The new layer is freshly initialized (nothing is
  copied from the old one), in the old one's training mode, on its device and in its floating dtype (a layer with
  no tensors of its own: the model's first parameter's). Everything else stays; the leaf modules whose class is
  a norm (``nn.BatchNorm1d`` in a head, ``nn.LayerNorm`` over tokens or channels-last maps, any class named
  ``*Norm*``) are listed in the report as untouched. A module registered under several names is replaced by one
  new layer everywhere.
* **Groups** (GroupNorm, EvoNorm-S0: ``Norm.grouped``): where ``groups`` does not divide a layer's channels,
  ``group_rule="divisor"`` uses the largest divisor of the channels below ``groups`` (the report lists each such
  layer as ``name -> (asked, used)``); ``group_rule="exact"`` raises the registry's ConfigError naming the layer.
* **Activations**: a norm that is also an activation (``Norm.activates``: FRN + TLU, EvoNorm) put where the model
  applies its own activation after the norm would apply two. ``act="keep"`` (default) keeps the model's
  activations, so it refuses such a norm; ``act="replace"`` replaces the activation module that directly follows
  each norm in its ``nn.Sequential`` (ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, GELU, Mish, ELU) with
  ``nn.Identity`` (indices, hence ``state_dict`` keys, stay), and refuses, naming the layer, a norm with no such
  module after it: its activation is in ``forward`` code (torchvision's ResNet) or it has none (a projection
  conv's norm), which cannot be swapped. ``act`` does nothing for the other norms.
* **Weight Standardization** (``ws=True``): each exact ``nn.Conv2d`` that feeds a replaced norm becomes a
  :class:`WSConv2d` (its class is changed in place: same parameters, same ``state_dict``). "Feeds" is read from
  registration order, as forward code cannot be seen: the last leaf module registered before the norm that has
  parameters is that conv, with ``out_channels`` equal to the norm's channels, and only parameter-free modules
  (pooling, activations, dropout) between them. A conv with one weight per filter (a 1x1 depthwise conv) is left
  as it is: standardizing a single weight would zero it.

Nothing is changed unless every check passes: all new layers are built and checked first, then set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from normsweep.base.errors import ConfigError
from normsweep.models.cnn import WSConv2d
from normsweep.norms import NORMS, norm_layer

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish, nn.ELU)
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class SwapReport:
    """What :func:`swap_norms` did to the model (which it changed in place)."""

    kind: str
    replaced: Mapping[str, int]  # source class name -> layers replaced, e.g. {"BatchNorm2d": 20}
    untouched: tuple[tuple[str, str], ...]  # (dotted name, class name) of the norm-like modules left as they were
    groups: Mapping[str, tuple[int, int]]  # dotted name -> (asked, used) where the divisor rule changed the count
    activations: tuple[str, ...]  # activation modules replaced by nn.Identity (act="replace")
    standardized: tuple[str, ...]  # convs made WSConv2d (ws=True)
    params_before: int
    params_after: int

    def __str__(self) -> str:
        def some(names) -> str:
            names = list(names)
            return ", ".join(names[:3]) + (f", ... ({len(names)})" if len(names) > 3 else "")

        done = ", ".join(f"{n} {cls}" for cls, n in self.replaced.items()) or "nothing"
        parts = [f"norm={self.kind}: replaced {done}"]
        if self.groups:
            parts.append("groups " + some(f"{k} {a}->{u}" for k, (a, u) in self.groups.items()))
        if self.activations:
            parts.append(f"{len(self.activations)} activations -> Identity")
        if self.standardized:
            parts.append(f"{len(self.standardized)} convs weight-standardized")
        if self.untouched:
            parts.append("untouched " + some(f"{name} ({cls})" for name, cls in self.untouched))
        return "; ".join(parts + [f"params {self.params_before:,} -> {self.params_after:,}"])


def _swappable() -> tuple[type[nn.Module], ...]:
    kinds: list[type[nn.Module]] = [nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d]
    try:
        from torchvision.models.convnext import LayerNorm2d

        kinds.append(LayerNorm2d)
    except ImportError:  # torchvision is optional
        pass
    return tuple(kinds)


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):  # LayerNorm2d
        return module.normalized_shape[0]
    return module.num_features


def _children(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(dotted name, parent, attribute, module) for every registration of a module under ``model``."""
    seen: set[tuple[int, str]] = set()
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and (id(parent), attr) not in seen:
                seen.add((id(parent), attr))
                yield f"{parent_name}.{attr}" if parent_name else attr, parent, attr, child


def _used_groups(channels: int, groups: int, rule: str) -> int:
    if rule == "exact" or groups < 1 or channels % groups == 0:
        return groups  # the registry raises where this does not divide
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


def _placed(new: nn.Module, old: nn.Module, fallback: torch.Tensor | None) -> nn.Module:
    tensors = [*old.parameters(), *old.buffers()]
    floats = [t for t in tensors if t.is_floating_point()] or ([fallback] if fallback is not None else [])
    device = tensors[0].device if tensors else (fallback.device if fallback is not None else None)
    return new.to(device=device, dtype=floats[0].dtype if floats else None).train(old.training)


def _feeding_conv(leaves: list[nn.Module], norm: nn.Module, channels: int, norms: set[int]) -> nn.Conv2d | None:
    for module in reversed(leaves[: leaves.index(norm)]):
        if id(module) in norms or any(True for _ in module.parameters()):
            conv = module if type(module) is nn.Conv2d and module.out_channels == channels else None
            return conv if conv is not None and conv.weight[0].numel() > 1 else None
    return None


GROUP_RULES = ("divisor", "exact")  # model.group_rule: the largest divisor <= groups, or groups must divide


def swap_norms(model: nn.Module, kind: str, groups: int = 4, group_rule: str = "divisor", ws: bool = False,
               act: str = "keep", **options) -> SwapReport:  # fmt: skip
    """Replace every feature-map norm of ``model`` with a ``kind`` norm of ``NORMS``, in place (the rules: this
    module's docstring). ``groups``: for GroupNorm and EvoNorm-S0; ``options``: the norm's own keys, as in
    ``conf/norm/<kind>.yaml`` (``eps`` for frn). Raises ConfigError, leaving the model unchanged, where a rule
    refuses."""
    if group_rule not in GROUP_RULES or act not in ("keep", "replace"):
        raise ConfigError(f"group_rule={group_rule!r}, act={act!r}: expected one of {GROUP_RULES}, 'keep' or 'replace'"
                          )  # fmt: skip
    entry, make = NORMS.entry(kind), norm_layer(kind, groups, **options)  # unknown kind or options: ConfigError
    swappable, sites = _swappable(), []
    if isinstance(model, swappable):
        raise ConfigError(f"the model is itself a {type(model).__name__}: wrap it in a module to swap it")
    for name, parent, attr, module in _children(model):
        if isinstance(module, swappable):
            sites.append((name, parent, attr, module))
    if entry.activates and act == "keep" and sites:
        raise ConfigError(f"norm={kind} is a norm and an activation in one layer; where the model applies its own "
                          f"activation after a norm (as after {sites[0][0]!r}), keeping it (act='keep', the default) "
                          "would apply two: act='replace' replaces the activation module after each norm")  # fmt: skip
    fallback = next((p for p in model.parameters() if p.is_floating_point()), None)
    params_before = sum(p.numel() for p in model.parameters())
    new: dict[int, nn.Module] = {}  # id(old norm) -> its replacement, built once for a shared module
    changed: dict[str, tuple[int, int]] = {}
    acts: list[tuple[str, nn.Module, str]] = []
    for name, parent, attr, module in sites:
        if id(module) not in new:
            c = _channels(module)
            used = _used_groups(c, groups, group_rule) if entry.grouped else groups
            if used != groups:
                changed[name] = (groups, used)
            layer = make if used == groups else norm_layer(kind, used, **options)
            new[id(module)] = _placed(layer(c, name), module, fallback)
        if entry.activates:
            keys = list(parent._modules)
            next_attr = keys[keys.index(attr) + 1] if keys.index(attr) + 1 < len(keys) else None
            if not isinstance(parent, nn.Sequential) or not isinstance(parent._modules.get(next_attr), ACTIVATIONS):
                raise ConfigError(f"norm={kind} is a norm and an activation in one layer, but layer {name!r} "
                                  f"({type(module).__name__}) is not followed by an activation module in an "
                                  "nn.Sequential: its activation, if any, is in forward code, which cannot be "
                                  f"replaced; norm={kind} cannot be swapped into this model")  # fmt: skip
            acts.append((f"{name.rpartition('.')[0]}.{next_attr}".lstrip("."), parent, next_attr))
    convs: dict[str, nn.Conv2d] = {}
    if ws:
        leaves = [m for m in model.modules() if id(m) in new or next(m.children(), None) is None]
        for _, _, _, module in sites:
            conv = _feeding_conv(leaves, module, _channels(module), set(new))
            if conv is not None and conv not in convs.values():
                convs[next(n for n, m in model.named_modules() if m is conv)] = conv
    # every check passed: change the model
    replaced = Counter(type(module).__name__ for module in {id(m): m for *_, m in sites}.values())
    for _, parent, attr, module in sites:
        setattr(parent, attr, new[id(module)])
    for _, parent, attr in acts:
        setattr(parent, attr, nn.Identity())
    for conv in convs.values():
        conv.__class__ = WSConv2d
    added = {id(m) for m in new.values()}
    untouched = tuple((name, type(m).__name__) for name, _, _, m in _children(model)
                      if id(m) not in added and next(m.children(), None) is None
                      and (isinstance(m, _TORCH_NORMS) or "norm" in type(m).__name__.lower()))  # fmt: skip
    return SwapReport(kind, dict(replaced), untouched, changed, tuple(n for n, _, _ in acts), tuple(convs),
                      params_before, sum(p.numel() for p in model.parameters()))  # fmt: skip
