"""Config composition through Hydra's compose API, and start-up validation of every key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from normsweep.config import Config, ConfigError
from normsweep.models import count_params
from normsweep.norms import NORMS
from normsweep.run.build import BudgetError, check_budget, model_from_config

from .conftest import make_cfg

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["norm", "model", "augment", "optimizer", "scheduler", "data", "trainer", "budget", "experiment", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_of_every_group_composes_and_validates(group: str, option: str) -> None:
    cfg = make_cfg(f"{group}={option}")
    assert isinstance(cfg, Config)
    if group == "norm":
        assert cfg.norm.kind.value == option
    if group in ("optimizer", "scheduler"):
        assert getattr(cfg, group).name.value == option
    if group == "model":
        assert cfg.model.arch.value == option
    if group == "logger":
        assert cfg.logger.kind.value == option


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


def test_default_is_normsweeps_recipe_within_budget() -> None:
    cfg = make_cfg()
    assert cfg.model.arch.value == "resnet" and cfg.scheduler.name.value == "onecycle"
    assert cfg.trainer.epochs <= cfg.budget.max_epochs
    for norm in NORMS:
        cfg = make_cfg(f"norm={norm}")
        params = count_params(model_from_config(cfg))
        assert params < 50_000, (norm, params)
        check_budget(cfg, params)  # does not raise


def test_seed_experiment_is_the_study_as_published() -> None:
    cfg = make_cfg("experiment=seed")
    assert cfg.model.arch.value == "study" and cfg.model.dropout == 0.02
    assert (cfg.optimizer.name.value, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.01, 0.9)
    assert cfg.optimizer.weight_decay == 0.0 and not cfg.optimizer.nesterov
    assert cfg.scheduler.name.value == "none"
    assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.trainer.label_smoothing) == (512, 20, 0.0)
    a = cfg.augment
    assert (a.brightness, a.contrast, a.saturation, a.hue, a.flip_p, a.rotate_deg, a.crop_padding) == (
        0.1, 0.1, 0.1, 0.1, 0.3, 10.0, 0,
    )  # fmt: skip
    for norm in ("batch", "group", "layer"):
        assert count_params(model_from_config(make_cfg("experiment=seed", f"norm={norm}"))) == 37_098


def test_command_line_overrides_reach_the_config() -> None:
    cfg = make_cfg(
        "optimizer.lr=0.05", "model.dropout=0.05", "trainer.epochs=1", "trainer.batch_size=256",
        "trainer.seed=3", "trainer.device=cpu", "data.root=/some/where", "data.train_size=2000",
    )  # fmt: skip
    assert cfg.optimizer.lr == 0.05 and cfg.model.dropout == 0.05
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.seed, cfg.trainer.device) == (1, 256, 3, "cpu")
    assert cfg.data.root == "/some/where" and cfg.data.train_size == 2000


def test_unknown_group_option_fails_naming_the_group() -> None:
    with pytest.raises(ConfigCompositionException, match="norm"):
        make_cfg("norm=batchh")


def test_misspelled_key_fails_naming_the_key() -> None:
    with pytest.raises(ConfigCompositionException, match="lrr"):
        make_cfg("optimizer.lrr=0.1")


def test_wrong_type_fails_naming_the_key() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError), match="optimizer.lr"):
        make_cfg("optimizer.lr=fast")
    with pytest.raises((ConfigCompositionException, ValidationError), match="trainer.epochs"):
        make_cfg("trainer.epochs=1.5")


@pytest.mark.parametrize(
    "override,key",
    [
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.dropout=-0.1", "model.dropout"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("augment.flip_p=1.5", "augment.flip_p"),
        ("data.val_size=0", "data.val_size"),
        ("trainer.device=gpu", "trainer.device"),
        ("norm.groups=0", "norm.groups"),
        ("trainer.ema_decay=1.0", "trainer.ema_decay"),
        ("trainer.ema_decay=0", "trainer.ema_decay"),
        ("search=optuna search.pruner=hyperbnd", "search.pruner"),
        ("search=optuna search.reduction_factor=1", "search.reduction_factor"),
        ("search=optuna search.min_resource=0", "search.min_resource"),
        ("norm=frn norm.eps=-1e-6", "norm.eps"),
        ("norm=frn norm.eps=0", "norm.eps"),
        ("norm=frn norm.eps=null", "norm.eps"),  # FRN needs it
        ("norm=batch norm.eps=1e-6", "norm.eps"),  # another norm's setting
        ("norm=batch_renorm norm.r_max=0.5", "norm.r_max"),
        ("norm=batch_renorm norm.d_max=-1", "norm.d_max"),
        ("norm=batch_renorm norm.warmup_steps=-1", "norm.warmup_steps"),
        ("norm=batch_renorm norm.warmup_steps=100 norm.r_max_steps=50", "norm.r_max_steps"),
        ("norm=group norm.r_max=3", "norm.r_max"),
        ("optimizer.base_batch_size=0", "optimizer.base_batch_size"),
        ("trainer.compile=fastest", "trainer.compile"),
        ("trainer.compile=graphs", "trainer.drop_last"),  # CUDA graphs replay one batch shape
        ("trainer.compile=autotune_graphs trainer.drop_last=false", "trainer.drop_last"),
    ],
)
def test_impossible_values_fail_at_start_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_cfg(*override.split())


def test_compile_modes_are_named_for_what_they_do_and_torch_s_names_point_to_them() -> None:
    from normsweep.run.compiling import COMPILE_MODES

    with pytest.raises(ConfigError, match="expected graphs .torch's mode 'reduce-overhead'"):
        make_cfg("trainer.compile=reduce-overhead", "trainer.drop_last=true")
    with pytest.raises(ConfigError, match="kernels .fused kernels") as e:
        make_cfg("trainer.compile=fast")
    assert all(name in str(e.value) for name in COMPILE_MODES)
    for name, mode in COMPILE_MODES.items():
        assert make_cfg(f"trainer.compile={name}", f"trainer.drop_last={mode.graphs}").trainer.compile == name


def test_over_budget_model_stops_with_count_and_limit() -> None:
    cfg = make_cfg("model.widths=[32,64,96,128]")
    params = count_params(model_from_config(cfg))
    with pytest.raises(BudgetError, match=f"{params:,} parameters.*max_params=50,000"):
        check_budget(cfg, params)
    check_budget(make_cfg("model.widths=[32,64,96,128]", "budget.enforce=false"), params)


def test_too_many_epochs_stops_unless_budget_is_off() -> None:
    with pytest.raises(BudgetError, match="trainer.epochs=30 is over budget.max_epochs=20"):
        check_budget(make_cfg("trainer.epochs=30"), 1000)
    check_budget(make_cfg("trainer.epochs=30", "budget.enforce=false"), 1000)
