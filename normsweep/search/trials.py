"""A search's trials: the search space (Hydra sweep syntax to Optuna distributions), study names, the
pruner, and the trial slots of a shared study (:func:`take_trial` under the cross-worker lock,
heartbeats, :func:`fail_stale_trials`, :func:`free_slot`: a stopped trial's parameters retried in its
job directory). The search as a whole, and where each step lives, is told in :mod:`normsweep.search`.

* The search space is ``search.params`` (``interval(0.0, 0.2)``, ``tag(log, interval(1e-3, 1.0))``,
  ``choice(...)``, ``range(...)``); a command-line override whose value is an ``interval(...)`` adds or
  replaces a dimension. Every other sweep on the command line is a grid: one study per combination.
* The objective is the final validation accuracy; a study's name is derived from its fixed overrides,
  so the same command resumes it, ``search.n_trials`` being the study's total.
* A trial that raises is FAIL with its error; the search goes on until more than
  ``search.max_failure_rate`` of its finished trials have failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import threading
import time
from typing import Any, Optional

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig, OmegaConf

from normsweep.base.registry import choice
from normsweep.config import NormsweepError, SearchConfig, is_result_neutral
from normsweep.search.internals import study_storage, trial_id
from normsweep.search.pruners import PRUNERS
from normsweep.search.storage import trial_slot_lock

log = logging.getLogger(__name__)


class SearchError(NormsweepError, ValueError):
    pass


# ------------------------------------------------------------------ search space


def to_distribution(key: str, value: Any) -> optuna.distributions.BaseDistribution:
    """An Optuna distribution from a Hydra sweep (``interval``, ``tag(log, interval)``, ``choice``, ``range``)."""
    sweep = value
    if isinstance(value, str):
        sweep = OverridesParser.create().parse_override(f"{key}={value}").value()
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):  # int(interval(a, b)), log or not
            return optuna.distributions.IntDistribution(sweep.start, sweep.end, log=log_scale)
        return optuna.distributions.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    if isinstance(sweep, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(list(sweep.list))
    if isinstance(sweep, RangeSweep):
        step = sweep.step or 1
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, step)):
            return optuna.distributions.IntDistribution(sweep.start, sweep.stop - 1, step=step)
        # As for integers (and Hydra's own expansion of the sweep), the stop is exclusive: the
        # highest value is the last start + k * step below it.
        k = math.ceil((sweep.stop - sweep.start) / step - 1e-9) - 1
        if k < 0:
            raise SearchError(f"search.params.{key}={value!r} is an empty range; its stop must be above its start")
        high = round(sweep.start + k * step, 12)
        return optuna.distributions.FloatDistribution(float(sweep.start), high, step=float(step))
    raise SearchError(
        f"search.params.{key}={value!r} is not a search dimension; write interval(a, b), "
        f"tag(log, interval(a, b)), choice(a, b, ...) or range(a, b)"
    )


SEARCH_TAG = "search"  # `KEY=tag(search, choice(2, 4))` on the command line: a dimension, not a grid axis


def split_overrides(overrides: list[Override]) -> tuple[dict, list[list[str]], list[str]]:
    """(search dimensions from the command line, grid of other sweeps, fixed overrides).

    An ``interval(...)`` is always a dimension; a ``choice``/``range`` is a grid axis unless it is
    tagged ``search`` (``norm.groups=tag(search, choice(2, 4))``).
    """
    dims: dict[str, Any] = {}
    grid: list[list[str]] = []
    fixed: list[str] = []
    for o in overrides:
        key = o.get_key_element()
        if o.is_sweep_override() and (isinstance(o.value(), IntervalSweep) or SEARCH_TAG in o.value().tags):
            dims[key] = o.value()
        elif o.is_sweep_override():
            grid.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(f"{key}={o.get_value_element_as_str()}")
    return dims, grid, fixed


def study_name_for(config: DictConfig, grid_point: tuple[str, ...], fixed: list[str]) -> str:
    """``normsweep-<norm>-<hash of the other overrides>``: the same command maps to the same study."""
    norm = next((o.split("=", 1)[1] for o in grid_point + tuple(fixed) if o.startswith("norm=")),
                OmegaConf.select(config, "norm.kind", default="norm"))  # fmt: skip
    norm = choice(norm)
    identity = sorted(
        o for o in (*grid_point, *fixed) if not o.startswith(("search.", "hydra.")) and not is_result_neutral(o)
    )
    digest = hashlib.sha1("\n".join(identity).encode()).hexdigest()[:8]
    return f"normsweep-{norm}-{digest}"


def make_pruner(cfg: SearchConfig) -> optuna.pruners.BasePruner:
    """The pruner ``search.pruner`` names (:data:`~normsweep.search.pruners.PRUNERS`)."""
    return PRUNERS.entry(cfg.pruner)(cfg)


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
# Trials that use a slot. An enqueued (WAITING) trial takes its slot when a worker asks for it.
TAKEN = FINISHED + (optuna.trial.TrialState.RUNNING,)
HEARTBEAT_ATTR = "normsweep:heartbeat"  # system attr: time.time() of the trial's last heartbeat
# System attr on a trial failed through no fault of its parameters (its worker died or was stopped): it frees its slot.
STALE_ATTR = "normsweep:stale"
JOB_SUBDIR_ATTR = "job_subdir"  # user attr: the trial's job directory under the sweep dir (a retry reuses it)
JOB_DIR_ATTR = "job_dir"  # user attr: the trial's job directory, absolute (set when its job starts)
# User attr of a retry: the job directories of the trial's earlier attempts, newest first; it resumes from the
# newest checkpoint among them when it runs in another directory (worker.carry_checkpoint).
EARLIER_JOB_DIRS_ATTR = "earlier_job_dirs"


def job_subdir(study: optuna.Study, t: optuna.trial.FrozenTrial | optuna.Trial) -> str:
    """A trial's job directory under the sweep dir: ``<study>/trial_<number>``, or the one its first attempt
    used (a retry runs there, resuming that attempt's checkpoint)."""
    return t.user_attrs.get(JOB_SUBDIR_ATTR) or f"{study.study_name}/trial_{t.number}"


def uses_slot(t: optuna.trial.FrozenTrial) -> bool:
    """Whether ``t`` counts toward ``search.n_trials`` (a trial of a dead or stopped worker does not)."""
    return t.state in TAKEN and not t.system_attrs.get(STALE_ATTR)


def free_slot(study: optuna.Study, t: optuna.trial.FrozenTrial, reason: str) -> None:
    """Fail the RUNNING trial ``t`` through no fault of its parameters, free its slot, and retry them.

    The reason goes into its ``error`` attribute; the trial stops counting toward
    ``search.n_trials`` (:func:`uses_slot`: the mark is set before the state changes, so no
    worker counting meanwhile sees it hold a slot it has lost); its parameters are enqueued, and
    the worker that asks for them next runs them in the same job directory, so the job resumes
    from the checkpoint of its last finished epoch (a worker of a command with another
    ``hydra.sweep.dir`` copies the newest checkpoint of the trial's attempts:
    ``worker.carry_checkpoint``). Callers hold the study's slot lock.
    """
    storage, tid = study_storage(study), trial_id(t)
    storage.set_trial_user_attr(tid, "error", reason)
    storage.set_trial_system_attr(tid, STALE_ATTR, True)
    storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL)
    subdir = job_subdir(study, t)
    attrs = {"retry_of": t.number, JOB_SUBDIR_ATTR: subdir}
    earlier = [t.user_attrs[JOB_DIR_ATTR]] if t.user_attrs.get(JOB_DIR_ATTR) else []
    earlier += [d for d in t.user_attrs.get(EARLIER_JOB_DIRS_ATTR, []) if d not in earlier]
    if earlier:
        attrs[EARLIER_JOB_DIRS_ATTR] = earlier
    study.enqueue_trial(dict(t.params), user_attrs=attrs)
    log.warning("study %s: trial %d failed: %s", study.study_name, t.number, reason)


