"""A norm's tuned recipe against the config groups a command chose.

A recipe (``conf/recipe/<norm>.yaml``) is tuned with the default groups and applied after them, so
``norm=frn optimizer=adam`` would run Adam at FRN's SGD learning rate 0.1, and ``norm=batch
optimizer=adamw`` AdamW at BatchNorm's weight decay 1e-3 instead of AdamW's 5e-2, without a word.
:func:`recipe_conflicts` names each key the recipe changed in a group that the command line
chose, so the job warns at start and says how to keep the group's value; a key given on the
command line is the user's and is not named.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from normsweep.config import dotted

log = logging.getLogger(__name__)

NO_RECIPE = "shared"  # recipe=shared: the groups' defaults as they are (conf/recipe/shared.yaml is empty)


def _yaml(value) -> str:
    return "null" if value is None else str(value)


def chosen_groups(overrides: Sequence[str], choices: dict) -> list[str]:
    """The config groups whose option the command line picked (``optimizer=adamw``), but the norm's.

    ``norm=`` picks the recipe itself, so the recipe's ``norm.*`` keys are what was asked for.
    """
    found = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" in o and key in choices and key not in ("norm", "recipe") and key not in found:
            found.append(key)
    return found


def recipe_conflicts(
    cfg: DictConfig, overrides: Sequence[str], choices: dict, compose: Callable[[list[str]], DictConfig]
) -> list[str]:
    """What the recipe changed of the options the command line chose, one line per key.

    A key is named when the chosen option sets it otherwise than the group's default option does
    (``optimizer=adamw``'s weight decay, not its unset ``base_batch_size``; nothing for an explicit
    ``optimizer=sgd``) and the recipe changed it. ``cfg`` is the job's config (the recipe
    applied); ``compose(overrides)`` composes the same config for other overrides: the command's
    with ``recipe=shared``, and that without the group choices. Empty, and nothing composed, when
    no recipe applies or no group was chosen.
    """
    recipe = choices.get("recipe")
    groups = chosen_groups(overrides, choices)
    if not recipe or recipe == NO_RECIPE or not groups:
        return []
    plain = [o for o in overrides if not o.lstrip("+~").startswith("recipe=")] + [f"recipe={NO_RECIPE}"]
    # The default options: each chosen group's choice dropped, and its keys set on the command line with it
    # (search.n_trials without search=optuna would set a key of a group that is not there).
    defaults = [o for o in plain if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0] not in groups]

    def keys(c: DictConfig) -> dict:
        return dotted(OmegaConf.to_container(c, resolve=True, enum_to_str=True))

    recipe_keys, chosen_keys, default_keys = keys(cfg), keys(compose(plain)), keys(compose(defaults))
    return [
        f"{key}={_yaml(recipe_keys[key])} (conf/recipe/{recipe}.yaml) instead of {group}={choices[group]}'s "
        f"{_yaml(chosen_keys.get(key))}"
        for group in groups
        for key in sorted(recipe_keys)
        if key.startswith(f"{group}.")
        and recipe_keys[key] != chosen_keys.get(key)
        and chosen_keys.get(key) != default_keys.get(key)
    ]


def warn_recipe_conflicts(cfg: DictConfig, overrides: Sequence[str], choices: dict) -> None:
    """Log :func:`recipe_conflicts` of the running Hydra job as one warning (nothing outside Hydra)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):
        return
    name = HydraConfig.get().job.config_name
    try:
        lines = recipe_conflicts(cfg, overrides, choices, lambda ov: compose(config_name=name, overrides=ov))
    except Exception as e:  # noqa: BLE001 - a warning must never stop a run
        log.info(
            "could not compare the %s recipe with the config groups chosen (%s): not checked", choices["recipe"], e
        )
        return
    if lines:
        recipe = choices["recipe"]
        log.warning(
            "the %s recipe, tuned with the default config groups, sets %s. Pass the key to keep the group's value "
            "(key=value wins over the recipe), or recipe=%s to run without a recipe",
            recipe, "; ".join(lines), NO_RECIPE,
        )  # fmt: skip
