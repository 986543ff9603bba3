"""`pip install .` gives a working normsweep: the wheel, installed into a fresh virtual environment, run
from an empty directory through its console commands, with a user's own config directory beside it.

The wheel is built from the sdist (``python -m build``), so both carry what a run needs. The new
environment reaches the heavy dependencies (torch, Hydra, Optuna, ...) already installed here through a
``.pth`` file, which keeps the test offline and fast; normsweep itself, its configs and its Hydra
plugin come from the wheel only (asserted), and the source tree is not importable from there.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import REPO, write_folder_dataset

# One xdist worker runs every test of this file (--dist loadgroup): its module fixture is costly to start.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]

TIMEOUT = 600
# Not copied to the build: version control, environments, build outputs and run outputs of a clone.
SKIP_AT_TOP = {".git", ".venv", "venv", "build", "dist", "data", "outputs", "multirun", "optuna"}


def _skip(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return skip | (SKIP_AT_TOP & set(names) if Path(directory) == REPO else set())


def _run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _conf_yaml(root: Path) -> set[str]:
    """The config files a run needs, relative to conf/ (conf/local/ is the machine's own, never shipped)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] != "local"}


@dataclass
class Installed:
    venv: Path
    scripts: Path  # the venv's bin/
    purelib: Path  # the venv's site-packages
    wheel: Path
    sdist: Path
    env: dict
    work: Path  # an empty directory to run from

    def cli(self, command: str, *args) -> subprocess.CompletedProcess:
        return _run([self.scripts / command, *args], cwd=self.work, env=self.env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    if find_spec("build") is None:
        pytest.fail("the install test builds the wheel with `build`: pip install -e '.[test]' installs it")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_skip)
    (src / "conf" / "local" / "default.yaml").write_text("data:\n  root: /this/machine/only\n")  # must not ship
    dist = tmp / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], cwd=tmp)
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    paths = json.loads(_run([python, "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"],
                            cwd=tmp).stdout)  # fmt: skip
    purelib = Path(paths["purelib"])
    (purelib / "normsweep_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
          "--no-compile", wheel], cwd=tmp)  # fmt: skip

    unset = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NORMSWEEP_DATA")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env |= {"PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    work = tmp / "work"
    work.mkdir()
    return Installed(venv, Path(paths["scripts"]), purelib, wheel, sdist, env, work)


