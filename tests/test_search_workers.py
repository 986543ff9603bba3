"""Search workers started through a launcher (search.workers): each runs Optuna's loop with pruning.

The end-to-end tests go through ``hydra/launcher=joblib``; the same workers on a real Slurm are in
``tests/test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf

from normsweep.base.results import RunRecord
from normsweep.config import SearchConfig
from normsweep.run.trial_hook import RunPruned
from normsweep.search.storage import open_storage
from normsweep.search.trials import (
    EARLIER_JOB_DIRS_ATTR,
    HEARTBEAT_ATTR,
    JOB_DIR_ATTR,
    JOB_SUBDIR_ATTR,
    SearchError,
    free_slot,
    take_trial,
    uses_slot,
)
from normsweep.search.worker import (
    SearchWorker,
    StudyPlan,
    carry_checkpoint,
    load_studies,
    open_shared_storage,
    trial_hook_for,
)

from . import warm_python
from .conftest import (
    REPO,
    all_trials,
    check_retried_from_checkpoint,
    normsweep_multirun,
    overlapping,
    running_past_epoch_2,
    small_data_args,
)
from .slurm_cluster import wait_for

optuna.logging.set_verbosity(optuna.logging.WARNING)
State = optuna.trial.TrialState
DIMS = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


# ------------------------------------------------------------------ the worker loop, in-process


def test_a_worker_serves_every_study_round_robin_from_its_own_and_stops_at_n_trials(
    tmp_path: Path, monkeypatch
) -> None:
    spec = f"journal:{tmp_path / 's.journal'}"
    storage = open_storage(spec)
    names = ["study-a", "study-b", "study-c"]
    for name in names:
        optuna.create_study(study_name=name, storage=storage, direction="maximize")
    served: list[str] = []

    def run_trial(self, study, trial, plan, cfg, spec) -> None:  # no job: tell at once what was asked
        served.append(plan.name)
        study.tell(trial, trial.params["x"])

    monkeypatch.setattr(SearchWorker, "run_trial", run_trial)
    config = OmegaConf.create(
        {"search": {"n_trials": 2, "storage": spec}, "hydra": {"runtime": {"cwd": str(tmp_path)}}}
    )
    worker = SearchWorker(hydra_context=None, task_function=None, config=config, dims=DIMS,
                          pruner=optuna.pruners.NopPruner(), plans=[StudyPlan(n, ()) for n in names])  # fmt: skip
    done = worker.serve(index=4)  # worker 4 of a grid of 3 starts at study 4 % 3
    assert served == ["study-b", "study-c", "study-a"] * 2 and done["trials"] == 6
    assert worker.serve(index=0)["trials"] == 0  # a worker started later finds every slot used
    for name in names:
        assert len(optuna.load_study(study_name=name, storage=storage).get_trials()) == 2


def test_a_worker_logs_each_trial_s_start_with_its_parameters_and_its_outcome_with_the_study_s_standing(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    spec = f"journal:{tmp_path / 's.journal'}"
    optuna.create_study(study_name="s", storage=open_storage(spec), direction="maximize")
    outcomes = iter(["complete", "pruned", "fail", "complete"])

    def run_trial(self, study, trial, plan, cfg, spec) -> None:  # no job: the outcome is told at once
        outcome = next(outcomes)
        if outcome == "complete":
            study.tell(trial, 100 * trial.params["x"])
        elif outcome == "pruned":
            trial.report(42.0, 3)
            study.tell(trial, state=State.PRUNED)
        else:
            trial.set_user_attr("error", "RuntimeError: loss is nan")
            study.tell(trial, state=State.FAIL)

    monkeypatch.setattr(SearchWorker, "run_trial", run_trial)
    config = OmegaConf.create({"search": {"n_trials": 4, "storage": spec, "max_failure_rate": 0.9},
                               "hydra": {"runtime": {"cwd": str(tmp_path)}}})  # fmt: skip
    worker = SearchWorker(hydra_context=None, task_function=None, config=config, dims=DIMS,
                          pruner=optuna.pruners.NopPruner(), plans=[StudyPlan("s", ())])  # fmt: skip
    with caplog.at_level("INFO", logger="normsweep.search.worker"):
        worker.serve(index=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "normsweep.search.worker"]
    trials = all_trials(spec)
    x0 = trials[0].params["x"]
    assert f"study s: trial 0 starts (worker 1): x={x0:.4g}" in lines
    best = max((t for t in trials if t.state == State.COMPLETE), key=lambda t: t.value)
    (done,) = [line for line in lines if line.startswith("study s: trial 3 complete")]
    assert f"validation {trials[3].value:.2f}%" in done
    assert f"4 of 4 finished (2 complete, 1 pruned, 1 failed), best {best.value:.2f}% (trial {best.number})" in done
    (pruned,) = [line for line in lines if line.startswith("study s: trial 1 pruned")]
    assert (
        "trial 1 pruned after epoch 3 (42.00%)" in pruned
        and "2 of 4 finished (1 complete, 1 pruned, 0 failed)" in pruned
    )
    assert any(line.startswith("study s: trial 2 failed (RuntimeError: loss is nan)") for line in lines)


def test_a_worker_that_cannot_see_the_storage_file_says_so_naming_search_storage(tmp_path: Path) -> None:
    missing = f"journal:{tmp_path / 'on-the-login-node' / 'study.journal'}"
    with pytest.raises(
        SearchError, match=r"search.storage=journal:.*does not exist on .*login-node-1.*filesystem all nodes share"
    ):
        open_shared_storage(missing, sweeper_host="login-node-1")
    assert not (tmp_path / "on-the-login-node").exists()  # nothing created where the worker runs
    # A file at the same path that is not the sweeper's (a node-local disk): the study is not in it.
    other = f"journal:{tmp_path / 'local.journal'}"
    optuna.create_study(study_name="someone-else", storage=open_storage(other))
    with pytest.raises(SearchError, match=r"search.storage=journal:.* has no study normsweep-batch-1"):
        load_studies(open_shared_storage(other, "login-node-1"), other, [StudyPlan("normsweep-batch-1", ())],
                     optuna.pruners.NopPruner())  # fmt: skip


def test_a_stopped_trial_frees_its_slot_and_its_parameters_run_again_in_its_job_directory(tmp_path: Path) -> None:
    spec = f"journal:{tmp_path / 's.journal'}"
    study = optuna.create_study(study_name="s", storage=open_storage(spec), direction="maximize")
    cfg = SearchConfig(n_trials=2)
    first = take_trial(study, spec, cfg, DIMS)
    first.set_user_attr(JOB_SUBDIR_ATTR, "s/trial_0")
    first.report(0.25, 1)
    second = take_trial(study, spec, cfg, DIMS)
    assert take_trial(study, spec, cfg, DIMS) is None  # both slots used

    free_slot(study, study._storage.get_trial(first._trial_id), "worker stopped (SIGTERM)")
    stopped = study._storage.get_trial(first._trial_id)
    assert (
        stopped.state == State.FAIL
        and not uses_slot(stopped)
        and stopped.user_attrs["error"] == "worker stopped (SIGTERM)"
    )
    retry = take_trial(study, spec, cfg, DIMS)  # the freed slot, with the stopped trial's parameters
    assert retry is not None and retry.number not in (first.number, second.number)
    assert retry.params == first.params and retry.user_attrs["retry_of"] == first.number
    assert retry.user_attrs[JOB_SUBDIR_ATTR] == "s/trial_0"
    assert take_trial(study, spec, cfg, DIMS) is None  # exactly n_trials again


def attempt(job_dir: Path, status: str, checkpoint: str | None, lr: float = 0.2) -> Path:
    """A trial attempt's job directory: its record and, unless None, a checkpoint holding ``checkpoint``."""
    RunRecord(status=status, config={"optimizer": {"lr": lr}, "trainer": {"threads": 1}}).write(job_dir)
    if checkpoint is not None:
        (job_dir / "checkpoint.pt").write_text(checkpoint)
    return job_dir