def fail_stale_trials(study: optuna.Study, grace_period: float, now: Optional[float] = None) -> list[int]:
    """Mark FAIL every RUNNING trial whose last heartbeat is older than ``grace_period`` seconds.

    Its worker is taken to be dead (SIGKILL, a lost node): :func:`free_slot` fails it with the
    reason, frees its slot and retries its parameters. A trial that has never beaten is judged by
    its start time. Returns the numbers of the trials failed. Optuna's
    own ``fail_stale_trials`` works only for RDB storages inside ``study.optimize``; this works for
    every storage normsweep supports, through the storage's trial attributes.
    """
    now = time.time() if now is None else now
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        last = t.system_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - last <= grace_period:
            continue
        free_slot(study, t, f"no heartbeat for {now - last:.0f}s (> search.grace_period={grace_period:g}s): "
                            f"worker {t.user_attrs.get('worker', '?')} presumed dead; its slot is reused")  # fmt: skip
        failed.append(t.number)
    return failed


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial, interval: Optional[float]):
    """While the block runs, record ``trial``'s heartbeat every ``interval`` seconds (a daemon thread)."""
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                study_storage(study).set_trial_system_attr(trial_id(trial), HEARTBEAT_ATTR, time.time())
            except Exception as e:  # the trial was failed as stale, or the storage is unreachable for now
                log.warning("trial %d: heartbeat not recorded: %s", trial.number, e)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------ trial slots


