"""Interruption, resume and failure: nothing computed is lost and nothing fails silently."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from normsweep.base import results
from normsweep.base.results import RunRecord
from normsweep.data import CLASSES, load_raw, make_splits
from normsweep.run.build import model_from_config
from normsweep.run.resume import config_differences
from normsweep.run.train import CheckpointError, load_checkpoint, train

from .conftest import TINY, compose_config, make_cfg, normsweep_run, parked_in_epoch_2, small_data_args
from .crash_injector import env, injector_dir, steps_per_epoch


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
        assert (a.train_loss, a.train_acc, a.val_acc, a.test_acc, a.lr) == (
            b.train_loss,
            b.train_acc,
            b.val_acc,
            b.test_acc,
            b.lr,
        )


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
    # A search's own settings change between rounds (n_trials, max_failure_rate): a trial retried in a
    # later round still resumes its checkpoint (found when the full-fidelity search's retry refused it).
    s = {"search": {"n_trials": 2, "max_failure_rate": 0.5, "params": {"optimizer.lr": "interval(0.01, 1)"}}}
    t = {"search": {"n_trials": 4, "max_failure_rate": 0.7, "params": {"optimizer.lr": "interval(0.1, 1)"}}}
    assert config_differences({**a, **s}, {**a, **t}) == []


# ------------------------------------------------------------------ through the CLI


def test_a_directory_holding_another_configs_checkpoint_is_refused_saying_why(tmp_path: Path) -> None:
    """The refusal comes before the run's record exists, so nothing else would say why it stopped: it
    once exited 2 in silence, and a search trial retried in such a directory failed with error None."""
    run_dir = tmp_path / "run"
    other = compose_config(["optimizer.lr=0.5", "trainer.epochs=1"])
    RunRecord(status="running", config=OmegaConf.to_container(other, resolve=True)).write(run_dir)
    (run_dir / results.TRAINING_STATE_FILE).write_bytes(b"a checkpoint of that run")
    proc = normsweep_run("optimizer.lr=0.1", f"hydra.run.dir={run_dir}", "trainer.epochs=1", "data.root=/nonexistent")
    message = "already holds a run with another config (differs in optimizer.lr)"
    assert proc.returncode == 2 and message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert message in (run_dir / "normsweep.log").read_text()
    assert json.loads((run_dir / results.RESULTS_FILE).read_text())["status"] == "running"  # left as it was


PER_CLASS = 150  # training images of each class in the CLI tests' dataset


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory, n_train=PER_CLASS, n_test=20), "trainer.threads=1"]


@pytest.mark.slow
def test_sigterm_saves_state_and_the_same_command_resumes_to_the_same_result(tmp_path: Path, data_args) -> None:
    epochs = ("trainer.epochs=3", "augment=seed", "model.dropout=0.1")
    reference = tmp_path / "reference"
    ref = normsweep_run(*epochs, *data_args, f"hydra.run.dir={reference}", wait=False)  # runs alongside

    run_dir = tmp_path / "run"
    proc = parked_in_epoch_2(tmp_path, len(CLASSES) * PER_CLASS, *epochs, *data_args, f"hydra.run.dir={run_dir}")
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 130, output[-2000:]
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["epochs_completed"] == 1, stopped
    assert f"hydra.run.dir={run_dir}" in stopped["error"] and "to resume" in output
    assert (run_dir / "checkpoint.pt").exists()

    again = normsweep_run(*epochs, *data_args, f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "after epoch 1 of 3" in again.stdout
    ref_output = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_output[-3000:]
    resumed, ref = (
        json.loads((run_dir / "results.json").read_text()),
        json.loads((reference / "results.json").read_text()),
    )
    assert resumed["status"] == "completed" and not (run_dir / "checkpoint.pt").exists()
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(ref["history"])
    assert resumed["final_test_acc"] == ref["final_test_acc"]


@pytest.mark.slow
def test_a_sigterm_just_after_an_epoch_s_checkpoint_is_saved_reports_the_epoch_the_resume_starts_from(
    tmp_path: Path, data_args
) -> None:
    # The signal lands after epoch 2's checkpoint is in place and before the run's record has counted
    # that epoch: what the run says it kept must be what the checkpoint holds and the resume uses.
    run_dir, shim = tmp_path / "run", injector_dir(tmp_path)
    args = ("trainer.epochs=3", *data_args, f"hydra.run.dir={run_dir}")
    stopped = normsweep_run(*args, environ=env(shim, f"{results.TRAINING_STATE_FILE}:2:term-after-rename"))
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert load_checkpoint(run_dir / results.TRAINING_STATE_FILE)["epoch"] == 2
    assert "run interrupted after epoch 2 of 3" in stopped.stdout, stopped.stdout[-3000:]
    assert "after epoch 2;" in json.loads((run_dir / results.RESULTS_FILE).read_text())["error"]
    again = normsweep_run(*args)
    assert again.returncode == 0 and "resuming from checkpoint.pt after epoch 2 of 3" in again.stdout


@pytest.mark.slow
def test_a_second_signal_while_the_run_records_its_stop_does_not_cut_the_record_short(
    tmp_path: Path, data_args
) -> None:
    # Slurm's time limit as submitit handles it: SIGUSR2, the job requeued, SystemExit(-1) raised in the
    # training step; the requeue's SIGTERM then lands while the run writes down that it stopped.
    run_dir, shim = tmp_path / "run", injector_dir(tmp_path)
    args = ("trainer.epochs=3", *data_args, f"hydra.run.dir={run_dir}")
    spec = f"step:{2 * steps_per_epoch(len(CLASSES) * PER_CLASS, args) + 1}:exit-term"  # epoch 3's first step
    stopped = normsweep_run(*args, environ=env(shim, spec))
    assert stopped.returncode == 255, stopped.stdout[-3000:]  # SystemExit(-1)
    assert "SIGTERM while stopping: finishing the record first" in stopped.stdout, stopped.stdout[-3000:]
    assert "run interrupted after epoch 2 of 3" in stopped.stdout, stopped.stdout[-3000:]
    record = json.loads((run_dir / results.RESULTS_FILE).read_text())
    assert record["status"] == "interrupted" and record["error"].startswith("SystemExit: -1 after epoch 2;"), record
    again = normsweep_run(*args)
    assert again.returncode == 0 and "resuming from checkpoint.pt after epoch 2 of 3" in again.stdout, again.stdout[
        -3000:
    ]


@pytest.mark.slow
def test_completed_runs_are_skipped_and_kept_as_they_are(tmp_path: Path, data_args) -> None:
    sweep = tmp_path / "sweep"
    args = ("-m", "norm=batch,layer", "trainer.epochs=1", *data_args, f"hydra.sweep.dir={sweep}")
    assert normsweep_run(*args).returncode == 0
    files = sorted(sweep.glob("*/results.json"))
    before = [f.read_bytes() for f in files]
    again = normsweep_run(*args)
    assert again.returncode == 0
    assert again.stdout.count("already holds this run, completed: skipping it") == 2
    assert [f.read_bytes() for f in files] == before
    other = normsweep_run(
        "-m", "norm=batch,layer", "trainer.epochs=1", "optimizer.lr=0.01", *data_args, f"hydra.sweep.dir={sweep}"
    )
    # Job directories are named by their overrides, so another lr writes new ones beside the old.
    assert other.returncode == 0 and len(list(sweep.glob("*/results.json"))) == 4


@pytest.mark.slow
def test_nan_loss_fails_that_run_and_the_sweep_goes_on(tmp_path: Path, data_args) -> None:
    sweep = tmp_path / "sweep"
    proc = normsweep_run("-m", "optimizer.lr=1e12,0.01", "norm=none", "scheduler=none", "trainer.epochs=2", *data_args,
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
    too_big = normsweep_run(
        *data_args, "trainer.batch_size=2000", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'a'}"
    )
    assert too_big.returncode == 2
    assert "trainer.batch_size=2000 is larger than the 1400 training images" in too_big.stdout + too_big.stderr
    groups = normsweep_run(
        *data_args, "norm=group", "norm.groups=5", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'b'}"
    )
    assert groups.returncode == 2
    assert "norm.groups=5 does not divide the 16 channels of layer 'stem'" in groups.stdout + groups.stderr
    assert "Traceback" not in groups.stdout + groups.stderr


def test_a_one_image_tail_batch_is_skipped_not_fatal_for_batch_norm(folder_data: Path, cache_dir: Path) -> None:
    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=19)  # 101 training images
    cfg = make_cfg("norm=batch", "trainer.epochs=1", *TINY)  # batch 25: 4 batches and 1 left over
    (stats,) = train(model_from_config(cfg), cfg, splits, torch.device("cpu"))
    assert stats.train_loss > 0 and stats.lr == pytest.approx(0.0, abs=1e-9)  # schedule still ends at its end