def test_a_retry_in_another_sweep_dir_starts_from_a_copy_of_the_newest_checkpoint_of_its_attempts(
    tmp_path: Path, caplog
) -> None:
    first = attempt(tmp_path / "A" / "s" / "trial_0", "interrupted", "epoch 5")
    second = attempt(tmp_path / "B" / "s" / "trial_0", "interrupted", "epoch 8")
    job = tmp_path / "C" / "s" / "trial_0"
    config = {"optimizer": {"lr": 0.2}, "trainer": {"threads": 2}}  # threads: result-neutral, so the same run
    with caplog.at_level("INFO", logger="normsweep.search.worker"):
        carry_checkpoint([str(tmp_path / "gone"), str(second), str(first)], job, 3, config)
    assert (job / "checkpoint.pt").read_text() == "epoch 8"  # the newest visible attempt's
    assert RunRecord.read(job).status == "interrupted"  # its record too: the job's resume checks it
    assert (second / "checkpoint.pt").read_text() == "epoch 8" and (first / "checkpoint.pt").read_text() == "epoch 5"
    assert f"trial 3: the job directory of its earlier attempt, {tmp_path / 'gone'}, is not visible here" in caplog.text
    assert f"trial 3 resumes from its earlier attempt's checkpoint, copied from {second}" in caplog.text

    # A job directory that holds a run already is its own: nothing is copied over it (a completed retry too).
    done = attempt(tmp_path / "D" / "s" / "trial_0", "completed", None)
    carry_checkpoint([str(second)], done, 3, config)
    assert not (done / "checkpoint.pt").exists() and RunRecord.read(done).status == "completed"


