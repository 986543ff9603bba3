"""Dead search workers: heartbeats, stale trials failed with a reason, their slots run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from normsweep.search.trials import HEARTBEAT_ATTR, STALE_ATTR, fail_stale_trials, heartbeat, uses_slot

from . import warm_python
from .conftest import REPO, small_data_args
from .crash_injector import env, injector_dir, wait_parked
from .slurm_cluster import wait_for

optuna.logging.set_verbosity(optuna.logging.WARNING)
State = optuna.trial.TrialState


def journal_study(path: Path) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.create_study(
        storage=JournalStorage(JournalFileBackend(str(path))), study_name="s", load_if_exists=True
    )


@pytest.mark.parametrize("backend", ["journal", "sqlite"])
def test_only_trials_silent_past_the_grace_period_are_failed_and_free_their_slot(tmp_path: Path, backend: str) -> None:
    if backend == "journal":
        study = journal_study(tmp_path / "j.log")
    else:
        study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    alive, dead, done = study.ask(), study.ask(), study.ask()
    study.tell(done, 1.0)
    now = time.time()
    study._storage.set_trial_system_attr(alive._trial_id, HEARTBEAT_ATTR, now - 5)
    study._storage.set_trial_system_attr(dead._trial_id, HEARTBEAT_ATTR, now - 500)
    dead_trial = study._storage.get_trial(dead._trial_id)
    dead_trial_worker = dead_trial.user_attrs.get("worker", "?")

    assert fail_stale_trials(study, grace_period=120, now=now) == [dead.number]
    trials = {t.number: t for t in study.get_trials()}
    assert trials[alive.number].state == State.RUNNING and uses_slot(trials[alive.number])
    assert trials[done.number].state == State.COMPLETE and uses_slot(trials[done.number])
    stale = trials[dead.number]
    assert stale.state == State.FAIL and stale.system_attrs[STALE_ATTR] and not uses_slot(stale)
    assert "no heartbeat for 500s" in stale.user_attrs["error"] and dead_trial_worker in stale.user_attrs["error"]
    assert fail_stale_trials(study, grace_period=120, now=now) == []  # nothing else is stale


def test_a_running_trial_beats_while_its_job_runs_and_stops_after(tmp_path: Path) -> None:
    study = journal_study(tmp_path / "j.log")
    trial = study.ask()
    beat = lambda: study._storage.get_trial(trial._trial_id).system_attrs.get(HEARTBEAT_ATTR)  # noqa: E731
    with heartbeat(study, trial, interval=0.05):
        first = wait_for(beat, 120, "a first heartbeat", interval=0.01)  # the timeouts only bound a hang
        wait_for(lambda: beat() != first, 120, "a second heartbeat", interval=0.01)
        assert beat() > first  # it kept beating
    last = beat()
    time.sleep(0.3)  # six intervals: a heartbeat after the block would show
    assert beat() == last  # stopped with the block


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory, n_train=60, n_test=10), "trainer.progress=false", "trainer.threads=1"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["journal", "sqlite", "postgresql"])
def test_a_sigkilled_worker_does_not_stall_the_search(tmp_path: Path, data_args, backend: str, request) -> None:
    if backend == "journal":
        spec, storage = f"journal:{tmp_path / 'study.journal'}", None
    elif backend == "sqlite":
        spec = storage = f"sqlite:///{tmp_path / 'study.db'}"
    else:  # a real server the test starts (tests/conftest.py), skipped where PostgreSQL is not installed
        spec = storage = request.getfixturevalue("postgres_url")
    grace = 2  # seconds; only the survivor judges a trial, and only its dead predecessor's is running then
    args = [sys.executable, "-m", "normsweep", "-m", "search=optuna", f"search.storage={spec}", "search.n_trials=3",
            "search.pruner=none", "search.heartbeat_interval=0.5", f"search.grace_period={grace}", "trainer.epochs=1",
            "budget.enforce=false", *data_args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip

    def load() -> optuna.Study | None:
        st = storage
        if backend == "journal":
            if not (tmp_path / "study.journal").exists():
                return None
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            st = JournalStorage(JournalFileBackend(str(tmp_path / "study.journal")))
        elif backend == "sqlite" and not (tmp_path / "study.db").exists():
            return None
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        return optuna.load_study(study_name=names[0], storage=st) if names else None

    def beating() -> list[optuna.trial.FrozenTrial]:
        study = load()
        running = study.get_trials(states=(State.RUNNING,)) if study else []
        return [t for t in running if HEARTBEAT_ATTR in t.system_attrs]

    # Parked in its first trial's first training step: that trial is running for good, beating on.
    shim, log = injector_dir(tmp_path), tmp_path / "victim.log"
    with log.open("w") as out:
        victim = warm_python.Popen(args, cwd=REPO, env=env(shim, "step:1:park"), stdout=out, stderr=subprocess.STDOUT)
    wait_parked(victim, shim, log=log)
    wait_for(beating, 300, "a running trial with a heartbeat", interval=0.1)
    os.kill(victim.pid, signal.SIGKILL)  # no handler runs: the trial stays RUNNING in the storage
    victim.wait()
    study = load()
    killed = study._storage.get_trial(beating()[0]._trial_id)
    assert killed.state == State.RUNNING
    time.sleep(max(0.0, killed.system_attrs[HEARTBEAT_ATTR] + grace - time.time()))  # silent past the grace period

    survivor = warm_python.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)  # the same command
    trials = {t.number: t for t in study.get_trials()}
    assert not [t for t in trials.values() if t.state == State.RUNNING], (
        survivor.stdout[-3000:] + survivor.stderr[-3000:]
    )
    assert trials[killed.number].state == State.FAIL and "presumed dead" in trials[killed.number].user_attrs["error"]
    counted = [t for t in trials.values() if uses_slot(t)]
    assert len(counted) == 3 and all(t.state == State.COMPLETE for t in counted), survivor.stdout[-3000:]
