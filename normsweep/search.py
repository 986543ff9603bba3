"""Hyper-parameter search: normsweep's own Hydra sweeper on current Optuna.

``python -m normsweep -m search=optuna [norm=batch,group,layer] [search.n_trials=30] ...``

* The search space is ``search.params`` (Hydra sweep syntax: ``interval(0.0, 0.2)``,
  ``tag(log, interval(1e-3, 1.0))``, ``choice(...)``, ``range(...)``); a command-line override
  whose value is an ``interval(...)`` adds or replaces a dimension.
* Every other sweep on the command line (``norm=batch,group,layer``) is a grid: one Optuna study
  per combination, so each normalization gets its own tuned settings.
* The objective is the final validation accuracy (the split carved from the training set).
* Storage is any SQLAlchemy URL, or ``journal:PATH`` for Optuna's journal file (see
  ``normsweep/storage.py``); the default is an SQLite file at a stable path, and a study's name
  is derived from its fixed overrides, so running the same command again resumes:
  ``search.n_trials`` is the total number of trials of the study.
* Several workers (processes or machines) running the same command on one shared storage split
  the trials: each takes a slot under a lock, so together they run exactly ``n_trials``. Trial
  jobs go to ``<sweep dir>/<study>/trial_<number>``; workers that share ``hydra.sweep.dir`` write
  one table.
* Each job reports validation accuracy per epoch; the pruner stops bad trials (state PRUNED, with
  the epoch reached). A trial that raises is recorded as FAIL with its error, and the search goes
  on until more than ``search.max_failure_rate`` of its finished trials have failed.
* At the end: ``optimization_results.yaml`` / ``.md`` (best parameters, best validation accuracy
  and that trial's test accuracy per study) and Optuna's plots in ``optuna/<study>/``.

Pruning needs the job to run in this process (Hydra's basic launcher); with other launchers
trials run to the end. A worker stopped by Ctrl-C or SIGTERM marks its running trial FAIL; one
killed outright stops its heartbeats (:func:`heartbeat`), and the next worker to take a slot marks
its trial FAIL after ``search.grace_period`` (:func:`fail_stale_trials`), freeing the slot.
"""

from __future__ import annotations

import hashlib
import contextlib
import itertools
import math
import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from . import trial_hook
from .config import NormsweepError, SearchConfig, is_result_neutral
from .results import RESULTS_FILE, RunRecord, write_text
from .storage import open_storage, resolve_storage, trial_slot_lock

log = logging.getLogger(__name__)

class SearchError(NormsweepError, ValueError):
    pass


def _trial_hook(trial: optuna.Trial) -> trial_hook.TrialHook:
    """The hook a job reports its epochs to: Optuna's pruner decides, ``RunPruned`` stops the job."""

    def report(epoch: int, val_acc: float) -> None:
        trial.report(val_acc, epoch)
        if trial.should_prune():
            raise trial_hook.RunPruned(f"pruned after epoch {epoch} (validation accuracy {val_acc:.2f}%)")

    return trial_hook.TrialHook(trial.number, report)


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
    norm = getattr(norm, "value", norm)
    identity = sorted(
        o for o in (*grid_point, *fixed) if not o.startswith(("search.", "hydra.")) and not is_result_neutral(o)
    )
    digest = hashlib.sha1("\n".join(identity).encode()).hexdigest()[:8]
    return f"normsweep-{norm}-{digest}"


def make_pruner(cfg: SearchConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=cfg.prune_below)
    if cfg.pruner == "hyperband":  # brackets of successive halving; max resource = the epochs of a trial
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.min_resource)


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
# Trials that use a slot. An enqueued (WAITING) trial takes its slot when a worker asks for it.
TAKEN = FINISHED + (optuna.trial.TrialState.RUNNING,)
HEARTBEAT_ATTR = "normsweep:heartbeat"  # system attr: time.time() of the trial's last heartbeat
STALE_ATTR = "normsweep:stale"  # system attr on a trial failed for a dead worker: it frees its slot


def uses_slot(t: optuna.trial.FrozenTrial) -> bool:
    """Whether ``t`` counts toward ``search.n_trials`` (a trial of a dead worker does not)."""
    return t.state in TAKEN and not t.system_attrs.get(STALE_ATTR)