def take_trial(study: optuna.Study, spec: str, cfg: SearchConfig, dims: dict) -> Optional[optuna.Trial]:
    """A new trial, or None when the study has its ``n_trials`` (counting other workers' running ones).

    Counting and asking happen under one lock shared by every worker of this study, so the
    workers together stop at exactly ``n_trials``. The sampler is seeded with ``search.seed``
    plus the number of trials already in the study: a new search proposes the same first trials
    every time, a resumed one continues rather than re-drawing them, and two workers never draw
    from the same seed.
    """
    with trial_slot_lock(spec, study.study_name):
        if cfg.heartbeat_interval:
            fail_stale_trials(study, cfg.grace_period)
        trials = study.get_trials(deepcopy=False)
        taken = [t for t in trials if uses_slot(t)]
        finished = [t for t in taken if t.state in FINISHED]
        failed = sum(t.state == optuna.trial.TrialState.FAIL for t in finished)
        if len(taken) >= cfg.n_trials:
            return None
        if failed and len(finished) >= 2 and failed / len(finished) > cfg.max_failure_rate:
            log.error("study %s: %d of %d trials failed (> search.max_failure_rate=%s); stopping it",
                      study.study_name, failed, len(finished), cfg.max_failure_rate)  # fmt: skip
            return None
        study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(trials))
        trial = study.ask(dims)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if os.environ.get("SLURM_JOB_ID"):  # the job to scancel, as squeue shows it (ARRAY_TASK for an array task)
            array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
            trial.set_user_attr("slurm_job", "_".join(array) if all(array) else os.environ["SLURM_JOB_ID"])
        return trial


def enqueue_current(study: optuna.Study, spec: str, current: dict[str, Any]) -> bool:
    """Make ``current`` (the settings the command would run without a search) the study's trial 0.

    Only a new study gets it, under the slot lock, so concurrent workers enqueue it once; the
    study's best is then never below the current recipe on validation accuracy.
    """
    with trial_slot_lock(spec, study.study_name):
        if study.get_trials(deepcopy=False):
            return False
        study.enqueue_trial(current, user_attrs={"enqueued": "current settings (search.enqueue_current)"})
    log.info("study %s: trial 0 is the current settings %s", study.study_name, current)
    return True


def current_values(config: DictConfig, dims: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
    """Each dimension's value in ``config`` (a composed job config), where the distribution can hold it."""
    values = {}
    for key, dist in dims.items():
        value = OmegaConf.select(config, key, default=None)
        value = choice(value)  # an Enum member: its value
        if isinstance(dist, optuna.distributions.CategoricalDistribution) and value not in dist.choices:
            log.warning("search.enqueue_current: %s=%r is not one of %s; trial 0 samples it", key, value, dist.choices)
            continue
        if value is not None:
            values[key] = int(value) if isinstance(dist, optuna.distributions.IntDistribution) else value
    return values


def search_config(config: DictConfig) -> SearchConfig:
    """The typed ``search`` node of a sweep's config (the sweeper and every worker read it from there)."""
    node = OmegaConf.select(config, "search")
    if node is None:
        raise SearchError("hydra/sweeper=normsweep_optuna needs the search config: pass search=optuna")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SearchConfig), node))  # type: ignore[return-value]
