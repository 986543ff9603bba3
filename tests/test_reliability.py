"""Interruption, resume and failure: nothing computed is lost and nothing fails silently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normsweep.data import load_raw, make_splits
from normsweep.models import model_from_config
from normsweep.resume import config_differences
from normsweep.train import CheckpointError, load_checkpoint, train

from .conftest import REPO, small_data_args
from .test_config import make_cfg

TINY = ("trainer.batch_size=25", "trainer.device=cpu", "trainer.progress=false", "model.dropout=0.1")


class Killed(Exception):
    pass


def test_resumed_training_matches_an_uninterrupted_run(folder_data: Path, cache_dir: Path, tmp_path: Path) -> None:
    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20)
    cfg = make_cfg("trainer.epochs=3", "augment=seed", *TINY)  # dropout + random augmentation: RNG matters

    torch.manual_seed(0)
    straight = train(model_from_config(cfg), cfg, splits, torch.device("cpu"))

    ckpt = tmp_path / "checkpoint.pt"

    def kill_after_first_epoch(history):
        if len(history) == 1:
            raise Killed  # as if the process died right after epoch 1's checkpoint was written

    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(model_from_config(cfg), cfg, splits, torch.device("cpu"), kill_after_first_epoch, checkpoint=ckpt)
    assert ckpt.exists() and load_checkpoint(ckpt)["epoch"] == 1  # weights_only: never runs code

    torch.manual_seed(123)  # a fresh process: other RNG state, fresh weights; the checkpoint restores both
    resumed = train(model_from_config(cfg), cfg, splits, torch.device("cpu"), checkpoint=ckpt)
    assert [h.epoch for h in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert (a.train_loss, a.train_acc, a.val_acc, a.test_acc, a.lr) == (b.train_loss, b.train_acc, b.val_acc, b.test_acc, b.lr)


def test_broken_checkpoint_is_reported_not_trusted(folder_data: Path, cache_dir: Path, tmp_path: Path) -> None:
    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20)
    cfg = make_cfg("trainer.epochs=1", *TINY)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"half a file")
    with pytest.raises(CheckpointError, match="cannot resume from .*checkpoint.pt.*delete it"):
        train(model_from_config(cfg), cfg, splits, torch.device("cpu"), checkpoint=ckpt)


def test_config_differences_ignore_keys_that_do_not_change_results() -> None:
    a = {"optimizer": {"lr": 0.1}, "trainer": {"progress": True, "epochs": 3}, "data": {"root": "a"}}
    b = {"optimizer": {"lr": 0.2}, "trainer": {"progress": False, "epochs": 3}, "data": {"root": "/abs/a"}}
    assert config_differences(a, b) == ["optimizer.lr"]


# ------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory, n_train=150, n_test=20), "trainer.threads=1"]


def cli(*args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "normsweep", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_epoch(results: Path, epoch: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if results.exists():
            try:
                if json.loads(results.read_text())["epochs_completed"] >= epoch:
                    return
            except (ValueError, KeyError):
                pass  # never happens with atomic writes, but do not fail the test on a partial read
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the first epoch")


@pytest.mark.slow
def test_sigterm_saves_state_and_the_same_command_resumes_to_the_same_result(tmp_path: Path, data_args) -> None:
    epochs = ("trainer.epochs=6", "augment=seed", "model.dropout=0.1")
    reference = tmp_path / "reference"
    assert cli(*epochs, *data_args, f"hydra.run.dir={reference}").returncode == 0

    run_dir = tmp_path / "run"
    proc = cli(*epochs, *data_args, f"hydra.run.dir={run_dir}", wait=False)
    wait_for_epoch(run_dir / "results.json", 1, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-2000:]
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "interrupted", "the run finished before the signal: make epochs longer"
    assert f"hydra.run.dir={run_dir}" in stopped["error"] and "to resume" in output
    assert (run_dir / "checkpoint.pt").exists()
    done_before = stopped["epochs_completed"]
    assert 1 <= done_before < 6

    again = cli(*epochs, *data_args, f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"after epoch {done_before} of 6" in again.stdout
    resumed, ref = json.loads((run_dir / "results.json").read_text()), json.loads((reference / "results.json").read_text())
    assert resumed["status"] == "completed" and not (run_dir / "checkpoint.pt").exists()
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(ref["history"])
    assert resumed["final_test_acc"] == ref["final_test_acc"]


@pytest.mark.slow
def test_completed_runs_are_skipped_and_kept_as_they_are(tmp_path: Path, data_args) -> None:
    sweep = tmp_path / "sweep"
    args = ("-m", "norm=batch,layer", "trainer.epochs=1", *data_args, f"hydra.sweep.dir={sweep}")
    assert cli(*args).returncode == 0
    files = sorted(sweep.glob("*/results.json"))
    before = [f.read_bytes() for f in files]
    again = cli(*args)
    assert again.returncode == 0
    assert again.stdout.count("already holds this run, completed: skipping it") == 2
    assert [f.read_bytes() for f in files] == before
    other = cli("-m", "norm=batch,layer", "trainer.epochs=1", "optimizer.lr=0.01", *data_args, f"hydra.sweep.dir={sweep}")
    # Job directories are named by their overrides, so another lr writes new ones beside the old.
    assert other.returncode == 0 and len(list(sweep.glob("*/results.json"))) == 4


@pytest.mark.slow
def test_nan_loss_fails_that_run_and_the_sweep_goes_on(tmp_path: Path, data_args) -> None:
    sweep = tmp_path / "sweep"
    proc = cli("-m", "optimizer.lr=1e12,0.01", "norm=none", "scheduler=none", "trainer.epochs=2", *data_args,
               f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode != 0  # Hydra reports the failed job at the end
    runs = {json.loads(f.read_text())["config"]["optimizer"]["lr"]: json.loads(f.read_text())
            for f in sweep.glob("*/results.json")}  # fmt: skip
    assert runs[1e12]["status"] == "failed" and "in epoch 1" in runs[1e12]["error"]
    assert runs[0.01]["status"] == "completed"
    table = (sweep / "results.md").read_text()  # the report still lists both
    assert "failed" in table and "completed" in table


@pytest.mark.slow
def test_combinations_that_only_fail_later_are_explained_at_start(tmp_path: Path, data_args) -> None:
    too_big = cli(*data_args, "trainer.batch_size=2000", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'a'}")
    assert too_big.returncode == 2
    assert "trainer.batch_size=2000 is larger than the 1400 training images" in too_big.stdout + too_big.stderr
    groups = cli(*data_args, "norm=group", "norm.groups=5", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'b'}")
    assert groups.returncode == 2
    assert "norm.groups=5 does not divide the 16 channels of layer 'stem'" in groups.stdout + groups.stderr
    assert "Traceback" not in groups.stdout + groups.stderr


def test_a_one_image_tail_batch_is_skipped_not_fatal_for_batch_norm(folder_data: Path, cache_dir: Path) -> None:
    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=19)  # 101 training images
    cfg = make_cfg("norm=batch", "trainer.epochs=1", *TINY)  # batch 25: 4 batches and 1 left over
    (stats,) = train(model_from_config(cfg), cfg, splits, torch.device("cpu"))
    assert stats.train_loss > 0 and stats.lr == pytest.approx(0.0, abs=1e-9)  # schedule still ends at its end