def fail_stale_trials(study: optuna.Study, grace_period: float, now: Optional[float] = None) -> list[int]:
    """Mark FAIL every RUNNING trial whose last heartbeat is older than ``grace_period`` seconds.

    Its worker is taken to be dead (SIGKILL, a lost node): the reason goes into the trial's
    ``error`` attribute and the trial stops holding a slot of ``search.n_trials``. A trial that has
    never beaten is judged by its start time. Returns the numbers of the trials failed. Optuna's
    own ``fail_stale_trials`` works only for RDB storages inside ``study.optimize``; this works for
    every storage normsweep supports, through the storage's trial attributes.
    """
    now = time.time() if now is None else now
    storage, failed = study._storage, []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        last = t.system_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - last <= grace_period:
            continue
        reason = (f"no heartbeat for {now - last:.0f}s (> search.grace_period={grace_period:g}s): "
                  f"worker {t.user_attrs.get('worker', '?')} presumed dead; its slot is reused")  # fmt: skip
        storage.set_trial_user_attr(t._trial_id, "error", reason)
        storage.set_trial_system_attr(t._trial_id, STALE_ATTR, True)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        log.warning("study %s: trial %d failed: %s", study.study_name, t.number, reason)
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
                study._storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
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
        value = getattr(value, "value", value)  # an Enum member: its value
        if isinstance(dist, optuna.distributions.CategoricalDistribution) and value not in dist.choices:
            log.warning("search.enqueue_current: %s=%r is not one of %s; trial 0 samples it", key, value, dist.choices)
            continue
        if value is not None:
            values[key] = int(value) if isinstance(dist, optuna.distributions.IntDistribution) else value
    return values


# ------------------------------------------------------------------ the sweeper


