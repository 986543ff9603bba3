"""End to end through the real CLI: `python -m normsweep [-m] ...` in a subprocess.

Uses ../shared/data/cifar10-jpg when it is there (as in CI), else a small dataset made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from normsweep.base.results import load_model
from normsweep.config import Config
from normsweep.run.build import model_from_config

from . import warm_python
from .conftest import REPO, SHARED_CIFAR, compose_config, write_folder_dataset

pytestmark = pytest.mark.slow

RESULT_KEYS = {
    "norm", "params", "epochs", "best_val_acc", "final_val_acc", "final_test_acc", "train_seconds",
    "seconds_per_epoch", "device", "status", "overrides", "history",
}  # fmt: skip
HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "val_acc", "test_acc", "lr", "seconds"}


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    if SHARED_CIFAR.is_dir():
        return [f"data.root={SHARED_CIFAR}", "data.train_size=1000", "data.val_size=500", "data.test_size=1000"]
    root = write_folder_dataset(tmp_path_factory.mktemp("data") / "cifar", n_train=60, n_test=20)
    cache = tmp_path_factory.mktemp("cache")
    return [f"data.root={root}", f"data.cache_dir={cache}", "data.val_size=100"]


def normsweep(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return warm_python.run(
        [sys.executable, "-m", "normsweep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def assert_complete(job_dir: Path, norm: str, epochs: int) -> dict:
    res = json.loads((job_dir / "results.json").read_text())
    assert RESULT_KEYS <= res.keys()
    assert res["status"] == "completed" and res["error"] is None
    assert res["norm"] == norm and res["epochs"] == epochs and len(res["history"]) == epochs
    assert all(HISTORY_KEYS <= h.keys() for h in res["history"])
    for key in ("best_val_acc", "final_val_acc", "final_test_acc"):
        assert 0.0 <= res[key] <= 100.0
    assert res["final_test_acc"] == res["history"][-1]["test_acc"]
    assert res["train_seconds"] > 0 and res["params"] < 50_000
    assert (job_dir / "model.pt").is_file() and (job_dir / "predictions.npz").is_file()
    assert "Total params" in (job_dir / "model_summary.txt").read_text()
    return res


def test_single_run_writes_results_checkpoint_and_the_models_own_predictions(tmp_path, data_args) -> None:
    out = tmp_path / "run"
    proc = normsweep("norm=group", "trainer.epochs=2", "trainer.batch_size=128", *data_args, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = assert_complete(out, "group", 2)
    assert "norm=group" in res["overrides"] and res["choices"]["norm"] == "group"
    assert "epoch  2/2" in proc.stdout + proc.stderr  # per-epoch progress line
    assert "47,600" in proc.stdout + proc.stderr  # parameter count printed at start

    # The saved predictions are the saved model's: reload it, predict, compare.
    from omegaconf import OmegaConf

    from normsweep.data import load_raw, make_splits
    from normsweep.run.train import predict, prepare_eval

    ckpt = load_model(out / "model.pt")  # weights_only: reading it never runs code
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), ckpt["config"]))
    model = model_from_config(cfg)
    model.load_state_dict(ckpt["state_dict"])
    d = cfg.data
    splits = make_splits(load_raw(d.root, d.format.value, False, d.cache_dir), d.val_size, d.train_size, d.test_size)
    x, y = prepare_eval(splits.test, torch.device("cpu"), splits.info)
    preds = np.load(out / "predictions.npz")
    assert np.array_equal(preds["pred"], predict(model, x).numpy())
    assert np.array_equal(preds["target"], y.numpy())
    assert abs(100 * (preds["pred"] == preds["target"]).mean() - res["final_test_acc"]) < 1e-6


def test_multirun_over_three_norms_writes_three_complete_jobs(tmp_path, data_args) -> None:
    sweep = tmp_path / "multirun"
    proc = normsweep("-m", "norm=batch,group,layer", "trainer.epochs=1", *data_args, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 3
    for i, (job, norm) in enumerate(zip(jobs, ["batch", "group", "layer"])):
        assert job.name.startswith(f"{i}_") and f"norm={norm}" in job.name and "data.root" not in job.name
        assert_complete(job, norm, 1)

    # The sweep's report, written by the on_multirun_end callback.
    import pandas as pd

    table = pd.read_csv(sweep / "results.csv")
    assert sorted(table["norm"]) == ["batch", "group", "layer"] and (table["status"] == "completed").all()
    assert (sweep / "results.md").read_text().count("| completed |") == 3
    assert "final_test_acc" in proc.stdout + proc.stderr  # the table is printed at the end
    for name in ("loss.png", "accuracy.png", "test_accuracy.png"):
        assert (sweep / "plots" / name).stat().st_size > 10_000
    for job in jobs:
        assert (sweep / "plots" / job.name / "confusion.png").stat().st_size > 10_000
        assert (sweep / "plots" / job.name / "mispredicted.png").stat().st_size > 10_000
        assert_grid_shows_only_mispredicted(job)


def assert_grid_shows_only_mispredicted(job: Path) -> None:
    """Every image in the misprediction grid is one the *saved, trained* model gets wrong."""
    from omegaconf import OmegaConf

    from normsweep.data import Split, load_raw
    from normsweep.report.plots import mispredicted
    from normsweep.run.train import predict, prepare_eval

    index, target, pred = mispredicted(job)
    assert len(index) > 0
    ckpt = load_model(job / "model.pt")
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), ckpt["config"]))
    model = model_from_config(cfg)
    model.load_state_dict(ckpt["state_dict"])
    res = json.loads((job / "results.json").read_text())
    raw = load_raw(res["data_root"], cache_dir=cfg.data.cache_dir)
    x, y = prepare_eval(
        Split(raw.test_x[index], raw.test_y[index], torch.as_tensor(index)), torch.device("cpu"), raw.info
    )
    assert np.array_equal(y.numpy(), target)
    model_pred = predict(model, x).numpy()
    assert np.array_equal(model_pred, pred) and (model_pred != target).all()


SMALL = ("trainer.epochs=1", "data.train_size=200", "data.test_size=200")  # after data_args: these win


def test_a_recipe_that_overrides_a_chosen_group_is_named_in_each_job_s_log(tmp_path, data_args) -> None:
    sweep = tmp_path / "multirun"
    proc = normsweep(
        "-m", "norm=frn,batch", "optimizer=adam", "trainer.epochs=1", *data_args, f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = {p.parent.name.split("norm=")[1].split(",")[0]: p.read_text() for p in sweep.glob("*/normsweep.log")}
    assert "sets optimizer.lr=0.1 (conf/recipe/frn.yaml) instead of optimizer=adam's 0.003" in logs["frn"]
    assert "optimizer.weight_decay=0.001 (conf/recipe/batch.yaml) instead of optimizer=adam's 0.0" in logs["batch"]
    assert "optimizer.lr" not in logs["batch"].split("recipe, tuned")[1].splitlines()[0]  # batch's recipe keeps the lr
    res = json.loads(next(sweep.glob("*norm=frn*/results.json")).read_text())
    assert res["config"]["optimizer"]["lr"] == 0.1  # a warning, not a change: the run is what was composed


def test_every_new_norm_trains_through_the_cli_and_reaches_the_report(tmp_path, data_args) -> None:
    sweep, norms = tmp_path / "multirun", ["batch_renorm", "frn", "evonorm_s0", "evonorm_b0"]
    proc = normsweep("-m", f"norm={','.join(norms)}", *data_args, *SMALL, "trainer.batch_size=32",
                     f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))
    for job, norm in zip(jobs, norms, strict=True):
        assert assert_complete(job, norm, 1)["choices"]["recipe"] == norm  # its recipe file: the shared recipe
    import pandas as pd

    assert sorted(pd.read_csv(sweep / "results.csv")["norm"]) == sorted(norms)
    assert (sweep / "plots" / "test_accuracy.png").stat().st_size > 10_000


def test_the_batch_size_study_runs_its_command_on_tiny_data(tmp_path, data_args) -> None:
    sweep, norms, batches = tmp_path / "study", ["batch", "group", "layer", "frn", "evonorm_s0"], (8, 32)
    proc = normsweep("-m", "experiment=batch_size", f"norm={','.join(norms)}", *data_args, *SMALL,
                     f"trainer.batch_size={','.join(map(str, batches))}", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]
    recipe_batch = {norm: compose_config([f"norm={norm}"]).trainer.batch_size for norm in norms}  # each recipe's own
    seen = set()
    for job in jobs:
        res = json.loads((job / "results.json").read_text())
        assert res["status"] == "completed", res["error"]
        norm, batch, optimizer = res["norm"], res["config"]["trainer"]["batch_size"], res["config"]["optimizer"]
        seen.add((norm, batch))
        assert optimizer["lr_scaling"] == "linear"
        peak = optimizer["lr"] * batch / recipe_batch[norm]
        assert f"peak learning rate {peak:.4g}: optimizer.lr={optimizer['lr']:g} scaled to batch {batch}" in (
            job / "normsweep.log").read_text()  # fmt: skip
    assert seen == {(n, b) for n in norms for b in batches}
    assert (sweep / "plots" / "sensitivity_trainer.batch_size.png").stat().st_size > 10_000


def test_cfg_job_shows_the_composed_config_and_help_lists_groups() -> None:
    proc = normsweep("--cfg", "job", "norm=layer", "optimizer.lr=0.05")
    assert proc.returncode == 0, proc.stderr
    assert "kind: layer" in proc.stdout and "lr: 0.05" in proc.stdout
    proc = normsweep("--help")
    assert proc.returncode == 0
    for group in ("norm", "augment", "optimizer", "scheduler", "experiment"):  # every option file of each group
        options = ", ".join(sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")))
        assert f"{group}: {options}" in proc.stdout


def test_over_budget_run_stops_before_training_and_records_why(tmp_path, data_args) -> None:
    out = tmp_path / "big"
    proc = normsweep("model.widths=[32,64,96,128]", *data_args, f"hydra.run.dir={out}")
    assert proc.returncode != 0
    assert "over budget.max_params=50,000" in proc.stdout + proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and "BudgetError" in res["error"] and res["history"] == []


def test_a_search_without_dash_m_stops_saying_to_add_it_instead_of_training_once(tmp_path) -> None:
    proc = normsweep("search=optuna", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "search=optuna searches in a multirun: add -m (python -m normsweep -m search=optuna ...)"
        in proc.stdout + proc.stderr
    )
    assert not (tmp_path / "run" / "results.json").exists()  # nothing trained


def test_bad_value_fails_at_start_naming_the_key(tmp_path) -> None:
    proc = normsweep("model.dropout=1.5", f"hydra.run.dir={tmp_path / 'x'}")
    assert proc.returncode == 2 and "model.dropout=1.5 is invalid" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr  # a fixable problem is a message, not a traceback
    proc = normsweep("trainer.batchsize=64", f"hydra.run.dir={tmp_path / 'y'}")
    assert proc.returncode != 0 and "batchsize" in proc.stderr
    proc = normsweep("norm=frn", "norm.eps=-1e-06", f"hydra.run.dir={tmp_path / 'z'}")
    assert proc.returncode == 2 and "norm.eps=-1e-06 is invalid: expected an epsilon > 0" in proc.stdout + proc.stderr


def test_missing_data_root_explains_how_to_get_data(tmp_path) -> None:
    proc = normsweep(f"data.root={tmp_path / 'none'}", "data.download=false", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "has no 'cifar-10-batches-py/' or 'train/'" in out and "data.root=PATH" in out
