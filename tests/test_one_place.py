"""Facts declared once: the result-neutral keys, a training job that does not need Optuna, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from normsweep.base.results import RunRecord
from normsweep.config import RESULT_NEUTRAL_KEYS, is_result_neutral, register_configs
from normsweep.report.runs import _row
from normsweep.run.resume import config_differences
from normsweep.search.trials import study_name_for

from .conftest import REPO, compose_config

NEUTRAL_OVERRIDES = ["trainer.threads=2", "data.root=/elsewhere", "trainer.progress=false", "data.cache_dir=/tmp/c",
                     "trainer.device=cpu", "trainer.compile=kernels", "trainer.reuse_memory=false", "budget.enforce=false"]  # fmt: skip


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
    new = {
        "trainer": {"threads": 2, "epochs": 4, "device": "cuda"},
        "data": {"root": "b"},
        "budget": {"enforce": False},
    }
    assert config_differences(old, new) == ["trainer.epochs"]
    assert is_result_neutral("+trainer.threads=4") and not is_result_neutral("trainer.epochs=3")


def test_job_directories_are_not_named_after_neutral_keys() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        c = compose("train", overrides=["norm=group", *NEUTRAL_OVERRIDES], return_hydra_config=True)
    assert c.hydra.job.override_dirname == "norm=group"


def test_the_report_shows_swept_settings_but_not_neutral_keys(tmp_path) -> None:
    res = {"config": {}, "overrides": ["optimizer.momentum=0.8", *NEUTRAL_OVERRIDES], "status": "completed"}
    row = _row(tmp_path / "job", RunRecord.from_dict(res), tmp_path)
    assert row["optimizer.momentum"] == "0.8"
    assert not any(key in row for key in RESULT_NEUTRAL_KEYS)


@pytest.mark.slow  # seconds: a fresh interpreter
def test_a_training_job_does_not_import_optuna() -> None:
    """One fresh interpreter imports each module in turn; the first after which Optuna is loaded is named."""
    modules = [
        "normsweep.base.runtime",
        "normsweep.models",
        "normsweep.run.train",
        "normsweep.run.job",
        "normsweep.report.tables",
    ]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert 'optuna' not in sys.modules, f'importing {m} imported optuna'\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_norm_registry_is_the_one_list_of_norms() -> None:
    from normsweep.config import NormKind
    from normsweep.norms import NORMS
    from normsweep.report.plots import NORM_COLOURS

    yaml_kinds = {OmegaConf.load(p).kind for p in (REPO / "conf" / "norm").glob("*.yaml")}
    assert [k.value for k in NormKind] == list(NORMS) == list(NORM_COLOURS)
    assert yaml_kinds == set(NORMS)
    assert len(set(NORM_COLOURS.values())) == len(NORMS)


def test_each_norms_own_settings_are_its_yaml_files_and_schema_fields() -> None:
    from dataclasses import fields

    from normsweep.config import NormConfig
    from normsweep.norms import NORMS

    shared = {"kind", "groups", "ws"}  # the keys every norm has
    schema = {f.name for f in fields(NormConfig)} - shared
    assert schema == {key for norm in NORMS.values() for key in norm.options}  # no field without a norm that reads it
    for kind, norm in NORMS.items():
        written = set(OmegaConf.load(REPO / "conf" / "norm" / f"{kind}.yaml")) - shared
        assert written == set(norm.options), kind  # conf/norm/<kind>.yaml sets exactly the norm's own keys


@pytest.mark.parametrize("yaml_file,schema", [("trainer/default.yaml", "TrainerConfig"), ("data/cifar10.yaml", "DataConfig"),
                                              ("budget/study.yaml", "BudgetConfig")])  # fmt: skip
def test_single_option_groups_and_their_dataclass_agree_on_every_default(yaml_file: str, schema: str) -> None:
    from normsweep import config

    written = OmegaConf.load(REPO / "conf" / yaml_file)
    defaults = OmegaConf.structured(getattr(config, schema))
    for key in written:
        if OmegaConf.is_interpolation(written, key):
            continue  # e.g. data.root=${oc.env:NORMSWEEP_DATA,data}
        assert written[key] == defaults[key], (
            f"conf/{yaml_file} {key}={written[key]!r} but {schema}.{key}={defaults[key]!r}"
        )


def _module_name(path) -> str:
    """``normsweep/run/job.py`` -> ``run.job``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(REPO / "normsweep").with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _package_imports() -> dict[str, set[str]]:
    """normsweep's modules (dotted, without ``normsweep.``) and the normsweep modules each imports, at the
    top or inside a function (``from normsweep.base import results`` imports ``base.results``)."""
    paths = sorted((REPO / "normsweep").rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):  # import normsweep.x.y
                names = [a.name.removeprefix("normsweep.") for a in node.names if a.name.startswith("normsweep.")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normsweep") and not node.level:
                module = (node.module or "").removeprefix("normsweep").lstrip(".")
                names = [f"{module}.{a.name}".lstrip(".") if f"{module}.{a.name}".lstrip(".") in modules else module
                         for a in node.names]  # fmt: skip
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: a relative import; normsweep's modules import each other by full name")
            else:
                continue
            targets |= {n for n in names if n in modules}
        graph[_module_name(path)] = targets - {_module_name(path)}
    return graph


# The house, bottom to top: a module imports only from its own floor or below. The registries of the
# choices a config makes live low (the schema derives its allowed values from them); config sits on them;
# a run, the search and the report use config; the entrypoint uses them all. docs/development.md draws it.
FLOORS: list[tuple[str, ...]] = [
    ("base",),
    ("norms",),
    ("models", "data", "run.optim", "run.compiling", "search.pruners"),
    ("config",),
    ("run", "search", "report", "studies", "storage"),
    ("__main__", "__init__"),
]


def _floor(module: str) -> int:
    """The floor of ``module``: that of its longest prefix in :data:`FLOORS`."""
    best, length = None, -1
    for floor, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = floor, len(prefix)
    assert best is not None, f"normsweep.{module} is on no floor of FLOORS: add it there and to docs/development.md"
    return best


def test_the_house_reads_top_down() -> None:
    """No module imports one above it: base imports nothing of normsweep's, models and data no config."""
    graph = _package_imports()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if _floor(t) > _floor(m))
    assert not upward, f"imports from a floor above: {upward}"
    assert not any(
        t for m, targets in graph.items() if m.startswith("base.") for t in targets if not t.startswith("base")
    )