class OptunaSweeper(Sweeper):
    """Hydra sweeper: one seeded-TPE Optuna study per grid point, resumable, pruned, failure-tolerant."""

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.config_loader = hydra_context.config_loader
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def _search_config(self) -> SearchConfig:
        node = OmegaConf.select(self.config, "search")
        if node is None:
            raise SearchError("hydra/sweeper=normsweep_optuna needs the search config: pass search=optuna")
        merged = OmegaConf.merge(OmegaConf.structured(SearchConfig), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]

    def sweep(self, arguments: list[str]) -> list[dict]:
        cfg = self._search_config()
        parser = OverridesParser.create()
        cli_dims, grid, fixed = split_overrides(parser.parse_overrides(arguments))
        dims = {k: to_distribution(k, v) for k, v in cfg.params.items()}
        dims.update({k: to_distribution(k, v) for k, v in cli_dims.items()})
        spec = resolve_storage(cfg.storage, Path(self.config.hydra.runtime.cwd))
        storage = open_storage(spec)
        summaries = []
        for point in itertools.product(*grid) if grid else [()]:
            if cfg.study_name:  # one name given: suffixed by the grid point when there is a grid
                name = "-".join([cfg.study_name, *point])
            else:
                name = study_name_for(self.config, point, fixed)
            summaries.append(self._run_study(name, spec, storage, cfg, dims, list(point), fixed))
        self._write_summary(summaries)
        return summaries

    def _run_study(self, name: str, spec: str, storage, cfg: SearchConfig, dims: dict, point: list[str],
                   fixed: list[str]) -> dict:  # fmt: skip
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                    pruner=make_pruner(cfg))  # fmt: skip
        study.set_user_attr("overrides", point)
        overrides = fixed + point
        if cfg.enqueue_current:
            job_config = self.config_loader.load_sweep_config(self.config, list(overrides))
            enqueue_current(study, spec, current_values(job_config, dims))
        done = sum(uses_slot(t) for t in study.get_trials(deepcopy=False))
        log.info("study %s: %d of %d trials taken; up to %d to run here", name, done, cfg.n_trials, max(0, cfg.n_trials - done))
        while True:
            trial = take_trial(study, spec, cfg, dims)
            if trial is None:
                break
            self._launch(study, trial, overrides, cfg.heartbeat_interval)
        write_optuna_plots(study, self.sweep_dir / "optuna" / name)
        return self._study_summary(study)

    def _launch(self, study: optuna.Study, trial: optuna.Trial, overrides: list[str], beat: Optional[float]) -> None:
        """Run one trial's job in ``<sweep dir>/<study>/trial_<number>`` and tell the study how it went."""
        params = [f"{k}={v}" for k, v in trial.params.items()]
        # The job directory is named by the study and the trial number, both shared by all the
        # workers of a study, so workers writing into one sweep dir never collide.
        subdir = f"hydra.sweep.subdir={study.study_name}/trial_{trial.number}"
        trial_hook.ACTIVE = _trial_hook(trial)
        try:
            with heartbeat(study, trial, beat):
                (ret,) = self.launcher.launch([tuple(overrides + params + [subdir])], initial_job_idx=trial.number)
        except BaseException as e:  # Ctrl-C / SIGTERM / launcher error: free the slot, keep the record
            trial.set_user_attr("error", f"{type(e).__name__}: {e}".splitlines()[0])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        finally:
            trial_hook.ACTIVE = None
        self._tell(study, trial, Path(ret.working_dir) if ret.working_dir else None, ret)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, job_dir: Optional[Path], ret) -> None:
        state, value, error = optuna.trial.TrialState.FAIL, None, "no results.json"
        res: Optional[RunRecord] = None
        if job_dir and (job_dir / RESULTS_FILE).exists():
            res = RunRecord.read(job_dir)
            error = res.error
            if res.status == "completed" and res.final_val_acc is not None:
                state, value = optuna.trial.TrialState.COMPLETE, float(res.final_val_acc)
            elif res.status == "pruned":
                state = optuna.trial.TrialState.PRUNED
        if job_dir:
            trial.set_user_attr("job_dir", str(job_dir))
        trial.set_user_attr("epochs_completed", res.epochs_completed if res else None)
        if res and res.final_test_acc is not None:
            trial.set_user_attr("final_test_acc", res.final_test_acc)
        if state == optuna.trial.TrialState.FAIL:
            trial.set_user_attr("error", (error or "unknown error").splitlines()[0])
            log.warning("trial %d failed: %s", trial.number, error)
        study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)

    @staticmethod
    def _study_summary(study: optuna.Study) -> dict:
        trials = study.get_trials(deepcopy=False)
        counts = {s.name: sum(t.state == s for t in trials) for s in FINISHED}
        summary: dict[str, Any] = {"study": study.study_name, "overrides": study.user_attrs.get("overrides", []),
                                   "trials": counts}  # fmt: skip
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            summary.update(best_trial=best.number, best_params=dict(best.params), best_val_acc=best.value,
                           best_test_acc=best.user_attrs.get("final_test_acc"),
                           best_job_dir=best.user_attrs.get("job_dir"))  # fmt: skip
        return summary

    def _write_summary(self, summaries: list[dict]) -> None:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"studies": summaries}), self.sweep_dir / "optimization_results.yaml")
        lines = ["# Best settings per study (objective: final validation accuracy)", "",
                 "| study | grid point | best params | best val acc | test acc of that trial | complete / pruned / failed |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for s in summaries:
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.get("best_params", {}).items())
            val = f"{s['best_val_acc']:.2f}" if s.get("best_val_acc") is not None else "—"
            test = f"{s['best_test_acc']:.2f}" if s.get("best_test_acc") is not None else "—"
            t = s["trials"]
            lines.append(f"| {s['study']} | {' '.join(s['overrides']) or '—'} | {params or '—'} | {val} | {test} | "
                         f"{t['COMPLETE']} / {t['PRUNED']} / {t['FAIL']} |")  # fmt: skip
        write_text(self.sweep_dir / "optimization_results.md", "\n".join(lines) + "\n")
        log.info("search results: %s\n%s", self.sweep_dir / "optimization_results.md", "\n".join(lines[2:]))


def write_optuna_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optuna's own figures (optimization history, parameter importances, slices) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out.mkdir(parents=True, exist_ok=True)
    written = []
    plots = {"history": ovm.plot_optimization_history, "importances": ovm.plot_param_importances,
             "slice": ovm.plot_slice}  # fmt: skip
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" notices and tight_layout hints
                ax = plot(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
            written.append(out / f"{name}.png")
        except Exception as e:  # e.g. importances need >1 completed trial and >1 distinct value
            log.info("optuna %s plot skipped for %s: %s", name, study.study_name, e)
    return written
