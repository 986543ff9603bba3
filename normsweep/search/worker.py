"""A search worker (:class:`SearchWorker`, the task function a launcher runs): Optuna's loop, run by the
worker itself against the storage all workers share. The search as a whole is told once, in
:mod:`normsweep.search`; this module holds step 2 of it, a worker's loop:

1. take a trial slot (:func:`normsweep.search.trials.take_trial`);
2. run the trial's job in its own process, as Hydra's basic launcher would (``run_job``, job
   directory :func:`~normsweep.search.trials.job_subdir`), reporting each epoch to the pruner while a
   thread records heartbeats;
3. tell the study the outcome and take the next slot at once: no worker waits for another.

With a grid (``norm=batch,group,layer``) every worker serves every study, round robin, each worker
starting at its own study, so no worker idles while any study has a free slot and each study's trials
are spread out in time (TPE proposes each with as many finished trials as the parallelism allows). A
command re-run with another ``hydra.sweep.dir`` resumes a retried trial from a copy of the newest
checkpoint of its attempts (:func:`carry_checkpoint`).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import shutil
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus, configure_log, run_job
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from normsweep.base.credentials import recorded_config
from normsweep.base.errors import one_line
from normsweep.base.results import RESULTS_FILE, TRAINING_STATE_FILE, RunRecord, atomic_write
from normsweep.base.signals import sigterm_interrupts, stop_reason, stopping_uninterrupted
from normsweep.config import SearchConfig, register_configs
from normsweep.run import trial_hook
from normsweep.run.resume import config_differences
from normsweep.search.internals import job_error, study_storage, trial_id
from normsweep.search.storage import open_storage, resolve_storage, storage_file, trial_slot_lock
from normsweep.search.studies import fmt_value, study_summary
from normsweep.search.trials import (
    EARLIER_JOB_DIRS_ATTR,
    JOB_DIR_ATTR,
    JOB_SUBDIR_ATTR,
    SearchError,
    free_slot,
    heartbeat,
    job_subdir,
    search_config,
    take_trial,
    uses_slot,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyPlan:
    """One study of a search and the overrides of its trials' jobs (the command's fixed ones and its grid point)."""

    name: str
    overrides: tuple[str, ...]


def trial_hook_for(trial: optuna.Trial) -> trial_hook.TrialHook:
    """The hook a job reports its epochs to: Optuna's pruner decides, ``RunPruned`` stops the job."""

    def report(epoch: int, val_acc: float, last: bool) -> None:
        trial.report(val_acc, epoch)
        if not last and trial.should_prune():  # after the last epoch the trial is complete, whatever the pruner says
            raise trial_hook.RunPruned(f"pruned after epoch {epoch} (validation accuracy {val_acc:.2f}%)")

    return trial_hook.TrialHook(trial.number, report)


def open_shared_storage(spec: str, sweeper_host: str):
    """The storage as this worker sees it; a storage file the sweeper made but this machine lacks is a clear error.

    The sweeper creates the file (journal or SQLite) before it starts the workers, so a worker that
    does not find it runs on a machine that does not share that filesystem; opening it anyway would
    start a separate, empty study there.
    """
    path = storage_file(spec)
    if path is not None and not path.exists():
        raise SearchError(
            f"search.storage={spec}: {path} does not exist on {socket.gethostname()}, where this search worker runs "
            f"(the sweeper created it on {sweeper_host}). Every worker must reach the storage: put the journal file on "
            f"a filesystem all nodes share (search.storage=journal:/shared/path/search.journal), or use a database "
            f"server (search.storage=postgresql+psycopg://user@host:5432/db)"
        )
    return open_storage(spec)


