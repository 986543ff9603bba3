"""The model families: one registry, :data:`MODELS`, from ``model.arch`` to a builder.

A builder takes the ``model.*`` settings, the norm chosen (:class:`NormChoice`, from ``norm.*``),
the data's class count and image size, and returns the network with that norm in every
normalization place. normsweep's own CNNs (:mod:`normsweep.models.cnn`) take a norm-act callable
and place it themselves; a family of existing networks (torchvision's, the user's own) builds the
network as its authors wrote it and swaps its norms. Adding a family is one
:meth:`~normsweep.base.registry.Registry.register` call and one ``conf/model/<arch>.yaml``; the
schema's ``model.arch`` values are this registry's names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from torch import nn

from normsweep.base.registry import Registry
from normsweep.models import custom, torchvision
from normsweep.models.cnn import Dropout, ResNet, StudyNet, WSConv2d, count_params  # noqa: F401 - the models' API
from normsweep.norms import NormAct, norm_act


@dataclass(frozen=True)
class NormChoice:
    """The norm a config asks for: ``norm.kind``, ``norm.groups``, ``norm.ws`` and the norm's own keys."""

    kind: str
    groups: int = 1
    ws: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def norm_act(self) -> NormAct:
        return norm_act(self.kind, self.groups, **self.options)


# (model.* settings, the norm, num_classes, image_size) -> the network
Builder = Callable[[Any, NormChoice, int, int], nn.Module]


@dataclass(frozen=True)
class ModelFamily:
    build: Builder
    keys: tuple[str, ...] = ()  # model.* keys only this family reads (besides model.dropout)
    check: Callable[[Any], None] | None = None  # checks those keys' values when the config is read (ConfigError)


MODELS: Registry[ModelFamily] = Registry("model.arch")
MODELS.register(
    "study", ModelFamily(lambda m, norm, classes, size: StudyNet(norm.norm_act(), m.dropout, classes, ws=norm.ws))
)
MODELS.register(
    "resnet",
    ModelFamily(
        lambda m, norm, classes, size: ResNet(norm.norm_act(), m.dropout, m.widths, m.depths, classes, ws=norm.ws),
        keys=("widths", "depths"),
    ),
)
# Existing networks, their norms swapped (models/swap.py): torchvision's classifiers and the user's own class.
MODELS.register(
    "torchvision",
    ModelFamily(torchvision.build, keys=("name", "kwargs", "small_input_stem", "group_rule"), check=torchvision.check),
)
MODELS.register("custom", ModelFamily(custom.build, keys=("target", "kwargs", "group_rule"), check=custom.check))


def build_model(
    arch: str,
    norm: str,
    groups: int,
    dropout: float,
    widths: Sequence[int] = (),
    depths: Sequence[int] = (),
    num_classes: int = 10,
    ws: bool = False,
    norm_options: Mapping[str, Any] | None = None,
    image_size: int = 32,
) -> nn.Module:
    """The network named by ``model.arch`` with ``norm.kind`` layers, from plain arguments (``norm.groups``
    for GroupNorm and EvoNorm-S0; ``norm_options``: the norm's own ``norm.*`` keys; ``ws``: Weight
    Standardization for every 3x3 conv that feeds a norm layer). ``run.build.model_from_config`` is the
    same from a config."""
    settings = SimpleNamespace(dropout=dropout, widths=list(widths), depths=list(depths))
    choice = NormChoice(norm, groups, ws, dict(norm_options or {}))
    return MODELS.entry(arch).build(settings, choice, num_classes, image_size)
