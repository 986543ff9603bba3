"""``model=torchvision``: any classification builder of ``torchvision.models``, its norms swapped for the chosen one.

:func:`build` makes ``torchvision.models.get_model(model.name, weights=None, num_classes=..., **model.kwargs)``
(randomly initialized: a norm comparison trains from scratch), gives it the small-input stem of its family
(:data:`SMALL_INPUT_STEMS`) where the images are small, then :func:`~normsweep.models.swap.swap_norms` with the
config's norm (``act="replace"``, so FRN + TLU and EvoNorm take the place of the activation after each norm where
the model has one as a module in an ``nn.Sequential``, and are refused with the reason elsewhere). A model with no
feature-map norm to swap (``alexnet``, ``vgg11``, ``squeezenet*``, the vision transformers, whose ``nn.LayerNorm``
normalizes tokens) is refused: there is nothing to compare.

The builders are those ``torchvision.models.list_models(module=torchvision.models)`` lists: the top-level
classifiers, not the detection, segmentation, optical-flow, video or quantized ones (:func:`classifiers`).
torchvision is imported when a model is built or a name checked, not when normsweep is.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from normsweep.base.errors import ConfigError
from normsweep.models.swap import SwapReport, swap_norms

log = logging.getLogger(__name__)

SMALL_IMAGE = 64  # model.small_input_stem=null: the small-input stem where images are at most this many pixels wide


def classifiers() -> list[str]:
    """The names ``model.name`` takes: torchvision's top-level classification builders."""
    from torchvision import models

    return models.list_models(module=models)


def check(settings: Any) -> None:
    """The ``model.*`` keys of ``model=torchvision`` when the config is read: the name, and no ``model.dropout``."""
    check_name(settings.name)
    no_dropout(settings, "torchvision")


def no_dropout(settings: Any, arch: str) -> None:
    """``model.dropout`` is normsweep's CNNs' own: another model has its own dropout (a builder argument), or none."""
    if settings.dropout:
        raise ConfigError(f"model.dropout={settings.dropout} is invalid: expected 0 with model={arch}, which does not "
                          "read it (its dropout, if it has one, is a constructor argument: model.kwargs.dropout=..., "
                          "e.g. for MobileNet, EfficientNet, DenseNet's drop_rate; search.params must not tune "
                          "model.dropout)")  # fmt: skip


def check_name(name: str | None) -> None:
    """``model.name`` is one of :func:`classifiers`, or a ConfigError with the closest names."""
    if name is None:
        raise ConfigError("model=torchvision needs model.name, a torchvision classifier such as resnet18")
    names = classifiers()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"model.name={name!r} is not a classification model of torchvision; {hint}"
                          f"the {len(names)} there are: {', '.join(names)}")  # fmt: skip


# ------------------------------------------------------------------ small-input stems, per family


def _conv(model: nn.Module, path: str) -> nn.Conv2d:
    module = model.get_submodule(path)
    assert isinstance(module, nn.Conv2d), (path, module)
    return module


def _stride_one(*convs: str, drop: tuple[str, ...] = ()) -> Callable[[nn.Module], None]:
    """The first conv at stride 1 (its weights unchanged), the pooling layers ``drop`` made ``nn.Identity``."""

    def adapt(model: nn.Module) -> None:
        for path in convs:
            _conv(model, path).stride = (1, 1)
        for path in drop:
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.Identity())

    return adapt


def _conv3x3_stride_one(conv: str, pool: str) -> Callable[[nn.Module], None]:
    """The 7x7 stride-2 stem conv made a 3x3 stride-1 one (a new layer, as many filters), the max-pool removed."""

    def adapt(model: nn.Module) -> None:
        old = _conv(model, conv)
        parent, _, attr = conv.rpartition(".")
        new = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
        setattr(model.get_submodule(parent), attr, new.to(old.weight.device))
        _stride_one(drop=(pool,))(model)

    return adapt


def _patch_2x2(model: nn.Module) -> None:
    """ConvNeXt's 4x4 stride-4 patchify stem made 2x2 stride 2 (a new layer, as many filters)."""
    old = _conv(model, "features.0.0")
    new = nn.Conv2d(old.in_channels, old.out_channels, 2, stride=2, bias=old.bias is not None)
    model.features[0][0] = new.to(old.weight.device)