def load_studies(storage, spec: str, plans: list[StudyPlan], pruner: optuna.pruners.BasePruner) -> list[optuna.Study]:
    """The studies the sweeper created; one missing means this worker sees another storage than the sweeper."""
    studies = []
    for plan in plans:
        try:
            studies.append(optuna.load_study(study_name=plan.name, storage=storage, pruner=pruner))
        except KeyError:  # a file at the same path, but not the sweeper's (a node-local disk)
            where = f"={spec}" if storage_file(spec) else " (its URL is in your config)"  # never print a server's URL
            raise SearchError(
                f"search.storage{where} has no study {plan.name} on {socket.gethostname()}, where this search worker "
                f"runs, though the sweeper created it: this machine sees another storage than the sweeper. Put the "
                f"journal file on a filesystem all nodes share, or use a database server all nodes reach"
            ) from None
    return studies


def carry_checkpoint(earlier: list[str], job_dir: Path, trial_number: int, config: Optional[dict]) -> None:
    """Give a retried trial the checkpoint of an earlier attempt that ran in another directory.

    A worker of a command re-run with another ``hydra.sweep.dir`` runs the retry of a stopped
    trial in its own sweep dir; the job there resumes from copies of the newest checkpoint among
    ``earlier`` (the attempts' job directories, newest first) and its ``results.json``, so no
    finished epoch is trained again. The earlier directories are left as they were. Nothing is
    copied into a ``job_dir`` that holds a run already (its own resume decides), or from an attempt
    of another ``config`` (the job's run config, as ``results.json`` records it; None: not compared).
    """
    if (job_dir / TRAINING_STATE_FILE).exists() or (job_dir / RESULTS_FILE).exists():
        return
    for source in map(Path, earlier):
        if source.resolve() == job_dir.resolve():
            continue
        if not source.is_dir():
            log.info(
                "trial %d: the job directory of its earlier attempt, %s, is not visible here", trial_number, source
            )
            continue
        record = _readable_record(source)
        if not (source / TRAINING_STATE_FILE).is_file():
            done = record is not None and record.status == "completed"
            log.info("trial %d: its earlier attempt in %s %s", trial_number, source,
                     "completed, but its worker stopped before telling the study: it trains again" if done
                     else "left no checkpoint")  # fmt: skip
            continue
        differ = config_differences(record.config, config) if record is not None and config is not None else []
        if differ:
            log.info("trial %d: its earlier attempt's checkpoint in %s is of another config (differs in %s): it "
                     "trains from epoch 1", trial_number, source, ", ".join(differ))  # fmt: skip
            return
        for name in (RESULTS_FILE, TRAINING_STATE_FILE):  # the checkpoint last: it is what makes the job resume
            if (source / name).is_file():
                atomic_write(job_dir / name, functools.partial(shutil.copyfile, source / name))
        log.info("trial %d resumes from its earlier attempt's checkpoint, copied from %s", trial_number, source)
        return


def run_config(config: DictConfig) -> Optional[dict]:
    """The config a trial's job records (``results.json``'s ``config``), from its composed Hydra config; None if it
    cannot be resolved here."""
    job = copy.deepcopy(config)
    with open_dict(job):
        del job["hydra"]
    try:
        return recorded_config(job)
    except Exception as e:  # noqa: BLE001 - only a comparison is lost: the job itself will say what is wrong
        log.info("cannot resolve the trial's config outside its job (%s): its earlier checkpoint is not compared", e)
        return None


def _readable_record(job_dir: Path) -> Optional[RunRecord]:
    try:
        return RunRecord.read(job_dir) if (job_dir / RESULTS_FILE).is_file() else None
    except ValueError:
        return None


