"""normsweep on a real Slurm: the unchanged conf/hydra/launcher/submitit_slurm.yaml against a private cluster.

The cluster (``tests/slurm_cluster.py``) is started once for this module: munge, MariaDB and
slurmdbd (submitit asks ``sacct`` whether a job ended), slurmctld and slurmd, one node with this
machine's CPUs. Only the partition, ``gpus_per_node=0``, the CPUs and the memory are overridden.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from normsweep.run.trackers import EPOCH_METRICS
from normsweep.search.trials import HEARTBEAT_ATTR, uses_slot

from . import crash_injector, warm_python
from .conftest import (
    REPO,
    all_trials,
    check_retried_from_checkpoint,
    overlapping,
    running_past_epoch_2,
    small_data_args,
)
from .slurm_cluster import INSTALL_HINT, PARTITION, PrivateSlurm, missing_binaries, wait_for

# One xdist worker runs every test of this file (--dist loadgroup): its module fixture is costly to start.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]
optuna.logging.set_verbosity(optuna.logging.WARNING)
State = optuna.trial.TrialState
ON_SLURM = ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]  # fmt: skip


@pytest.fixture(scope="module")
def slurm():
    missing = missing_binaries()
    if missing:
        pytest.skip(f"{', '.join(missing)} not found; {INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.skip(
            "the private Slurm runs its daemons as root (SlurmUser=root, MariaDB as the mysql user): run as root, as CI does"
        )
    cluster = PrivateSlurm().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory), "trainer.progress=false"]


def submit(cluster: PrivateSlurm, *args: str, log: Path | None = None, env: dict | None = None):
    """``python -m normsweep -m ON_SLURM ARGS`` against ``cluster``: finished, or running with its output in ``log``.

    ``env`` (default: the cluster's) is also the jobs' environment: sbatch passes it on.
    """
    cmd = [sys.executable, "-m", "normsweep", "-m", *ON_SLURM, *args]
    # Started cold (subprocess itself): this file is one xdist group whose few starts a warm start would
    # hardly shorten, and the cluster's environment would need a warm-start server of its own.
    if log is None:
        return subprocess.run(cmd, cwd=REPO, env=env or cluster.env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, cwd=REPO, env=env or cluster.env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_a_three_norm_sweep_runs_as_array_tasks_and_is_tabled(slurm: PrivateSlurm, tmp_path: Path, data_args) -> None:
    sweep = tmp_path / "sweep"
    proc = submit(slurm, "norm=batch,group,layer", "trainer.epochs=1", *data_args, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + slurm.logs()
    df = pd.read_csv(sweep / "results.csv")
    assert sorted(df["norm"]) == ["batch", "group", "layer"] and set(df["status"]) == {"completed"}
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert {r["device"] for r in runs} == {"cpu (1 threads)"}  # cpus_per_task=1 torch thread each
    array = re.search(r"\b(\d+)_\d+\b", " ".join(p.name for p in (sweep / ".submitit").iterdir()))
    assert array, list((sweep / ".submitit").iterdir())
    states = slurm.run("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", array[1]).stdout.split()
    assert sorted(states) == [f"{array[1]}_{i}|COMPLETED" for i in range(3)]  # one array job, three tasks


def _history(job_dir: Path) -> list[dict]:
    """Each epoch's numbers, without its wall-clock time."""
    return [
        {k: v for k, v in e.items() if k != "seconds"}
        for e in json.loads((job_dir / "results.json").read_text())["history"]
    ]


def _minutes(elapsed: str) -> int:
    """Whole minutes of squeue's elapsed time ``[D-]H:MM:SS`` or ``M:SS``."""
    days, _, clock = elapsed.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1]


def _tracked_epochs(tracker: str, job_dir: Path, uri: str) -> dict[str, list[tuple[int, float]]]:
    """Each per-epoch metric as the tracker's own reader shows it: (epoch, value), in logging order; checks one run."""
    if tracker == "tensorboard":
        from .conftest import scalars

        return {key: [(step, float(v)) for step, v in logged] for key, logged in scalars(job_dir).items()}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("requeue").experiment_id])  # one run, not one per start
    assert run.info.status == "FINISHED" and run.info.run_name == job_dir.name
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in EPOCH_METRICS}


