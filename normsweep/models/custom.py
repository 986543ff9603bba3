"""``model=custom model.target=my_pkg.nets.MyNet``: your own ``nn.Module`` class, its norms swapped for the chosen one.

:func:`import_target` imports the class named by a dotted path, as Hydra's ``_target_`` names one: a module
importable from the launch directory (``run.build.model_from_config`` puts it on ``sys.path``, as ``python -m``
does) or from an installed package, then the class's name in it. Importing the module runs it: it is your code, run
as your training script would run it; name only modules you trust. :func:`build` constructs the class with
``num_classes`` (the data's), ``image_size`` where it takes one, and ``model.kwargs``, then swaps its norms exactly as ``model=torchvision`` does
(:func:`normsweep.models.torchvision.swap`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

from torch import nn

from normsweep.base.errors import ConfigError
from normsweep.models.torchvision import no_dropout, swap

log = logging.getLogger(__name__)


def check(settings: Any) -> None:
    """The ``model.*`` keys of ``model=custom`` when the config is read (``model.target`` is required when the
    model is built, so that ``model=custom`` composes alone)."""
    if settings.target is not None:
        check_target(settings.target)
    no_dropout(settings, "custom")


def check_target(target: str | None) -> None:
    """``model.target`` is a dotted path ``package.module.Class`` (not imported here)."""
    if target is None:
        raise ConfigError("model=custom needs model.target, the dotted path of your nn.Module class "
                          "(model.target=my_pkg.nets.MyNet)")  # fmt: skip
    parts = target.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"model.target={target!r} is invalid: expected the dotted path of an nn.Module class, "
                          "module then class, e.g. model.target=my_pkg.nets.MyNet")  # fmt: skip


def import_target(target: str) -> type[nn.Module]:
    """The class ``target`` names: the longest importable module prefix, then attributes (``pkg.mod.Outer.Inner``)."""
    check_target(target)
    parts, missing = target.split("."), None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if cut > 1 and e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                missing = missing or e
                continue  # this prefix is no module: try a shorter one (pkg.mod.Class -> pkg.mod)
            raise ConfigError(f"model.target={target}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
                              "the module must be importable from the directory you launch normsweep in or "
                              "from an installed package") from e  # fmt: skip
        except Exception as e:  # the module itself raised while it ran
            raise ConfigError(
                f"model.target={target}: importing {module_name!r} failed: {type(e).__name__}: {e}"
            ) from e
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                why = f"cannot import {missing.name!r} ({missing})" if missing else f"{obj.__name__!r} has no {attr!r}"
                raise ConfigError(f"model.target={target}: {why}")
            obj = getattr(obj, attr)
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise ConfigError(f"model.target={target} is {obj!r}, not an nn.Module subclass")
        return obj
    raise AssertionError("unreachable: check_target requires a module and a name")


def _takes(cls: type, name: str) -> bool:
    """Whether ``cls``'s constructor has a parameter called ``name`` (not merely ``**kwargs``)."""
    try:
        return name in inspect.signature(cls).parameters
    except ValueError:  # no signature to read
        return False


def build(settings: Any, norm: Any, num_classes: int, image_size: int) -> nn.Module:
    """The ``model=custom`` builder of :data:`normsweep.models.MODELS`: ``Class(num_classes=..., **model.kwargs)``,
    plus ``image_size=`` (the data's) where the constructor has that parameter and ``model.kwargs`` does not set
    it, then the swap."""
    cls = import_target(settings.target)
    kwargs = dict(settings.kwargs or {})
    if "image_size" not in kwargs and _takes(cls, "image_size"):
        kwargs["image_size"] = image_size  # the data's (data.image_size, or the images' own)
    try:
        inspect.signature(cls).bind(num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.target={settings.target}: {cls.__name__}(num_classes={num_classes}, "
                          f"**model.kwargs={kwargs}) does not match its constructor {inspect.signature(cls)} ({e}); "
                          "it must take num_classes, and model.kwargs its other arguments") from e  # fmt: skip
    except ValueError:  # no signature to read (a builtin): let the call say
        pass
    model = cls(num_classes=num_classes, **kwargs)
    report = swap(model, norm, f"model.target={settings.target}", settings.group_rule)
    log.info("%s; %s", settings.target, report)
    return model
