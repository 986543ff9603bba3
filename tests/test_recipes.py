"""A norm's recipe against the config groups a command chose: what it changed is named, nothing else."""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from normsweep.run.recipes import chosen_groups, recipe_conflicts

from .conftest import compose_config


def job(overrides: list[str]):
    """The job config and group choices ``python -m normsweep OVERRIDES`` would run with."""
    cfg = compose_config(overrides, return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def conflicts(overrides: list[str]) -> list[str]:
    composed: list[list[str]] = []

    def compose(ov: list[str]):
        composed.append(ov)
        return compose_config(ov)

    cfg, choices = job(overrides)
    found = recipe_conflicts(cfg, overrides, choices, compose)
    assert all("recipe=shared" in ov for ov in composed)  # compared with the same command without a recipe
    return found


@pytest.mark.parametrize(
    "more",
    [
        [],
        ["search=optuna", "search.n_trials=1", "optimizer.momentum=0.8"],
    ],  # a search job's overrides, as a worker's are
)
def test_an_sgd_recipe_s_learning_rate_over_a_chosen_adam_is_named_with_both_values(more: list[str]) -> None:
    assert conflicts(["norm=frn", "optimizer=adam", *more]) == [
        "optimizer.lr=0.1 (conf/recipe/frn.yaml) instead of optimizer=adam's 0.003"
    ]


def test_a_key_the_recipe_changed_is_named_only_where_the_chosen_option_sets_it_otherwise_than_the_default() -> None:
    found = conflicts(["norm=batch", "optimizer=adamw"])
    assert found == ["optimizer.weight_decay=0.001 (conf/recipe/batch.yaml) instead of optimizer=adamw's 0.05"]
    # optimizer.base_batch_size, which the recipe sets too, is not named: adamw leaves it as sgd does


@pytest.mark.parametrize(
    "overrides",
    [
        ["norm=batch"],  # the default groups: what the recipe was tuned with
        ["norm=batch", "optimizer=sgd"],  # the default option, chosen explicitly
        ["norm=group", "norm.groups=2"],  # the norm's own keys are what norm= asked for
        ["norm=batch", "optimizer=adamw", "recipe=shared"],  # no recipe
        ["norm=instance", "optimizer=adam"],  # a norm without a recipe
        ["norm=frn", "optimizer=adam", "optimizer.lr=0.003"],  # the key given: the user's own
        ["norm=layer", "augment=seed"],  # a chosen group the recipe does not touch
    ],
)
def test_nothing_is_named_where_the_recipe_overrode_no_choice(overrides: list[str]) -> None:
    assert conflicts(overrides) == []


def test_a_key_given_on_the_command_line_is_not_named_but_the_others_are() -> None:
    found = conflicts(["norm=frn", "optimizer=adamw", "optimizer.weight_decay=0.01"])
    assert found == ["optimizer.lr=0.1 (conf/recipe/frn.yaml) instead of optimizer=adamw's 0.003"]
    assert conflicts(["norm=frn", "optimizer=adamw", "optimizer.lr=0.003"]) == []


def test_the_chosen_groups_are_the_command_line_s_group_options_but_the_norm_s() -> None:
    choices = {"norm": "batch", "optimizer": "adam", "augment": "seed", "recipe": "batch", "model": "resnet"}
    overrides = [
        "norm=batch",
        "optimizer=adam",
        "+augment=seed",
        "optimizer.lr=0.1",
        "recipe=batch",
        "model.dropout=0.1",
    ]
    assert chosen_groups(overrides, choices) == ["optimizer", "augment"]