@pytest.mark.parametrize("stop,tracker", [("scontrol requeue", "tensorboard"), ("time limit", "mlflow")])
def test_a_run_requeued_or_at_its_time_limit_resumes_to_the_numbers_of_an_uninterrupted_run_and_one_tracker_run(
    slurm: PrivateSlurm, tmp_path: Path, data_args, stop: str, tracker: str
) -> None:
    """Both ways Slurm stops a run and runs it again: ``scontrol requeue`` (SIGTERM, what preemption does) and the
    time limit with ``max_num_timeout>0`` (Slurm's ``--signal=USR2`` ahead of the limit; submitit's handler saves
    the job and requeues it, which SIGTERMs it). Either way the run resumes from its last epoch's checkpoint.
    """
    pytest.importorskip(tracker)
    epochs, uri = 4, f"sqlite:///{tmp_path / 'mlruns.db'}"
    run_args = ["norm=batch", f"trainer.epochs={epochs}", *data_args]
    tracking = [
        f"logger={tracker}",
        *([f"logger.tracking_uri={uri}", "logger.experiment=requeue"] if tracker == "mlflow" else []),
    ]
    # The job parks in epoch 3's first step (progress, not time): stopped there whatever the machine's speed.
    # Its second start trains 2 epochs only, so it never reaches that step again.
    shim = crash_injector.injector_dir(tmp_path)
    park = f"step:{2 * crash_injector.steps_per_epoch(300, data_args) + 1}:park"  # small_data_args: 10 x 30 images
    env = {**crash_injector.env(shim, park), "SLURM_CONF": slurm.env["SLURM_CONF"]}
    # Time limit: timeout_min=1 makes submitit count the signal as a timeout (its rule: after 80% of the limit);
    # submitted held, so that Slurm's limit can be raised before the job starts and lowered once it is parked.
    limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.max_num_timeout=1",
             "+hydra.launcher.additional_parameters.hold=true"] if stop == "time limit" else []  # fmt: skip
    sweep, log = tmp_path / "sweep", tmp_path / "sweep.log"
    first = submit(slurm, *run_args, *tracking, *limit, f"hydra.sweep.dir={sweep}", log=log, env=env)

    def alive():
        assert first.poll() is None, log.read_text()[-3000:] + slurm.logs()
        return True

    (job,) = wait_for(lambda: alive() and [j["id"] for j in slurm.queue()], 120, "the job in the queue")
    if stop == "time limit":
        slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")
        slurm.run("scontrol", "release", job)
    wait_for(lambda: alive() and list(shim.glob("parked.*")), 300, "the job parked in its third epoch", 0.1)
    if stop == "scontrol requeue":
        slurm.run("scontrol", "requeue", job)  # SIGTERM now, back in the queue
    else:  # the limit 60-120 s ahead: within its 120 s signal_delay_s, so Slurm sends USR2 at its next check
        (elapsed,) = slurm.run("squeue", "-h", "-j", job, "-o", "%M").stdout.split()
        slurm.run("scontrol", "update", f"JobId={job}", f"TimeLimit={_minutes(elapsed) + 2}")
    # Slurm holds a requeued job for about two minutes before it is eligible again; let it start now, with a
    # limit it will not reach (Slurm keeps the lowered one otherwise).
    wait_for(lambda: alive() and [j for j in slurm.queue() if j["state"] == "PENDING"], 180, "the requeued job pending")
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", "TimeLimit=30")
    first.wait(timeout=600)
    output = log.read_text()
    assert first.returncode == 0, f"exit {first.returncode}\n" + output[-3000:] + slurm.logs()
    job_dir = next(sweep.glob("*/results.json")).parent
    run_log = (job_dir / "normsweep.log").read_text()
    assert f"run interrupted after epoch 2 of {epochs}" in run_log, run_log[-3000:]
    assert f"resuming from checkpoint.pt after epoch 2 of {epochs}" in run_log, run_log[-3000:]
    assert json.loads((job_dir / "results.json").read_text())["status"] == "completed"
    if stop == "time limit":  # submitit's own account of it, in the job's log
        submitit_log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.err"))
        assert "this job is timed-out" in submitit_log, submitit_log[-3000:]

    # The same run, uninterrupted, on the thread count Slurm gave the job (cpus_per_task=1).
    reference = warm_python.run([sys.executable, "-m", "normsweep", *run_args, "trainer.threads=1",
                                f"hydra.run.dir={tmp_path / 'reference'}"], cwd=REPO, capture_output=True, text=True,
                               timeout=600)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    history = _history(job_dir)
    assert history == _history(tmp_path / "reference") and len(history) == epochs
    # The tracker: one run, each epoch logged once, the numbers of results.json.
    logged, recorded = _tracked_epochs(tracker, job_dir, uri), json.loads((job_dir / "results.json").read_text())
    for key in EPOCH_METRICS:  # TensorBoard stores float32
        expected = [(h["epoch"], float(np.float32(h[key])) if tracker == "tensorboard" else h[key])
                    for h in recorded["history"]]  # fmt: skip
        assert logged[key] == expected, (key, logged[key])


