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

import optuna
import pandas as pd
import pytest

from normsweep.search import HEARTBEAT_ATTR, uses_slot

from . import warm_python
from .conftest import REPO, small_data_args
from .slurm_cluster import INSTALL_HINT, PARTITION, PrivateSlurm, missing_binaries, wait_for
from .test_search_workers import all_trials, check_retried_from_checkpoint, overlapping, running_past_epoch_2

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
        pytest.skip("the private Slurm runs its daemons as root (SlurmUser=root, MariaDB as the mysql user): run as root, as CI does")
    cluster = PrivateSlurm().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory), "trainer.progress=false"]


def submit(cluster: PrivateSlurm, *args: str, log: Path | None = None):
    """``python -m normsweep -m ON_SLURM ARGS`` against ``cluster``: finished, or running with its output in ``log``."""
    cmd = [sys.executable, "-m", "normsweep", "-m", *ON_SLURM, *args]
    # Started cold (subprocess itself): this file is one xdist group whose few starts a warm start would
    # hardly shorten, and the cluster's environment would need a warm-start server of its own.
    if log is None:
        return subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=log.open("w"), stderr=subprocess.STDOUT)


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
    return [{k: v for k, v in e.items() if k != "seconds"} for e in json.loads((job_dir / "results.json").read_text())["history"]]


def test_a_requeued_run_resumes_from_its_checkpoint_to_the_numbers_of_an_uninterrupted_run(
    slurm: PrivateSlurm, tmp_path: Path, data_args
) -> None:
    run_args = ["norm=batch", "trainer.epochs=8", *data_args]
    first = submit(slurm, *run_args, f"hydra.sweep.dir={tmp_path / 'sweep'}", log=tmp_path / "sweep.log")

    def mid_training():
        assert first.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        found = list((tmp_path / "sweep").glob("*/results.json"))
        res = json.loads(found[0].read_text()) if found else {}
        return found[0].parent if 2 <= (res.get("epochs_completed") or 0) < 8 else None

    job_dir = wait_for(mid_training, 300, "the run's second epoch", 0.1)
    ((job,),) = [[j["id"] for j in slurm.queue()]]
    slurm.run("scontrol", "requeue", job)  # SIGTERM now, back in the queue
    # Slurm holds a requeued job for about two minutes before it is eligible again; let it start now.
    wait_for(lambda: [j for j in slurm.queue() if j["state"] == "PENDING"], 120, "the requeued job pending")
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    first.wait(timeout=600)
    output = (tmp_path / "sweep.log").read_text()
    assert first.returncode == 0, f"exit {first.returncode}\n" + output[-3000:] + slurm.logs()
    log = (job_dir / "normsweep.log").read_text()
    stopped = re.search(r"run interrupted after epoch (\d+) of 8", log)
    assert stopped and f"resuming from checkpoint.pt after epoch {stopped[1]} of 8" in log, log[-3000:]
    assert json.loads((job_dir / "results.json").read_text())["status"] == "completed"

    # The same run, uninterrupted, on the thread count Slurm gave the job (cpus_per_task=1).
    reference = warm_python.run([sys.executable, "-m", "normsweep", *run_args, "trainer.threads=1",
                                f"hydra.run.dir={tmp_path / 'reference'}"], cwd=REPO, capture_output=True, text=True,
                               timeout=600)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert _history(job_dir) == _history(tmp_path / "reference") and len(_history(job_dir)) == 8


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
    wait_for(lambda: time.time() - trials[killed.number].system_attrs[HEARTBEAT_ATTR] > 8, 60, "the killed worker's trial stale")

    again = submit(slurm, *args)  # the same command
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = {t.number: t for t in all_trials(spec)}
    assert trials[killed.number].state == State.FAIL and "presumed dead" in trials[killed.number].user_attrs["error"]
    counted = [t for t in trials.values() if uses_slot(t)]
    assert len(counted) == 3 and all(t.state == State.COMPLETE for t in counted), [(t.number, t.state) for t in trials.values()]
    for stopped in (cancelled, killed):
        assert check_retried_from_checkpoint(trials, stopped, tmp_path / "sweep") in counted