def test_a_retry_does_not_take_a_checkpoint_of_another_config_or_one_an_attempt_no_longer_has(
    tmp_path: Path, caplog
) -> None:
    other = attempt(tmp_path / "A" / "trial_0", "interrupted", "epoch 5", lr=0.4)
    job = tmp_path / "B" / "trial_0"
    with caplog.at_level("INFO", logger="normsweep.search.worker"):
        carry_checkpoint([str(other)], job, 3, {"optimizer": {"lr": 0.2}, "trainer": {"threads": 1}})
    assert not job.exists()
    assert "is of another config (differs in optimizer.lr): it trains from epoch 1" in caplog.text
    completed = attempt(tmp_path / "C" / "trial_0", "completed", None)
    with caplog.at_level("INFO", logger="normsweep.search.worker"):
        carry_checkpoint([str(completed)], job, 3, None)
    assert (
        not job.exists()
        and "completed, but its worker stopped before telling the study: it trains again" in caplog.text
    )


def test_a_retry_of_a_retry_knows_every_earlier_attempt_s_job_directory_newest_first(tmp_path: Path) -> None:
    spec = f"journal:{tmp_path / 's.journal'}"
    study = optuna.create_study(study_name="s", storage=open_storage(spec), direction="maximize")
    cfg = SearchConfig(n_trials=1)
    trial = take_trial(study, spec, cfg, DIMS)
    for sweep in ("A", "B", "C"):
        trial.set_user_attr(JOB_DIR_ATTR, str(tmp_path / sweep / "s" / "trial_0"))
        free_slot(study, study._storage.get_trial(trial._trial_id), "worker stopped (SIGTERM)")
        trial = take_trial(study, spec, cfg, DIMS)
    assert trial.user_attrs[EARLIER_JOB_DIRS_ATTR] == [str(tmp_path / s / "s" / "trial_0") for s in ("C", "B", "A")]


def test_a_trial_is_pruned_after_any_epoch_but_its_last_one(tmp_path: Path) -> None:
    class Always(optuna.pruners.BasePruner):  # prunes whenever asked
        def prune(self, study, trial) -> bool:
            return True

    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path / 's.journal'}"), pruner=Always())
    hook = trial_hook_for(study.ask())
    with pytest.raises(RunPruned, match="pruned after epoch 19"):
        hook.report(19, 80.0, False)
    hook.report(20, 81.5, True)  # the run trained all its epochs: complete, whatever the pruner says


def test_a_job_gets_its_workers_share_of_the_cores(monkeypatch) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from normsweep.base import runtime
    from normsweep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"], return_hydra_config=True)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    HydraConfig.instance().set_config(cfg)
    try:
        assert runtime.job_threads(None) == 2  # 8 cores, 4 jobs at a time
        assert runtime.job_threads(None, jobs_at_once=2) == 4  # only the search's 2 workers run: 4 threads each
        assert runtime.job_threads(3, jobs_at_once=2) == 3  # trainer.threads wins
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow  # seconds: real processes
def test_more_than_one_worker_needs_a_launcher_that_runs_jobs_in_parallel(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    proc = normsweep_multirun("search=optuna", "search.workers=2", f"search.storage=journal:{journal}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    assert proc.returncode != 0
    assert "search.workers=2 needs a launcher that runs jobs in parallel: hydra/launcher=joblib" in proc.stderr
    assert not journal.exists()  # refused before any study was made


# ------------------------------------------------------------------ workers through joblib


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory), "trainer.progress=false"]


