"""Facts declared once: the result-neutral keys, and a training job that does not need Optuna."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from normsweep.config import RESULT_NEUTRAL_KEYS, is_result_neutral, register_configs
from normsweep.job import config_differences
from normsweep.report import _row
from normsweep.search import study_name_for

from .conftest import REPO

NEUTRAL_OVERRIDES = ["trainer.threads=2", "data.root=/elsewhere", "trainer.progress=false", "data.cache_dir=/tmp/c",
                     "trainer.device=cpu", "trainer.compile=default", "trainer.reuse_memory=false", "budget.enforce=false"]  # fmt: skip


def test_every_neutral_key_exists_in_the_schema() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train")
    for key in RESULT_NEUTRAL_KEYS:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
    assert {o.split("=")[0] for o in NEUTRAL_OVERRIDES} <= set(RESULT_NEUTRAL_KEYS)


def test_a_search_with_other_threads_or_data_root_continues_the_same_study() -> None:
    cfg = OmegaConf.create({"norm": {"kind": "group"}})
    base = study_name_for(cfg, ("norm=group",), ["trainer.epochs=3", "trainer.threads=1"])
    for neutral in NEUTRAL_OVERRIDES:
        assert study_name_for(cfg, ("norm=group",), ["trainer.epochs=3", neutral]) == base, neutral
    assert study_name_for(cfg, ("norm=group",), ["trainer.epochs=4", "trainer.threads=1"]) != base


def test_resume_ignores_exactly_the_neutral_keys() -> None:
    old = {"trainer": {"threads": 1, "epochs": 3, "device": "cpu"}, "data": {"root": "a"}, "budget": {"enforce": True}}
    new = {"trainer": {"threads": 2, "epochs": 4, "device": "cuda"}, "data": {"root": "b"}, "budget": {"enforce": False}}
    assert config_differences(old, new) == ["trainer.epochs"]
    assert is_result_neutral("+trainer.threads=4") and not is_result_neutral("trainer.epochs=3")


def test_job_directories_are_not_named_after_neutral_keys() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        c = compose("train", overrides=["norm=group", *NEUTRAL_OVERRIDES], return_hydra_config=True)
    assert c.hydra.job.override_dirname == "norm=group"


def test_the_report_shows_swept_settings_but_not_neutral_keys(tmp_path) -> None:
    res = {"config": {}, "overrides": ["optimizer.momentum=0.8", *NEUTRAL_OVERRIDES], "status": "completed"}
    row = _row(tmp_path / "job", res, tmp_path)
    assert row["optimizer.momentum"] == "0.8"
    assert not any(key in row for key in RESULT_NEUTRAL_KEYS)


@pytest.mark.parametrize("module", ["normsweep.job", "normsweep.train", "normsweep.models", "normsweep.report"])
def test_a_training_job_does_not_import_optuna(module: str) -> None:
    code = f"import sys, {module}; assert 'optuna' not in sys.modules, 'optuna imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_norm_registry_is_the_one_list_of_norms() -> None:
    from normsweep.config import NormKind
    from normsweep.norms import NORMS
    from normsweep.plots import NORM_COLOURS

    yaml_kinds = {OmegaConf.load(p).kind for p in (REPO / "conf" / "norm").glob("*.yaml")}
    assert [k.value for k in NormKind] == list(NORMS) == list(NORM_COLOURS)
    assert yaml_kinds == set(NORMS)
    assert len(set(NORM_COLOURS.values())) == len(NORMS)


@pytest.mark.parametrize("yaml_file,schema", [("trainer/default.yaml", "TrainerConfig"), ("data/cifar10.yaml", "DataConfig"),
                                              ("budget/study.yaml", "BudgetConfig")])  # fmt: skip
def test_single_option_groups_and_their_dataclass_agree_on_every_default(yaml_file: str, schema: str) -> None:
    from normsweep import config

    written = OmegaConf.load(REPO / "conf" / yaml_file)
    defaults = OmegaConf.structured(getattr(config, schema))
    for key in written:
        if OmegaConf.is_interpolation(written, key):
            continue  # e.g. data.root=${oc.env:NORMSWEEP_DATA,data}
        assert written[key] == defaults[key], f"conf/{yaml_file} {key}={written[key]!r} but {schema}.{key}={defaults[key]!r}"
