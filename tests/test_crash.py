"""Crash consistency: SIGKILL at any instant loses at most the current epoch and corrupts nothing.

A real CLI run (and a real multirun) is killed with SIGKILL twenty times in a row, each time
followed by the same command, which resumes. Every kill lands at a point of progress, never after
a wait (``tests/crash_injector.py``, loaded into the process as ``sitecustomize``), so each lands
in a live run however fast the machine is: a random training step, or an exact point of a file
write: half of a temporary file on disk, a complete temporary file not yet renamed, a rename not
yet synced, for ``checkpoint.pt``, ``results.json``, ``model.pt``, the data cache and the sweep's
report. After every kill each file there is readable, at most one temporary file (the last
kill's) is left, and the finished run's ``results.json``, model and predictions are identical to
those of an uninterrupted run with the same seed, which runs alongside.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from normsweep import data
from normsweep.base import results
from normsweep.data import CLASSES
from normsweep.run.resume import config_differences
from normsweep.run.train import load_checkpoint

from . import warm_python
from .conftest import REPO, write_folder_dataset
from .crash_injector import env, injector_dir, steps_per_epoch

STAGES = ("mid-write", "before-rename", "after-rename")
PER_CLASS = 20  # training images per class: 200 in all, 100 of them held out for validation
# What differs between two runs of one seed: wall time, process, memory, and where the files went.
VOLATILE = {"train_seconds", "seconds_per_epoch", "peak_memory_mb", "started_at", "finished_at", "pid", "config",
            "overrides", "data_root"}  # fmt: skip
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "cifar", n_train=PER_CLASS, n_test=5)


def run_args(dataset: Path, cache: Path, *extra: str) -> list[str]:
    """A small run with every lever of the fair comparison on (WS, weight EMA; flip TTA is the default)."""
    return [f"data.root={dataset}", f"data.cache_dir={cache}", "data.val_size=100", "trainer.batch_size=50",
            "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false", "augment=seed",
            "model.dropout=0.1", "norm.ws=true", "trainer.ema_decay=0.9", *extra]  # fmt: skip


def start(args: list[str], shim: Path | None = None, kill_at: str | None = None) -> subprocess.Popen:
    """``python -m normsweep ARGS``; with ``kill_at``, the injector in ``shim`` kills it there."""
    cmd = [sys.executable, "-m", "normsweep", *args]
    plain = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONUNBUFFERED": "1"}
    environ = env(shim, kill_at) if kill_at else plain
    return warm_python.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill(args: list[str], shim: Path, kill_at: str) -> None:
    """Run the command until the injector kills it at ``kill_at``; fail if it ended otherwise."""
    proc = start(args, shim, kill_at)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == -signal.SIGKILL, f"the kill at {kill_at} did not happen:\n{out[-3000:]}"


def epochs_done(run_dir: Path) -> int:
    """The epochs the run's checkpoint holds (0 without one)."""
    state = run_dir / results.TRAINING_STATE_FILE
    return load_checkpoint(state)["epoch"] if state.exists() else 0


def completed(run_dir: Path) -> bool:
    record = run_dir / results.RESULTS_FILE
    return record.exists() and json.loads(record.read_text())["status"] == "completed"


def temp_files(*dirs: Path) -> list[Path]:
    return [t for d in dirs if d.exists() for t in d.rglob(".*.tmp")]


def check_every_file_is_readable(run_dirs: list[Path], cache: Path) -> None:
    """What a kill may leave: old or new versions of each file, never a torn one."""
    for d in run_dirs:
        if (d / results.RESULTS_FILE).exists():
            json.loads((d / results.RESULTS_FILE).read_text())
        if (d / results.TRAINING_STATE_FILE).exists():
            load_checkpoint(d / results.TRAINING_STATE_FILE)
        if (d / results.MODEL_FILE).exists():
            results.load_model(d / results.MODEL_FILE)
        if (d / results.PREDICTIONS_FILE).exists():
            np.load(d / results.PREDICTIONS_FILE)
    for f in cache.glob("cifar10-*.pt"):
        fingerprint = f.stem.split("-", 2)[2]
        assert data.read_cache(f, fingerprint) is not None, f"{f} is torn"


def assert_same_run(crashed: Path, reference: Path) -> None:
    a, b = (json.loads((d / results.RESULTS_FILE).read_text()) for d in (crashed, reference))
    assert a["status"] == "completed", a
    assert not config_differences(a["config"], b["config"])

    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in VOLATILE} | {
            "history": [{k: v for k, v in e.items() if k != "seconds"} for e in r["history"]]
        }

    assert strip(a) == strip(b)
    ma, mb = (results.load_model(d / results.MODEL_FILE)["state_dict"] for d in (crashed, reference))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    pa, pb = (np.load(d / results.PREDICTIONS_FILE) for d in (crashed, reference))
    assert all(np.array_equal(pa[k], pb[k]) for k in pb.files)
    assert not (crashed / results.TRAINING_STATE_FILE).exists()