def test_the_wheel_holds_packages_and_configs_the_sdist_also_tests_and_benchmark(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    conf = "normsweep/conf/"
    shipped = {n.removeprefix(conf) for n in names if n.startswith(conf) and n.endswith(".yaml")}
    assert shipped == _conf_yaml(REPO / "conf")  # every config, and not the machine's local/default.yaml
    modules = {p.relative_to(REPO).as_posix() for d in ("normsweep", "hydra_plugins") for p in (REPO / d).rglob("*.py")}
    assert modules | {"normsweep/conf/__init__.py"} <= names  # pyproject.toml's list of packages misses none
    assert not any(n.startswith("tests/") for n in names)

    with tarfile.open(installed.sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"README.md", "pyproject.toml", "conf/train.yaml", "conf/local/README.md", "tests/conftest.py",
            "tests/test_install.py", "benchmarks/throughput.py"} <= members  # fmt: skip
    assert {f"conf/{f}" for f in _conf_yaml(REPO / "conf")} <= members and "conf/local/default.yaml" not in members


def test_normsweep_and_its_configs_come_from_the_wheel_with_every_dependency(installed: Installed) -> None:
    code = """
import json, importlib.metadata as md
from packaging.requirements import Requirement
import normsweep, normsweep.conf, hydra_plugins.normsweep_optuna_sweeper as plugin
unmet = [str(r) for r in map(Requirement, md.requires("normsweep"))
         if (not r.marker or r.marker.evaluate({"extra": ""})) and md.version(r.name) not in r.specifier]
print(json.dumps({"files": [normsweep.__file__, normsweep.conf.__file__, plugin.__file__], "unmet": unmet}))
"""
    python = installed.venv / "bin" / "python"
    out = json.loads(_run([python, "-c", code], cwd=installed.work, env=installed.env).stdout)
    for f in out["files"]:
        assert Path(f).is_relative_to(installed.purelib), f
    assert out["unmet"] == []


def test_help_lists_every_config_group(installed: Installed) -> None:
    help_text = installed.cli("normsweep", "--help").stdout
    groups: dict[str, list[str]] = {}
    for f in sorted(_conf_yaml(REPO / "conf")):
        group, _, option = f.removesuffix(".yaml").rpartition("/")
        if group and not group.startswith("hydra/"):  # hydra/launcher presets are listed by --hydra-help
            groups.setdefault(group, []).append(option)
    assert groups  # the clone's conf/ has groups to compare with
    for group, options in groups.items():
        assert f"{group}: {', '.join(options)}" in help_text


@pytest.fixture(scope="module")
def user_conf(installed: Installed, tmp_path_factory) -> Path:
    """A user's own config directory: an experiment preset and this machine's data settings."""
    root = write_folder_dataset(tmp_path_factory.mktemp("data") / "cifar", n_train=20, n_test=5)
    conf = tmp_path_factory.mktemp("my_conf")
    (conf / "experiment").mkdir()
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\nmodel:\n  dropout: 0.125\n")
    (conf / "local").mkdir()
    local = {"data": {"root": str(root), "cache_dir": str(tmp_path_factory.mktemp("cache")), "val_size": 100},
             "trainer": {"epochs": 1, "batch_size": 50, "device": "cpu", "threads": 1}}  # fmt: skip
    (conf / "local" / "default.yaml").write_text("# @package _global_\n" + yaml.safe_dump(local))
    return conf


def test_a_run_uses_the_users_config_directory(installed: Installed, user_conf: Path) -> None:
    out = installed.work / "run"
    installed.cli("normsweep", "--config-dir", user_conf, "experiment=mine", f"hydra.run.dir={out}")
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["epochs"] == 1 and len(res["history"]) == 1
    assert res["choices"]["experiment"] == "mine" and res["config"]["model"]["dropout"] == 0.125  # experiment/mine.yaml
    local = yaml.safe_load((user_conf / "local" / "default.yaml").read_text())
    assert res["config"]["data"]["root"] == local["data"]["root"]  # local/default.yaml


def test_an_optuna_search_and_its_report(installed: Installed, user_conf: Path) -> None:
    sweep = installed.work / "search"
    installed.cli("normsweep", "--config-dir", user_conf, "-m", "search=optuna", "search.n_trials=2",
                  f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert (installed.work / "optuna" / "normsweep.db").is_file()  # the default storage, under the launch dir
    (study,) = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["studies"]
    trials = sorted(sweep.glob("*/trial_*/results.json"))
    assert len(trials) == 2 and all(json.loads(t.read_text())["status"] == "completed" for t in trials)
    assert study["best_val_acc"] == max(json.loads(t.read_text())["final_val_acc"] for t in trials)
    assert len(pd.read_csv(sweep / "results.csv")) == 2  # the end-of-sweep report

    report = installed.work / "report"
    installed.cli("normsweep-report", sweep, "--out", report, "--no-plots")
    table = pd.read_csv(report / "results.csv")
    assert len(table) == 2 and (table["status"] == "completed").all()


def test_a_checkout_used_without_installing_says_to_install_it(tmp_path: Path) -> None:
    """`python -m normsweep` from a clone that was never installed (normsweep imported from the working
    directory, conf/ not a package) stops with the install command, not Hydra's "Primary config module
    'normsweep.conf' not found" (what the first GPU check hit)."""
    checkout = tmp_path / "clone"
    shutil.copytree(REPO / "normsweep", checkout / "normsweep", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", checkout / "conf", ignore=shutil.ignore_patterns("local"))
    # This interpreter has normsweep installed (editable); drop that install's import hooks, as a
    # Python that never saw the install would not have them, then run the module as `python -m` does.
    code = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'normsweep' not in "
            "getattr(f, '__module__', '') + getattr(f, '__name__', '')]; sys.path.insert(0, ''); "
            "sys.argv = ['normsweep', 'trainer.epochs=1']; runpy.run_module('normsweep', run_name='__main__', alter_sys=True)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"pip install -e {checkout}" in proc.stderr and "not installed" in proc.stderr, proc.stderr
    assert not (checkout / "outputs").exists()  # nothing started