def test_the_floor_check_finds_an_upward_import() -> None:
    assert _floor("models.cnn") < _floor("config") < _floor("run.job")
    assert _floor("run.optim") < _floor("config") and _floor("base.errors") == 0


@pytest.mark.parametrize("registry, enum", [
    ("normsweep.norms:NORMS", "NormKind"), ("normsweep.models:MODELS", "Arch"),
    ("normsweep.run.optim:OPTIMIZERS", "OptimizerName"), ("normsweep.run.optim:SCHEDULERS", "SchedulerName"),
    ("normsweep.data:DATASETS", "DataSource"), ("normsweep.run.trackers:TRACKERS", "LoggerKind"),
])  # fmt: skip
def test_each_choice_of_the_schema_is_its_registry(registry: str, enum: str) -> None:
    """The schema's allowed values are the registry's names, in its order: adding an entry adds the choice."""
    import importlib

    from normsweep import config

    module, name = registry.split(":")
    assert [e.value for e in getattr(config, enum)] == list(getattr(importlib.import_module(module), name))


def test_the_pruner_choice_is_its_registry() -> None:
    from normsweep.config import ConfigError, SearchConfig
    from normsweep.search.pruners import PRUNERS

    for name in PRUNERS:
        SearchConfig(pruner=name)
    with pytest.raises(ConfigError, match="search.pruner='nope'"):
        SearchConfig(pruner="nope")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` (as the path around it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_normsweep_modules_import_each_other_without_a_cycle() -> None:
    """No two modules depend on each other, not even through an import inside a function."""
    graph = _package_imports()
    assert {"run.job", "run.train", "base.runtime", "report.tables", "report.plots", "run.trackers"} <= graph.keys()
    assert "report.plots" in graph["report.tables"] and "report.tables" not in graph["report.plots"]  # lazy imports too
    assert "run.train" in graph["run.job"] and not graph["base.runtime"]  # runtime imports nothing of normsweep
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_a_config_recorded_before_a_key_existed_is_the_same_config_at_that_keys_default() -> None:
    """A run directory from an older normsweep (no ``data.source``, no ``model.name``) resumes, not refused."""
    from normsweep.config import schema_defaults

    new = OmegaConf.to_container(compose_config([]), resolve=True, enum_to_str=True)
    old = {k: ({kk: vv for kk, vv in v.items() if (k, kk) not in {("data", "source"), ("model", "kwargs")}}
               if isinstance(v, dict) else v) for k, v in new.items()}  # fmt: skip
    assert "source" not in old["data"] and schema_defaults()["data.source"] == new["data"]["source"]
    assert config_differences(old, new) == []
    other = {**new, "data": {**new["data"], "source": "svhn"}}
    assert config_differences(old, other) == ["data.source"]  # a non-default value is a difference