# The model's class name -> (what the stem becomes, the change). The usual CIFAR adaptations: the downsampling
# that 224-pixel ImageNet images need before the first stage is dropped, so that a 32x32 image still has a
# feature map at the last stage (ResNet's 7x7/2 conv and 3x3/2 max-pool would leave 1x1 at its last stage).
# A family not here keeps its stem: VGG has no strided stem, Inception v3 needs 75x75 images or more, MaxViT's
# sizes are its input_size (model.kwargs). docs/configuration.md's table says the same.
SMALL_INPUT_STEMS: dict[str, tuple[str, Callable[[nn.Module], None]]] = {
    "ResNet": ("conv1 -> 3x3 stride 1, maxpool removed", _conv3x3_stride_one("conv1", "maxpool")),
    "DenseNet": ("features.conv0 -> 3x3 stride 1, features.pool0 removed",
                 _conv3x3_stride_one("features.conv0", "features.pool0")),
    "GoogLeNet": ("conv1 at stride 1, maxpool1 removed", _stride_one("conv1.conv", drop=("maxpool1",))),
    "ShuffleNetV2": ("conv1 at stride 1, maxpool removed", _stride_one("conv1.0", drop=("maxpool",))),
    "MobileNetV2": ("features.0 at stride 1", _stride_one("features.0.0")),
    "MobileNetV3": ("features.0 at stride 1", _stride_one("features.0.0")),
    "EfficientNet": ("features.0 at stride 1", _stride_one("features.0.0")),
    "MNASNet": ("layers.0 at stride 1", _stride_one("layers.0")),
    "RegNet": ("stem at stride 1", _stride_one("stem.0")),
    "ConvNeXt": ("the 4x4 stride-4 patchify stem -> 2x2 stride 2", _patch_2x2),
}  # fmt: skip

# Builder arguments that differ from torchvision's defaults; model.kwargs overrides them. GoogLeNet and
# Inception v3 return their auxiliary classifiers' outputs too in training unless told not to.
DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
MIN_IMAGE_SIZE = {"Inception3": 75}  # its stem's valid convolutions and pools need this many pixels


def build_plain(name: str, num_classes: int, image_size: int, kwargs: dict | None = None,
                small_input_stem: bool | None = None) -> tuple[nn.Module, str]:  # fmt: skip
    """torchvision's ``name`` for ``num_classes`` classes and ``image_size`` images, its norms as torchvision made
    them, and what was done to its stem ("" for nothing)."""
    from torchvision import models

    check_name(name)
    args = {**DEFAULT_KWARGS.get(name, {}), **(kwargs or {})}
    if name.startswith("maxvit"):
        args.setdefault("input_size", (image_size, image_size))
    for key in ("num_classes", "weights"):
        if key in args:
            raise ConfigError(f"model.kwargs.{key} is set by normsweep (the data's class count; weights=None: "
                              f"trained from scratch); remove it from model.kwargs")  # fmt: skip
    try:
        model = models.get_model(name, weights=None, num_classes=num_classes, **args)
    except (TypeError, ValueError) as e:  # an argument the builder does not take, or a size it cannot use
        raise ConfigError(f"torchvision's {name}(**model.kwargs={dict(args)}) failed: {e}") from e
    family = type(model).__name__
    if image_size < MIN_IMAGE_SIZE.get(family, 0):
        raise ConfigError(f"model.name={name} needs images of at least {MIN_IMAGE_SIZE[family]}x"
                          f"{MIN_IMAGE_SIZE[family]} pixels; the data's are {image_size}x{image_size}")  # fmt: skip
    stem = ""
    if small_input_stem or (small_input_stem is None and image_size <= SMALL_IMAGE and family in SMALL_INPUT_STEMS):
        if family not in SMALL_INPUT_STEMS:
            raise ConfigError(f"model.small_input_stem=true, but {name} ({family}) has no small-input stem in "
                              f"normsweep (docs/configuration.md lists them: {', '.join(SMALL_INPUT_STEMS)}); "
                              "leave it null or set it false")  # fmt: skip
        stem, adapt = SMALL_INPUT_STEMS[family]
        adapt(model)
    return model, stem


def build(settings: Any, norm: Any, num_classes: int, image_size: int) -> nn.Module:
    """The ``model=torchvision`` builder of :data:`normsweep.models.MODELS`: :func:`build_plain`, then the swap."""
    model, stem = build_plain(settings.name, num_classes, image_size, dict(settings.kwargs or {}),
                              settings.small_input_stem)  # fmt: skip
    report = swap(model, norm, f"model.name={settings.name}", settings.group_rule)
    log.info("torchvision %s%s; %s", settings.name, f" with the small-input stem ({stem})" if stem else "", report)
    return model


def swap(model: nn.Module, norm: Any, what: str, group_rule: str | None = None) -> SwapReport:
    """The config's norm (a :class:`normsweep.models.NormChoice`) swapped into ``model`` with ``model.group_rule``
    (null: ``divisor``): refused where the model has no feature-map norm to replace."""
    report = swap_norms(model, norm.kind, groups=norm.groups, group_rule=group_rule or "divisor", ws=norm.ws,
                        act="replace", **dict(norm.options))  # fmt: skip
    if not report.replaced:
        others = ", ".join(sorted({cls for _, cls in report.untouched}))
        raise ConfigError(
            f"{what} has no feature-map norm layer to swap (BatchNorm2d, SyncBatchNorm, GroupNorm, InstanceNorm2d, "
            f"ConvNeXt's LayerNorm2d){f'; its {others} layers are left as they are' if others else ''}: there is "
            f"nothing to compare norms in. Choose a model that has them (vgg11_bn, not vgg11)"
        )
    return report