def finish(proc: subprocess.Popen) -> None:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]


def test_twenty_kills_of_one_run_lose_nothing_and_the_result_is_that_of_an_uninterrupted_run(
    tmp_path: Path, dataset: Path
) -> None:
    n = 16  # epochs: room for the kills before the last three, each of which keeps one epoch at most
    epochs = (f"trainer.epochs={n}", "budget.enforce=false")
    reference = tmp_path / "reference"
    ref = start([*run_args(dataset, tmp_path / "ref-cache", *epochs), f"hydra.run.dir={reference}"])  # alongside

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [*run_args(dataset, cache, *epochs), f"hydra.run.dir={run_dir}"]
    steps = steps_per_epoch(len(CLASSES) * PER_CLASS, args)
    shim = injector_dir(tmp_path)
    rng = random.Random(0)
    at_writes = iter([f"checkpoint.pt:1:{s}" for s in STAGES] + [f"results.json:2:{s}" for s in STAGES])
    plan = (
        [f"cifar10-:1:{s}" for s in STAGES]  # the data cache, while it does not exist yet
        + [next(at_writes) if i % 2 else "random" for i in range(12)]  # random, checkpoint, random, results, ...
        + ["random", "random", "last checkpoint"]
        + ["model.pt:1:mid-write", "model.pt:1:after-rename"]  # the last writes of a run
    )
    assert len(plan) == 20
    points = {
        "random": lambda: f"step:{rng.randint(1, 2 * steps)}:kill",  # a step of the next two epochs
        "last checkpoint": lambda: f"checkpoint.pt:{n - epochs_done(run_dir)}:after-rename",
    }
    for how in plan:
        kill(args, shim, points[how]() if how in points else how)
        check_every_file_is_readable([run_dir], cache)
        assert len(temp_files(run_dir, cache)) <= 1, temp_files(run_dir, cache)  # they do not pile up
        if how == "last checkpoint":  # every epoch is in the checkpoint, results.json does not count the last
            assert epochs_done(run_dir) == n
            assert json.loads((run_dir / results.RESULTS_FILE).read_text())["epochs_completed"] == n - 1

    finish(start(args))
    finish(ref)
    assert_same_run(run_dir, reference)
    assert temp_files(run_dir, cache) == [], temp_files(run_dir, cache)
    assert len(list(cache.glob("cifar10-*.pt"))) == 1


def test_kills_inside_and_between_the_jobs_of_a_multirun_lose_nothing(tmp_path: Path, dataset: Path) -> None:
    jobs, epochs = 2, 6
    sweep = ("-m", "norm=batch,layer", f"trainer.epochs={epochs}")
    reference = tmp_path / "reference"
    ref = start([*sweep, *run_args(dataset, tmp_path / "ref-cache"), f"hydra.sweep.dir={reference}"])  # alongside

    crashed, cache = tmp_path / "sweep", tmp_path / "cache"
    args = [*sweep, *run_args(dataset, cache), f"hydra.sweep.dir={crashed}"]
    steps = steps_per_epoch(len(CLASSES) * PER_CLASS, args)
    shim = injector_dir(tmp_path)
    rng = random.Random(1)

    def kill_point(where: str) -> str:
        job_dirs = [d for d in crashed.glob("*") if d.is_dir()]
        finished = sum(completed(d) for d in job_dirs)
        steps_left = (jobs * epochs - finished * epochs - sum(epochs_done(d) for d in job_dirs)) * steps
        if where == "inside a job":  # a random step of the next two epochs, in whichever job they are
            return f"step:{rng.randint(1, min(2 * steps, steps_left))}:kill"
        if where == "between jobs":  # the last job starts (writes its summary): the others are done
            return f"{results.SUMMARY_FILE}:{jobs - finished}:{rng.choice(STAGES)}"
        return f"{rng.choice(['results.csv', 'results.md'])}:1:{rng.choice(STAGES)}"  # in the report

    inside, between, report = "inside a job", "between jobs", "in the report"
    for where in [inside, inside, between, inside, inside, inside, between, inside, report, report]:
        kill(args, shim, kill_point(where))
        check_every_file_is_readable([d for d in crashed.glob("*") if d.is_dir()], cache)
        assert len(temp_files(crashed, cache)) <= 1

    finish(start(args))
    finish(ref)
    names = sorted(d.name for d in reference.glob("*") if (d / results.RESULTS_FILE).exists())
    assert len(names) == jobs
    assert names == sorted(d.name for d in crashed.glob("*") if (d / results.RESULTS_FILE).exists())
    for job in names:
        assert_same_run(crashed / job, reference / job)
    assert (crashed / "results.csv").exists() and temp_files(crashed, cache) == []