def search_on_slurm(tmp_path: Path, *args: str) -> list[str]:
    return ["search=optuna", "search.workers=2", f"search.storage=journal:{tmp_path / 'study.journal'}", *args,
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip


def test_two_search_workers_as_array_tasks_prune_inside_and_run_exactly_n_trials(
    slurm: PrivateSlurm, tmp_path: Path, data_args
) -> None:
    proc = submit(slurm, *search_on_slurm(tmp_path, "search.n_trials=6", "search.pruner=threshold",
                                          "search.prune_below=99", "trainer.epochs=3", *data_args))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + slurm.logs()
    trials = all_trials(f"journal:{tmp_path / 'study.journal'}")
    assert len(trials) == 6 and all(t.state == State.PRUNED and list(t.intermediate_values) == [1] for t in trials)
    assert len({t.user_attrs["slurm_job"] for t in trials}) == 2  # two array tasks served the study
    assert overlapping(trials), [(t.user_attrs["worker"], t.datetime_start, t.datetime_complete) for t in trials]
    assert set(pd.read_csv(tmp_path / "sweep" / "results.csv")["status"]) == {"pruned"}


def test_a_cancelled_and_a_killed_worker_s_trials_run_again_from_their_checkpoints_when_the_command_is_rerun(
    slurm: PrivateSlurm, tmp_path: Path, data_args
) -> None:
    spec = f"journal:{tmp_path / 'study.journal'}"
    args = search_on_slurm(tmp_path, "search.n_trials=3", "search.pruner=none", "search.heartbeat_interval=0.5",
                           "search.grace_period=8", "trainer.epochs=12", *data_args)  # fmt: skip
    first = submit(slurm, *args, log=tmp_path / "first.log")
    cancelled, killed = running_past_epoch_2(first, tmp_path / "first.log", spec, 2)
    # scancel: SIGTERM (SIGKILL only after KillWait), and the worker fails its trial itself.
    slurm.run("scancel", cancelled.user_attrs["slurm_job"])
    # A lost node says nothing at all: SIGKILL to the worker process; only the heartbeat rule can tell.
    os.kill(int(killed.user_attrs["worker"].split(":")[1]), signal.SIGKILL)
    first.wait(timeout=600)
    output = (tmp_path / "first.log").read_text()
    # With accounting, submitit sees both jobs end (without it, it would poll forever): the sweep says so.
    assert first.returncode != 0 and "search workers stopped before the search was done" in output, output[-3000:]
    wait_for(lambda: not slurm.queue(), 120, "both workers' jobs gone from the queue")
    trials = {t.number: t for t in all_trials(spec)}
    assert trials[cancelled.number].state == State.FAIL and not uses_slot(trials[cancelled.number])
    assert "worker stopped (RunInterrupted: stopped by signal SIGTERM)" in trials[cancelled.number].user_attrs["error"]
    assert trials[killed.number].state == State.RUNNING  # nobody told the study
    wait_for(
        lambda: time.time() - trials[killed.number].system_attrs[HEARTBEAT_ATTR] > 8,
        60,
        "the killed worker's trial stale",
    )

    again = submit(slurm, *args)  # the same command
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = {t.number: t for t in all_trials(spec)}
    assert trials[killed.number].state == State.FAIL and "presumed dead" in trials[killed.number].user_attrs["error"]
    counted = [t for t in trials.values() if uses_slot(t)]
    assert len(counted) == 3 and all(t.state == State.COMPLETE for t in counted), [
        (t.number, t.state) for t in trials.values()
    ]
    for stopped in (cancelled, killed):
        assert check_retried_from_checkpoint(trials, stopped, tmp_path / "sweep") in counted


def test_a_requeued_worker_frees_its_trial_comes_back_and_the_same_command_finishes_the_search(
    slurm: PrivateSlurm, tmp_path: Path, data_args
) -> None:
    spec = f"journal:{tmp_path / 'study.journal'}"
    args = search_on_slurm(tmp_path, "search.n_trials=3", "search.pruner=none", "trainer.epochs=4", *data_args)
    # Each worker holds in its first trial's third epoch (progress, not time) until the test releases them.
    shim = crash_injector.injector_dir(tmp_path)
    hold = f"step:{2 * crash_injector.steps_per_epoch(300, data_args) + 1}:hold"  # small_data_args: 10 x 30 images
    env = {**crash_injector.env(shim, hold), "SLURM_CONF": slurm.env["SLURM_CONF"]}
    log = tmp_path / "first.log"
    first = submit(slurm, *args, log=log, env=env)

    def alive():
        assert first.poll() is None, log.read_text()[-3000:] + slurm.logs()
        return True

    wait_for(
        lambda: alive() and len(list(shim.glob("parked.*"))) == 2, 300, "both workers held in their third epoch", 0.1
    )
    running = [t for t in all_trials(spec) if t.state == State.RUNNING]
    assert len(running) == 2 and all(len(t.intermediate_values) == 2 for t in running), running
    requeued = running[0]
    job = requeued.user_attrs["slurm_job"]
    slurm.run("scontrol", "requeue", job)  # SIGTERM to that worker: a preemption
    wait_for(lambda: alive() and [t for t in all_trials(spec) if t.number == requeued.number and t.state == State.FAIL],
             120, "the requeued worker's trial failed and its slot freed")  # fmt: skip
    crash_injector.release(shim)  # the other worker goes on; the requeued one comes back (it would not hold again)
    wait_for(
        lambda: alive() and [j for j in slurm.queue() if j["state"] == "PENDING"], 180, "the requeued worker pending"
    )
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    first.wait(timeout=600)
    output = log.read_text()
    assert first.returncode == 0, f"exit {first.returncode}\n" + output[-3000:] + slurm.logs()  # no second command

    trials = {t.number: t for t in all_trials(spec)}
    assert "worker stopped (RunInterrupted: stopped by signal SIGTERM)" in trials[requeued.number].user_attrs["error"]
    counted = [t for t in trials.values() if uses_slot(t)]
    assert len(counted) == 3 and all(t.state == State.COMPLETE for t in counted), [
        (t.number, t.state) for t in trials.values()
    ]
    check_retried_from_checkpoint(trials, requeued, tmp_path / "sweep")
    states = slurm.run("sacct", "-n", "-X", "-D", "-P", "-o", "JobID,State", "-j", job).stdout.split()
    assert f"{job}|REQUEUED" in states and f"{job}|COMPLETED" in states, states  # it ran again and ended cleanly
