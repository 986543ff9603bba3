"""Crash consistency: SIGKILL at any instant loses at most the current epoch and corrupts nothing.

A real CLI run (and a real multirun) is killed with SIGKILL twenty times in a row, each time
followed by the same command, which resumes. Some kills come at random moments; the others at
exact points of a file write (``tests/crash_injector.py``, loaded into the process as
``sitecustomize``): half of a temporary file on disk, a complete temporary file not yet renamed,
a rename not yet synced, for ``checkpoint.pt``, ``results.json``, ``model.pt`` and the data cache.
After every kill each file there is readable, at most one temporary file (the last kill's) is
left, and the finished run's ``results.json``, model and predictions are identical to those of
an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from normsweep import data, results
from normsweep.resume import config_differences
from normsweep.train import load_checkpoint

from .conftest import REPO, write_folder_dataset

INJECTOR = Path(__file__).with_name("crash_injector.py")
STAGES = ("mid-write", "before-rename", "after-rename")
# What differs between two runs of one seed: wall time, process, memory, and where the files went.
VOLATILE = {"train_seconds", "seconds_per_epoch", "peak_memory_mb", "started_at", "finished_at", "pid", "config",
            "overrides", "data_root"}  # fmt: skip
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "cifar", n_train=30, n_test=5)


def run_args(dataset: Path, cache: Path, *extra: str) -> list[str]:
    """A small run with every lever of the fair comparison on (WS, weight EMA; flip TTA is the default)."""
    return [f"data.root={dataset}", f"data.cache_dir={cache}", "data.val_size=100", "trainer.batch_size=50",
            "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false", "augment=seed",
            "model.dropout=0.1", "norm.ws=true", "trainer.ema_decay=0.9", *extra]  # fmt: skip


def start(args: list[str], sitecustomize: Path | None = None, kill_at: str | None = None) -> subprocess.Popen:
    env = {"PYTHONUNBUFFERED": "1", **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}
    if kill_at:
        env["PYTHONPATH"], env["NORMSWEEP_TEST_KILL_AT"] = str(sitecustomize), kill_at
    cmd = [sys.executable, "-m", "normsweep", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def injector_dir(tmp_path: Path) -> Path:
    d = tmp_path / "injector"
    d.mkdir()
    shutil.copy(INJECTOR, d / "sitecustomize.py")
    return d


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
        assert data._read_cache(f, fingerprint) is not None, f"{f} is torn"


def assert_same_run(crashed: Path, reference: Path) -> None:
    a, b = (json.loads((d / results.RESULTS_FILE).read_text()) for d in (crashed, reference))
    assert a["status"] == "completed", a
    assert not config_differences(a["config"], b["config"])
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE} | {  # noqa: E731
        "history": [{k: v for k, v in e.items() if k != "seconds"} for e in r["history"]]}
    assert strip(a) == strip(b)
    ma, mb = (results.load_model(d / results.MODEL_FILE)["state_dict"] for d in (crashed, reference))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    pa, pb = (np.load(d / results.PREDICTIONS_FILE) for d in (crashed, reference))
    assert all(np.array_equal(pa[k], pb[k]) for k in pb.files)
    assert not (crashed / results.TRAINING_STATE_FILE).exists()


def test_twenty_kills_of_one_run_lose_nothing_and_the_result_is_that_of_an_uninterrupted_run(
    tmp_path: Path, dataset: Path
) -> None:
    epochs = ("trainer.epochs=30", "budget.enforce=false")  # 30 short epochs: room for twenty kills
    reference = tmp_path / "reference"
    t0 = time.monotonic()
    ref = start([*run_args(dataset, tmp_path / "ref-cache", *epochs), f"hydra.run.dir={reference}"])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()[-3000:]
    wall = time.monotonic() - t0
    per_epoch = wall / 30  # an upper bound: includes the start-up

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [*run_args(dataset, cache, *epochs), f"hydra.run.dir={run_dir}"]
    shim = injector_dir(tmp_path)
    at_writes = iter([f"checkpoint.pt:1:{s}" for s in STAGES] + [f"results.json:2:{s}" for s in STAGES])
    plan = (
        [f"cifar10-:1:{s}" for s in STAGES]  # the data cache, while it does not exist yet
        + [next(at_writes) if i % 2 else "random" for i in range(12)]  # random, checkpoint, random, results, ...
        + ["random", "random", "random"]
        + ["model.pt:1:mid-write", "model.pt:1:after-rename"]  # the last writes of a run
    )
    assert len(plan) == 20
    rng = random.Random(0)
    killed_at_random = 0
    for step, how in enumerate(plan):
        if how == "random":
            proc = start(args)
            try:
                proc.wait(timeout=rng.uniform(0.5, 6 + 2 * per_epoch))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed_at_random += 1
            out = proc.communicate(timeout=60)[0]
        else:
            proc = start(args, shim, kill_at=how)
            out = proc.communicate(timeout=600)[0]
            assert proc.returncode == -signal.SIGKILL, f"kill {step} ({how}) did not happen:\n{out[-3000:]}"
        assert proc.returncode in (0, -signal.SIGKILL), out[-3000:]
        check_every_file_is_readable([run_dir], cache)
        assert len(temp_files(run_dir, cache)) <= 1, temp_files(run_dir, cache)  # they do not pile up
    assert killed_at_random >= 6, "most random kills should land in a live run"

    last = start(args)
    out = last.communicate(timeout=600)[0]
    assert last.returncode == 0, out[-3000:]
    assert_same_run(run_dir, reference)
    assert temp_files(run_dir, cache) == [], temp_files(run_dir, cache)
    assert len(list(cache.glob("cifar10-*.pt"))) == 1


def test_kills_inside_and_between_the_jobs_of_a_multirun_lose_nothing(tmp_path: Path, dataset: Path) -> None:
    sweep = ("-m", "norm=batch,layer", "trainer.epochs=6")
    reference = tmp_path / "reference"
    t0 = time.monotonic()
    ref = start([*sweep, *run_args(dataset, tmp_path / "ref-cache"), f"hydra.sweep.dir={reference}"])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()[-3000:]
    wall = time.monotonic() - t0

    crashed, cache = tmp_path / "sweep", tmp_path / "cache"
    args = [*sweep, *run_args(dataset, cache), f"hydra.sweep.dir={crashed}"]
    rng = random.Random(1)
    kills = 0
    for _ in range(10):  # random moments over a whole sweep: inside a job, between jobs, in the report
        proc = start(args)
        try:
            proc.wait(timeout=rng.uniform(0.5, wall))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode in (0, -signal.SIGKILL), out[-3000:]
        check_every_file_is_readable([d for d in crashed.glob("*") if d.is_dir()], cache)
        assert len(temp_files(crashed, cache)) <= 1
    assert kills >= 5

    last = start(args)
    out = last.communicate(timeout=600)[0]
    assert last.returncode == 0, out[-3000:]
    jobs = sorted(d.name for d in reference.glob("*") if (d / results.RESULTS_FILE).exists())
    assert len(jobs) == 2 and jobs == sorted(d.name for d in crashed.glob("*") if (d / results.RESULTS_FILE).exists())
    for job in jobs:
        assert_same_run(crashed / job, reference / job)
    assert (crashed / "results.csv").exists() and temp_files(crashed, cache) == []