def tell_from_job(study: optuna.Study, trial: optuna.Trial, job_dir: Optional[Path]) -> optuna.trial.TrialState:
    """Tell the study how the trial's job went, from the ``results.json`` it wrote."""
    state, value, error = optuna.trial.TrialState.FAIL, None, "no results.json"
    res: Optional[RunRecord] = None
    if job_dir and (job_dir / RESULTS_FILE).exists():
        res = RunRecord.read(job_dir)
        error = res.error
        earlier = res.trial is not None and res.trial != trial.number and res.status != "completed"
        if res.status == "running" or earlier:  # the job stopped before it recorded anything of its own
            found = f"trial {res.trial}'s record, {res.status}" if earlier else "results.json says running"
            error = f"the job stopped before recording its run ({found}); {job_dir / 'normsweep.log'} says why"
        if res.status == "completed" and res.final_val_acc is not None:
            state, value = optuna.trial.TrialState.COMPLETE, float(res.final_val_acc)
        elif res.status == "pruned":
            state = optuna.trial.TrialState.PRUNED
    if job_dir:
        trial.set_user_attr(JOB_DIR_ATTR, str(job_dir))
    trial.set_user_attr("epochs_completed", res.epochs_completed if res else None)
    if res and res.final_test_acc is not None:
        trial.set_user_attr("final_test_acc", res.final_test_acc)
    if state == optuna.trial.TrialState.FAIL:
        trial.set_user_attr("error", (error or "unknown error").splitlines()[0])
        log.warning("trial %d failed: %s", trial.number, error)
    study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return state


