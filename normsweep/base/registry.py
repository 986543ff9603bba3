"""One pattern for every choice a config makes: a registry from a name to what the name builds.

A :class:`Registry` is a ``dict`` (name -> entry) that knows the config key choosing from it, so a
lookup of an unknown name fails naming that key and the names there are (:meth:`Registry.entry`),
and the schema's allowed values are derived from it (:meth:`Registry.enum`), as ``NormKind`` is
from ``NORMS``. Adding a norm, a model family, a data source, an optimizer, a scheduler, a pruner
or a tracker is one :meth:`Registry.register` call (plus its ``conf/<group>/<name>.yaml``), never a
new branch in the code that uses it. The registries: ``norms.NORMS``, ``models.MODELS``,
``data.DATASETS``, ``run.optim.OPTIMIZERS`` and ``SCHEDULERS``, ``run.compiling.COMPILE_MODES``,
``search.pruners.PRUNERS``, ``run.trackers.TRACKERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TypeVar

from normsweep.base.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, T]):
    """``name -> entry`` for the config key ``key`` (``norm.kind``, ``model.arch``, ...); the order is
    the registration order (the plots' colour order for norms)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def register(self, name: str, entry: T | None = None) -> T | Callable[[T], T]:
        """``REG.register("name", entry)``, or ``@REG.register("name")`` above a function or class."""
        if entry is None:
            return lambda e: self.register(name, e)  # type: ignore[return-value]
        if name in self:
            raise ValueError(f"{self.key}={name!r} is registered twice")
        self[name] = entry
        return entry

    def entry(self, name: str) -> T:
        """The entry for ``name`` (an enum member's value is its name), or a ConfigError naming the key."""
        name = getattr(name, "value", name)
        if name not in self:
            raise ConfigError(f"{self.key}={name!r} is unknown; expected one of {tuple(self)}")
        return self[name]

    def enum(self, name: str) -> type[Enum]:
        """A ``str`` enum of the registered names, for the config schema (``NormKind``, ``ModelArch``, ...)."""
        return Enum(name, {n: n for n in self}, type=str)  # type: ignore[return-value]


def choice(value: object) -> str:
    """The name a config value holds: an enum member's value, or the string itself."""
    return getattr(value, "value", value)  # type: ignore[return-value]
