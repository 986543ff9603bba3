"""Scale-out: parallel launchers, and several Optuna workers sharing one study on journal and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from .conftest import REPO, normsweep_multirun, small_data_args
from .crash_injector import env, injector_dir, release, wait_parked

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory), "trainer.epochs=1"]


def results(sweep: Path) -> pd.DataFrame:
    return pd.read_csv(sweep / "results.csv")


# ------------------------------------------------------------------ launchers


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_a_two_job_sweep_through_a_parallel_launcher_completes_and_is_collected(
    tmp_path: Path, data_args, launcher: str
) -> None:
    sweep = tmp_path / "sweep"
    proc = normsweep_multirun(
        f"hydra/launcher={launcher}", "norm=batch,group", *data_args, f"hydra.sweep.dir={sweep}", wait=False
    )
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-4000:]
    df = results(sweep)
    assert sorted(df["norm"]) == ["batch", "group"] and set(df["status"]) == {"completed"}
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(runs) == 2 and proc.pid not in {r["pid"] for r in runs}  # jobs ran in worker processes
    # trainer.threads=null: each job gets its share of the cores, never all of them.
    cores = len(os.sched_getaffinity(0))
    expected = 1 if launcher == "submitit_local" else max(1, cores // 2)  # preset: cpus_per_task=1 / n_jobs=2
    assert {r["device"] for r in runs} == {f"cpu ({expected} threads)"}
    if launcher == "submitit_local":
        assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2


def test_launcher_presets_are_checked_against_the_plugins_schemas() -> None:
    from hydra import compose, initialize_config_dir

    from normsweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        slurm = compose(
            "train", ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
        assert slurm.hydra.launcher.partition == "gpu" and slurm.hydra.launcher.gpus_per_node == 1
        assert {"timeout_min", "mem_gb", "cpus_per_task"} <= set(slurm.hydra.launcher)
        with pytest.raises(Exception, match="n_job"):
            compose("train", ["hydra/launcher=joblib", "hydra.launcher.n_job=3"], return_hydra_config=True)
        with pytest.raises(Exception, match="timeout_min"):
            compose("train", ["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=an hour"],
                    return_hydra_config=True)  # fmt: skip


# ------------------------------------------------------------------ several workers, one study


def _ask_until_full(spec: str, study_name: str, n_trials: int, start) -> None:
    """A bare worker: once all are ready, take trial slots as fast as it can, complete each at once."""
    from normsweep.config import SearchConfig
    from normsweep.search.storage import open_storage
    from normsweep.search.trials import take_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(spec))
    dims = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    start.wait(timeout=120)
    while (trial := take_trial(study, spec, SearchConfig(n_trials=n_trials), dims)) is not None:
        time.sleep(0.1)  # "training": the others take slots meanwhile
        study.tell(trial, trial.params["x"])


def hammer(spec: str, storage, n_workers: int = 6, n_trials: int = 24) -> list[optuna.trial.FrozenTrial]:
    """``n_workers`` processes race for the slots of one study; returns its trials."""
    import multiprocessing

    optuna.create_study(study_name="race", storage=storage, direction="maximize")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(n_workers)
    procs = [ctx.Process(target=_ask_until_full, args=(spec, "race", n_trials, start)) for _ in range(n_workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    return optuna.load_study(study_name="race", storage=storage).get_trials()


def check_race(trials: list[optuna.trial.FrozenTrial], n_trials: int = 24) -> None:
    assert len(trials) == n_trials  # without the slot lock, racing workers overshoot
    assert len({t.params["x"] for t in trials}) == n_trials  # no two workers drew from the same seed
    assert len({t.user_attrs["worker"] for t in trials}) > 1


@pytest.mark.slow  # seconds: real processes
def test_racing_workers_on_a_journal_file_take_exactly_n_trials(tmp_path: Path) -> None:
    from normsweep.search.storage import open_storage

    spec = f"journal:{tmp_path / 'race.journal'}"
    check_race(hammer(spec, open_storage(spec)))


def run_two_workers(storage: str, tmp_path: Path, data_args: list[str], n_trials: int) -> list[subprocess.Popen]:
    """Start two search workers at once on one storage and one shared sweep dir; wait for both.

    Each is held in the first step of its first trial until both are there: both run trials at
    once, however long either took to start.
    """
    args = ["search=optuna", f"search.storage={storage}", f"search.n_trials={n_trials}", "search.pruner=none",
            "trainer.epochs=2", "trainer.threads=1", *data_args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    shim = injector_dir(tmp_path)
    workers = [normsweep_multirun(*args, wait=False, environ=env(shim, "step:1:hold")) for _ in range(2)]
    for w in workers:
        wait_parked(w, shim)
    release(shim)
    for w in workers:
        w.output = w.communicate(timeout=600)[0]  # type: ignore[attr-defined]
    return workers


def check_exactly_n_trials(storage, tmp_path: Path, workers: list[subprocess.Popen], n_trials: int) -> None:
    for w in workers:
        assert w.returncode == 0, w.output[-4000:]  # type: ignore[attr-defined]
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    assert len(trials) == n_trials  # a total over both workers
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == n_trials  # no parameters evaluated twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "one worker ran every trial: no concurrency tested"
    # Both workers wrote into one sweep dir: one job dir per trial, and the table of the last one
    # to finish lists every trial.
    jobs = sorted((tmp_path / "sweep").glob("normsweep-*/trial_*/results.json"))
    assert len(jobs) == n_trials
    df = results(tmp_path / "sweep")
    assert len(df) == n_trials and set(df["status"]) == {"completed"}


@pytest.mark.slow
def test_two_workers_on_one_journal_file_run_exactly_n_trials(tmp_path: Path, data_args) -> None:
    journal = tmp_path / "shared" / "study.journal"
    workers = run_two_workers(f"journal:{journal}", tmp_path, data_args, n_trials=6)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    check_exactly_n_trials(JournalStorage(JournalFileBackend(str(journal))), tmp_path, workers, n_trials=6)


@pytest.mark.slow  # seconds: real processes
def test_racing_workers_on_a_postgresql_server_take_exactly_n_trials(postgres_url) -> None:
    check_race(hammer(postgres_url, postgres_url))


@pytest.mark.slow
def test_two_workers_on_a_postgresql_server_run_exactly_n_trials(tmp_path: Path, data_args, postgres_url) -> None:
    workers = run_two_workers(postgres_url, tmp_path, data_args, n_trials=6)
    check_exactly_n_trials(postgres_url, tmp_path, workers, n_trials=6)