def progress(study: optuna.Study, number: int, n_trials: int, seconds: float) -> str:
    """One line on trial ``number``'s outcome and where its study stands, for the worker's log.

    The counts are ``studies.study_summary``'s (every trial in each state); the trials of stopped or
    dead workers, which gave their slots back (:func:`normsweep.search.trials.uses_slot`), are said apart.
    """
    t = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    outcome = {"fail": "failed"}.get(t.state.name.lower(), t.state.name.lower())
    if t.state == optuna.trial.TrialState.COMPLETE:
        outcome += f", validation {t.value:.2f}%"
    elif t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values:
        last = max(t.intermediate_values)
        outcome += f" after epoch {last} ({t.intermediate_values[last]:.2f}%)"
    elif t.state == optuna.trial.TrialState.FAIL:
        outcome += f" ({t.user_attrs.get('error', 'no reason recorded')})"
    summary = study_summary(study)
    count = summary["trials"]
    retried = sum(not uses_slot(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
    finished = count["COMPLETE"] + count["PRUNED"] + count["FAIL"] - retried
    best = (f"best {summary['best_val_acc']:.2f}% (trial {summary['best_trial']})" if "best_trial" in summary
            else "no trial complete yet")  # fmt: skip
    return (
        f"study {study.study_name}: trial {number} {outcome} in {seconds:.0f} s; {finished} of {n_trials} "
        f"finished ({count['COMPLETE']} complete, {count['PRUNED']} pruned, {count['FAIL'] - retried} failed"
        f"{f', {retried} more stopped and retried' if retried else ''}), {best}"
    )


class SearchWorker:
    """What a worker job runs: a picklable task function the sweeper hands to the launcher.

    It holds what a launcher holds (Hydra's context, the training task function, the sweep's
    config), so each trial's job is composed and run exactly as a launched job would be. The
    ``search`` settings and the storage are read from that config where the worker runs, so a
    password given as ``${oc.env:VAR}`` is resolved there and never pickled with the job.
    """

    def __init__(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig, dims: dict,
                 pruner: optuna.pruners.BasePruner, plans: list[StudyPlan]) -> None:  # fmt: skip
        self.hydra_context = hydra_context
        self.task_function = task_function  # the training job, run once per trial
        self.config = config  # the sweep's config: each trial's job config is composed from it
        self.dims, self.pruner, self.plans = dims, pruner, plans
        self.launch_dir = str(config.hydra.runtime.cwd)  # trials resolve relative paths from here, as launched jobs do
        self.sweeper_host = socket.gethostname()

    def __call__(self, job_cfg: DictConfig) -> dict[str, Any]:
        """The worker job: serve the studies until none has a free slot."""
        return self.serve(int(HydraConfig.get().job.num))

    def serve(self, index: int) -> dict[str, Any]:
        started = time.time()
        register_configs()  # in a fresh worker process too: the launcher presets' warning filter
        cfg = search_config(self.config)
        spec = resolve_storage(cfg.storage, Path(self.launch_dir))
        storage = open_shared_storage(spec, self.sweeper_host)
        studies = load_studies(storage, spec, self.plans, self.pruner)
        pairs = list(zip(self.plans, studies))
        queue = deque(pairs[index % len(pairs):] + pairs[: index % len(pairs)])  # fmt: skip
        # The worker's own log, restored after each trial's job has configured its own.
        worker_logging = HydraConfig.get() if HydraConfig.initialized() else None
        ran: list[int] = []
        busy = 0.0
        log.info("search worker %d (%s:%d) serving %d studies from %s", index, socket.gethostname(), os.getpid(),
                 len(pairs), queue[0][0].name)  # fmt: skip
        with sigterm_interrupts():
            while queue:
                plan, study = queue.popleft()
                trial = take_trial(study, spec, cfg, self.dims)
                if trial is None:  # this study has its trials (or failed too often): serve the others
                    continue
                queue.append((plan, study))
                retry = trial.user_attrs.get("retry_of")
                log.info("study %s: trial %d starts (worker %d%s): %s", study.study_name, trial.number, index,
                         f", retrying trial {retry}" if retry is not None else "",
                         ", ".join(f"{k}={fmt_value(v)}" for k, v in trial.params.items()))  # fmt: skip
                t0 = time.time()
                try:
                    self.run_trial(study, trial, plan, cfg, spec)
                finally:
                    busy += time.time() - t0
                    if worker_logging is not None:
                        configure_log(worker_logging.job_logging, worker_logging.verbose)
                log.info("%s", progress(study, trial.number, cfg.n_trials, time.time() - t0))
                ran.append(trial.number)
        total = time.time() - started
        log.info("search worker %d: %d trials in %.0f s, %.1f s of it outside trial jobs", index, len(ran), total,
                 total - busy)  # fmt: skip
        return {"worker": index, "trials": len(ran), "seconds": total, "seconds_outside_trials": total - busy}

    def run_trial(
        self, study: optuna.Study, trial: optuna.Trial, plan: StudyPlan, cfg: SearchConfig, spec: str
    ) -> None:
        """Run ``trial``'s job with pruning and heartbeats, and tell the study its outcome."""
        subdir = job_subdir(study, trial)
        trial.set_user_attr(JOB_SUBDIR_ATTR, subdir)
        overrides = [*plan.overrides, *(f"{k}={v}" for k, v in trial.params.items()), f"hydra.sweep.subdir={subdir}"]
        trial_hook.ACTIVE = trial_hook_for(trial)
        cwd = os.getcwd()
        try:
            with heartbeat(study, trial, cfg.heartbeat_interval):
                os.chdir(self.launch_dir)
                config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
                with open_dict(config):
                    config.hydra.job.id = config.hydra.job.num = trial.number
                job_dir = Path(self.launch_dir, config.hydra.sweep.dir, subdir).absolute()
                trial.set_user_attr(JOB_DIR_ATTR, str(job_dir))  # where a retry finds its checkpoint
                if trial.user_attrs.get(EARLIER_JOB_DIRS_ATTR):
                    carry_checkpoint(trial.user_attrs[EARLIER_JOB_DIRS_ATTR], job_dir, trial.number, run_config(config))
                ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                              job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")  # fmt: skip
        except Exception as e:  # the job could not be composed or started: this trial's own failure
            trial.set_user_attr("error", one_line(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d failed before its job ran: %s", trial.number, e)
            return
        except BaseException as e:  # Ctrl-C, SIGTERM, SystemExit: the worker stops; the trial is not to blame
            with stopping_uninterrupted(), trial_slot_lock(spec, study.study_name):
                frozen = study_storage(study).get_trial(trial_id(trial))
                if frozen.state == optuna.trial.TrialState.RUNNING:
                    free_slot(study, frozen, f"worker stopped ({stop_reason(e)}) during the trial; "
                                             f"its slot is free and its parameters run again")  # fmt: skip
            raise
        finally:
            trial_hook.ACTIVE = None
            os.chdir(cwd)
        if ret.status == JobStatus.FAILED:  # the task function raised (run() has recorded why in results.json)
            log.warning("trial %d: job raised %r", trial.number, job_error(ret))
        tell_from_job(study, trial, Path(self.launch_dir, ret.working_dir) if ret.working_dir else None)