def joblib_workers(tmp_path: Path, *args: str) -> list[str]:
    return ["search=optuna", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "search.workers=2",
            f"search.storage=journal:{tmp_path / 'study.journal'}", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip


@pytest.mark.slow
def test_two_joblib_workers_prune_inside_and_run_exactly_n_trials_together(tmp_path: Path, data_args) -> None:
    args = joblib_workers(tmp_path, "search.n_trials=6", "search.pruner=threshold", "search.prune_below=99",
                          "trainer.epochs=3", *data_args)  # fmt: skip
    proc = normsweep_multirun(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = all_trials(f"journal:{tmp_path / 'study.journal'}")
    # Pruned inside the workers: each reported its first epoch to the study and stopped there.
    assert len(trials) == 6 and all(t.state == State.PRUNED for t in trials)
    assert all(list(t.intermediate_values) == [1] and t.user_attrs["epochs_completed"] == 1 for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    assert len({t.user_attrs["worker"] for t in trials}) >= 2
    assert overlapping(trials), [(t.user_attrs["worker"], t.datetime_start, t.datetime_complete) for t in trials]
    sweep = tmp_path / "sweep"
    for t in trials:  # one job directory per trial, <sweep dir>/<study>/trial_<number>
        job = Path(t.user_attrs["job_dir"])
        assert job.parent.parent == sweep and job.name == f"trial_{t.number}"
        res = json.loads((job / "results.json").read_text())
        assert res["status"] == "pruned" and res["trial"] == t.number
        assert res["device"] == f"cpu ({max(1, len(os.sched_getaffinity(0)) // 2)} threads)"  # its worker's share
    assert [p.relative_to(sweep) for p in sweep.rglob("optimization_results.md")] == [Path("optimization_results.md")]
    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 6 and set(table["status"]) == {"pruned"}

    again = normsweep_multirun(*args)  # the same command: every slot is used, nothing runs
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(all_trials(f"journal:{tmp_path / 'study.journal'}")) == 6


@pytest.mark.slow
def test_a_sigterm_d_worker_frees_its_trial_and_the_command_resumes_every_trial_from_its_checkpoint_in_any_sweep_dir(
    tmp_path: Path, data_args
) -> None:
    spec = f"journal:{tmp_path / 'study.journal'}"
    args = joblib_workers(tmp_path, "search.n_trials=2", "search.pruner=none", "search.heartbeat_interval=0.5",
                          "search.grace_period=8", "trainer.epochs=20", *data_args)  # fmt: skip
    log = tmp_path / "first.log"
    first = warm_python.Popen([sys.executable, "-m", "normsweep", "-m", *args], cwd=REPO, stdout=log.open("w"),
                             stderr=subprocess.STDOUT)  # fmt: skip
    running = running_past_epoch_2(first, log, spec, 2)
    victim = running[0]
    os.kill(int(victim.user_attrs["worker"].split(":")[1]), signal.SIGTERM)  # as scancel / a preemption would
    first.wait(timeout=300)  # joblib stops the sweep, ending the other worker at once (SIGKILL)
    trials = {t.number: t for t in all_trials(spec)}
    stopped = trials[victim.number]
    assert stopped.state == State.FAIL and not uses_slot(stopped), stopped
    assert stopped.user_attrs["error"].startswith("worker stopped (RunInterrupted: stopped by signal SIGTERM)")
    job = tmp_path / "sweep" / stopped.user_attrs[JOB_SUBDIR_ATTR]
    assert json.loads((job / "results.json").read_text())["status"] == "interrupted"

    # The other worker's trial (RUNNING, its worker gone) goes stale once search.grace_period has passed.
    other = trials[running[1].number]
    if other.state == State.RUNNING:
        wait_for(
            lambda: time.time() - other.system_attrs[HEARTBEAT_ATTR] > 8, 60, "the dead worker's trial to go stale"
        )
    # The same command, but in another sweep dir (as a plain re-run gets: the default one is timestamped).
    again = normsweep_multirun(*[a.replace(str(tmp_path / "sweep"), str(tmp_path / "sweep2")) for a in args])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = {t.number: t for t in all_trials(spec)}
    counted = [t for t in trials.values() if uses_slot(t)]
    assert len(counted) == 2, [(t.number, t.state) for t in trials.values()]
    for stopped in (victim, other):
        retry = check_retried_from_checkpoint(trials, stopped, tmp_path / "sweep2")
        assert retry in counted
        res = json.loads((Path(retry.user_attrs["job_dir"]) / "results.json").read_text())
        assert res["status"] == "completed" and [e["epoch"] for e in res["history"]] == list(range(1, 21))
        assert sorted(retry.intermediate_values) == list(range(1, 21))  # its checkpoint's epochs, then its own
        first_dir = tmp_path / "sweep" / stopped.user_attrs[JOB_SUBDIR_ATTR]  # the first attempt's, left as it was
        assert (first_dir / "checkpoint.pt").exists() and json.loads((first_dir / "results.json").read_text())[
            "status"
        ] != "completed"
    assert set(pd.read_csv(tmp_path / "sweep2" / "results.csv")["status"]) == {"completed"}  # the new table is whole
