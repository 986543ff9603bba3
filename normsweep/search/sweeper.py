"""normsweep's Hydra sweeper: prepares a search's studies, starts its workers, writes its results.

``python -m normsweep -m search=optuna [norm=batch,group,layer] [search.workers=N] ...`` (the search
as a whole is told in :mod:`normsweep.search`; this module holds step 1 of it):

1. one Optuna study per grid point, created (or loaded, to resume) in the storage, each new one
   with the current settings as trial 0;
2. ``search.workers`` worker jobs started through whichever launcher is configured
   (:mod:`normsweep.search.worker`), waited for;
3. ``optimization_results.yaml`` / ``.md`` and Optuna's plots, read from the storage; Hydra's
   report callback then writes the results table of the trials' job directories.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Optional

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from normsweep.base.errors import one_line
from normsweep.config import SearchConfig
from normsweep.search.internals import basic_launcher_class, job_error
from normsweep.search.storage import open_storage, resolve_storage
from normsweep.search.studies import study_summary, write_studies
from normsweep.search.trials import (
    SearchError,
    current_values,
    enqueue_current,
    make_pruner,
    search_config,
    split_overrides,
    study_name_for,
    to_distribution,
    uses_slot,
)
from normsweep.search.worker import SearchWorker, StudyPlan

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    """Hydra sweeper: one seeded-TPE Optuna study per grid point, served by ``search.workers`` worker jobs."""

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function  # the training job: the workers run it once per trial
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def sweep(self, arguments: list[str]) -> list[dict]:
        cfg = search_config(self.config)
        parser = OverridesParser.create()
        cli_dims, grid, fixed = split_overrides(parser.parse_overrides(arguments))
        dims = {k: to_distribution(k, v) for k, v in cfg.params.items()}
        dims.update({k: to_distribution(k, v) for k, v in cli_dims.items()})
        spec = resolve_storage(cfg.storage, Path(self.config.hydra.runtime.cwd))
        worker = SearchWorker(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config,
                              dims=dims, pruner=make_pruner(cfg), plans=[])  # fmt: skip
        launcher = self._worker_launcher(worker, cfg.workers)  # checked before any study is touched
        storage = open_storage(spec)
        for point in itertools.product(*grid) if grid else [()]:
            if cfg.study_name:  # one name given: suffixed by the grid point when there is a grid
                name = "-".join([cfg.study_name, *point])
            else:
                name = study_name_for(self.config, point, fixed)
            self._prepare_study(name, spec, storage, cfg, dims, list(point), fixed)
            worker.plans.append(StudyPlan(name, tuple(fixed + list(point))))
        errors = self._run_workers(launcher, cfg.workers, fixed)
        studies = [optuna.load_study(study_name=plan.name, storage=storage) for plan in worker.plans]
        lines = write_studies(studies, self.sweep_dir)
        log.info("search results: %s\n%s", self.sweep_dir / "optimization_results.md", "\n".join(lines[2:]))
        if errors:
            raise SearchError(
                f"search workers stopped before the search was done ({'; '.join(errors)}). The storage holds every "
                f"trial told so far, and workers still running go on; run the same command again to continue (a trial "
                f"left RUNNING by a dead worker is failed after search.grace_period and runs again from its checkpoint)"
            )
        return [study_summary(study) for study in studies]

    def _prepare_study(self, name: str, spec: str, storage, cfg: SearchConfig, dims: dict, point: list[str],
                       fixed: list[str]) -> None:  # fmt: skip
        """Create (or load) the study, with the current settings as trial 0 of a new one, before any worker starts."""
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                    pruner=make_pruner(cfg))  # fmt: skip
        study.set_user_attr("overrides", point)
        if cfg.enqueue_current:
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, fixed + point)
            enqueue_current(study, spec, current_values(job_config, dims))
        done = sum(uses_slot(t) for t in study.get_trials(deepcopy=False))
        log.info(
            "study %s: %d of %d trials taken; up to %d to run", name, done, cfg.n_trials, max(0, cfg.n_trials - done)
        )

    def _worker_launcher(self, worker, n: int):
        """The configured launcher, set up to run ``worker`` as its jobs; one that cannot run ``n`` at once is refused."""
        from hydra.core.plugins import Plugins

        from normsweep.base.runtime import launcher_jobs_at_once

        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=worker, config=self.config
        )
        if n > 1 and isinstance(launcher, basic_launcher_class()):
            raise SearchError(
                f"search.workers={n} needs a launcher that runs jobs in parallel: hydra/launcher=joblib "
                f"hydra.launcher.n_jobs={n} (this machine), submitit_local, or submitit_slurm (a cluster); Hydra's "
                f"basic launcher runs one job at a time (search.workers=1)"
            )
        at_once = launcher_jobs_at_once(self.config.hydra.launcher)
        if at_once and at_once < n:
            log.warning("search.workers=%d but the launcher runs %d jobs at a time (hydra.launcher.n_jobs or "
                        "array_parallelism): a worker serves until the search is done, so the others start late or "
                        "find nothing left; raise the launcher's limit or lower search.workers", n, at_once)  # fmt: skip
        return launcher

    def _run_workers(self, launcher, n: int, fixed: list[str]) -> list[str]:
        """Start ``n`` worker jobs through ``launcher``, wait for them; the errors of those that failed.

        Worker jobs write only their log, to ``<sweep dir>/workers/worker_<i>/`` (no ``.hydra/``:
        they are not runs for the report to list).
        """
        from hydra.core.utils import JobStatus

        from normsweep.base.signals import sigterm_interrupts

        log.info("starting %d search workers through %s; each serves every study", n, type(launcher).__name__)
        jobs = [[*fixed, f"hydra.sweep.subdir=workers/worker_{i}", "hydra.output_subdir=null"] for i in range(n)]
        try:
            with sigterm_interrupts():  # SIGTERM stops the launcher as Ctrl-C does (joblib then ends its workers)
                returns = launcher.launch(jobs, initial_job_idx=0)
        except Exception as e:  # a worker killed (joblib's TerminatedWorkerError) or cancelled (submitit)
            log.error("a search worker ended without a result: %s", e)
            return [one_line(e)]
        errors = []
        for i, ret in enumerate(returns):
            if ret.status == JobStatus.FAILED:
                err = job_error(ret)
                errors.append(f"worker {i}: {one_line(err)}")
                log.error("search worker %d failed: %s", i, err)
            else:
                log.info("search worker %d: %s", i, ret.return_value)
        return errors
