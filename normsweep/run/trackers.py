"""Experiment trackers: every run seen live in TensorBoard or MLflow (``logger=tensorboard|mlflow``).

A :class:`Tracker` is started when a job starts, sees each finished epoch and is finished when the
job ends, however it ends. The run's own files (``results.json`` ...) stay the record; a tracker is a
view of them in a tool researchers already use:

* ``logger=tensorboard``: per-epoch scalars (``train_loss``, ``train_acc``, ``val_acc``,
  ``test_acc``, ``lr``, ``seconds``; step = epoch) and, when the run completes, its hyper-parameters
  with the final metrics (the HParams view). Event files go into the job directory itself (or
  ``logger.dir``/<job dir relative to the launch dir>), so ``tensorboard --logdir SWEEP_DIR``
  overlays a whole sweep, one run per job.
* ``logger=mlflow``: one MLflow run per job in an experiment named after the sweep; params = the
  resolved config, flattened with dotted keys; the same metrics per epoch (step = epoch); the final
  metrics, ``results.json``, ``model_summary.txt`` and the plots as artifacts. The run id is kept in
  the job directory (``mlflow_run.json``), so a resumed job continues the same MLflow run.

Neither library is imported unless its logger is chosen; a missing one stops the run at start with
the ``pip install 'normsweep[...]'`` that brings it. A job that resumes from its checkpoint
continues the tracker's run and logs only the epochs the tracker does not hold yet (read back from
the tracker itself), so no epoch is logged twice and none is lost; a job that starts over (no
checkpoint) starts a new run. After a tracker has started, a failure to log (a tracking server gone
away) is a warning: training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from normsweep.base.credentials import redact, redact_logs
from normsweep.base.registry import Registry
from normsweep.base.results import RESULTS_FILE, SUMMARY_FILE, TRAINING_STATE_FILE, EpochRecord, write_json
from normsweep.config import LoggerConfig, NormsweepError, dotted
from normsweep.run.train import EpochStats

log = logging.getLogger(__name__)

EPOCH_METRICS = tuple(f.name for f in fields(EpochRecord) if f.name != "epoch")  # logged per epoch, step = epoch
FINAL_METRICS = ("final_val_acc", "final_test_acc", "best_val_acc", "final_train_loss",
                 "final_val_acc_tta", "final_test_acc_tta", "params", "seconds_per_epoch", "peak_memory_mb")  # fmt: skip
MLFLOW_RUN_FILE = "mlflow_run.json"  # in the job directory: the MLflow run a resumed job continues
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "pruned": "KILLED"}


class TrackerMissing(NormsweepError, ImportError):
    """The chosen logger's package is not installed."""


def _missing(extra: str, err: ImportError) -> TrackerMissing:
    return TrackerMissing(
        f"logger={extra} needs the {extra} package, which cannot be imported ({err}): "
        f"pip install 'normsweep[{extra}]' (or pass logger=none)"
    )


def flatten(d: dict) -> dict[str, Any]:
    """The config as dotted keys (``config.dotted``) with lists and dicts as their text, as trackers' params are."""
    return {k: str(v) if isinstance(v, (list, tuple, dict)) else v for k, v in dotted(d).items()}


class Tracker:
    """No tracker (``logger=none``), and the interface of the others."""

    kind = "none"

    def __init__(self) -> None:
        self.last_epoch = 0  # the last epoch this tracker holds for the run; a resumed run logs only later ones
        self._warned = False

    def start(self, config: dict, record: dict) -> None:
        """Open the run (or reopen it, for a resumed job); may raise :class:`TrackerMissing`."""

    @staticmethod
    def resuming(out: Path) -> bool:
        """Whether the job in ``out`` continues from a checkpoint (train.train resumes from it)."""
        return (out / TRAINING_STATE_FILE).exists()

    def log_epoch(self, stats: EpochStats) -> None:
        """Log one finished epoch (step = ``stats.epoch``)."""

    def finish(self, record: dict, files: list[Path]) -> None:
        """Close the run with ``record``'s status and final metrics, and attach ``files``."""

    # -- what job.py calls after start: never fails the run ------------------------------------------

    def log_history(self, history: list[EpochStats]) -> None:
        """Log the epochs of ``history`` that the tracker does not hold yet."""
        for stats in history:
            if stats.epoch > self.last_epoch:
                try:
                    self.log_epoch(stats)
                except Exception as e:  # noqa: BLE001 - the run's files are the record; training goes on
                    self._warn(f"could not log epoch {stats.epoch}", e)
                    return
                self.last_epoch = stats.epoch

    def close(self, record: dict, files: list[Path]) -> None:
        """:meth:`finish`, with a failure logged as a warning."""
        try:
            self.finish(record, [f for f in files if f.is_file()])
        except Exception as e:  # noqa: BLE001
            self._warn("could not finish the run", e)

    def _warn(self, what: str, err: Exception) -> None:
        if not self._warned:  # once per run: a tracking server that went away would say it every epoch
            log.warning("logger=%s %s (%s: %s); the run goes on, its files are complete", self.kind, what,
                        type(err).__name__, err)  # fmt: skip
            self._warned = True


def run_files(out: Path) -> list[Path]:
    """The files a tracker attaches to a run: ``results.json``, ``model_summary.txt``, plots."""
    files = [out / RESULTS_FILE, out / SUMMARY_FILE, *sorted((out / "plots").glob("**/*.png"))]
    return [f for f in files if f.is_file()]


# ---------------------------------------------------------------------------- where a job is


def _launch_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()


def _shown(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when it lies inside it, else absolute."""
    path = path.resolve()
    return str(path.relative_to(base.resolve())) if path.is_relative_to(base.resolve()) else str(path)


def job_names(out: Path) -> tuple[str, str]:
    """(experiment, run name) of the job in ``out``.

    In a sweep: the sweep directory (relative to the launch directory) and the job's directory
    within it (``0_norm=batch``, ``normsweep-batch-1a2b/trial_3``); a single run: ``normsweep``
    (Hydra's job name) and its run directory.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return "normsweep", out.resolve().name
    hc, launch = HydraConfig.get(), _launch_dir()
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        sweep = sweep if sweep.is_absolute() else launch / sweep
        return _shown(sweep, launch), _shown(out, sweep)
    return hc.job.name or "normsweep", _shown(out, launch)


# ---------------------------------------------------------------------------- TensorBoard


def tensorboard_dir(cfg: LoggerConfig, out: Path) -> Path:
    """The job's TensorBoard run directory: the job directory, or ``logger.dir``/<job dir as launched>."""
    if cfg.dir is None:
        return out.resolve()
    launch = _launch_dir()
    root = Path(cfg.dir).expanduser()
    root = root if root.is_absolute() else launch / root
    shown = Path(_shown(out, launch))
    return root / (shown.relative_to(shown.anchor) if shown.is_absolute() else shown)


def tensorboard_epochs(logdir: Path) -> int:
    """The last epoch whose every scalar is in ``logdir``'s event files (0 when there are none)."""
    if not any(logdir.glob("events.out.tfevents.*")):
        return 0
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    if not all(m in tags for m in EPOCH_METRICS):
        return 0
    return int(min(max((e.step for e in acc.Scalars(m)), default=0) for m in EPOCH_METRICS))


class TensorBoardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, logdir: Path, out: Path) -> None:
        super().__init__()
        self.logdir, self.out = logdir, out
        self.writer = None

    def start(self, config: dict, record: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard", e) from e
        self.config = config
        self.logdir.mkdir(parents=True, exist_ok=True)
        earlier = any(self.logdir.glob("events.out.tfevents.*"))
        self.last_epoch = tensorboard_epochs(self.logdir) if earlier and self.resuming(self.out) else 0
        # TensorBoard hides the earlier events from this step on: what a killed process logged past
        # its last complete epoch, or everything when the job starts over.
        self.writer = SummaryWriter(str(self.logdir), purge_step=self.last_epoch + 1 if earlier else None)
        log.info("logger=tensorboard: %s (tensorboard --logdir %s)", self.logdir, self.logdir.parent)

    def log_epoch(self, stats: EpochStats) -> None:
        for key in EPOCH_METRICS:
            self.writer.add_scalar(key, getattr(stats, key), global_step=stats.epoch)
        self.writer.flush()

    def finish(self, record: dict, files: list[Path]) -> None:
        if self.writer is None:
            return
        try:
            if record.get("status") == "completed":
                metrics = {f"final/{k}": float(record[k]) for k in FINAL_METRICS if record.get(k) is not None}
                # run_name="." keeps the HParams entry in this run's directory, beside its scalars.
                self.writer.add_hparams(
                    flatten(self.config), metrics, run_name=".", global_step=record["epochs_completed"]
                )
                summary = next((f for f in files if f.name == SUMMARY_FILE), None)
                if summary is not None:
                    self.writer.add_text("model_summary", "```\n" + summary.read_text() + "\n```")
        finally:
            self.writer.close()
            self.writer = None


# ---------------------------------------------------------------------------- MLflow


def mlflow_uri(cfg: LoggerConfig, launch: Path) -> str:
    """``logger.tracking_uri`` (a relative SQLite path taken from the launch directory),
    else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<launch dir>/mlruns.db``."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{launch / 'mlruns.db'}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_absolute():
        uri = f"sqlite:///{launch / uri[len('sqlite:///') :]}"
    return uri


def _artifact_location(uri: str, launch: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite file, else under the launch
    directory for other database stores (never the job's working directory); a server decides its own."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if "://" in uri else "file"
    if scheme in ("http", "https", "databricks", "file"):
        return None
    base = Path(uri[len("sqlite:///") :]).parent if scheme == "sqlite" else launch
    return (base / "mlartifacts").as_uri()


_PARAM_KEY = re.compile(r"[^\w\-. /]")  # MLflow's allowed key characters


class MLflowTracker(Tracker):
    kind = "mlflow"

    def __init__(self, cfg: LoggerConfig, out: Path) -> None:
        super().__init__()
        self.cfg, self.out = cfg, out
        self.client = self.run_id = None

    def start(self, config: dict, record: dict) -> None:
        try:
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _missing("mlflow", e) from e
        launch = _launch_dir()
        uri = mlflow_uri(self.cfg, launch)
        shown = redact(uri)  # what is written and logged: a password in the URI masked
        redact_logs()  # MLflow's own log handler, set up when it was imported just now
        if shown != uri:  # MLflow prints "View run at <URI>" to stdout itself; normsweep logs it masked
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        experiment, run_name = job_names(self.out)
        experiment = self.cfg.experiment or experiment
        self.client = client = MlflowClient(tracking_uri=uri)
        with _store_lock(uri):  # one process at a time creates a SQLite store's tables and the experiment
            experiment_id = self._experiment(experiment, _artifact_location(uri, launch))
            run = self._resumable_run(shown)
            if run is None:
                run = client.create_run(experiment_id, run_name=run_name,
                                        tags={"job_dir": str(self.out.resolve()), "norm": record.get("norm", "")})  # fmt: skip
                write_json(self.out / MLFLOW_RUN_FILE, {"tracking_uri": shown, "run_id": run.info.run_id,
                                                        "experiment": experiment})  # fmt: skip
            else:
                client.update_run(run.info.run_id, status="RUNNING")
                self.last_epoch = self._epochs_logged(run.info.run_id)
                log.info("logger=mlflow: continuing run %s after epoch %d", run.info.run_id, self.last_epoch)
        self.run_id = run.info.run_id
        existing = run.data.params  # a resumed run keeps its params (MLflow refuses to change one)
        params = [Param(_PARAM_KEY.sub("_", k), str(v)[:6000]) for k, v in flatten(config).items()]
        params = [p for p in params if p.key not in existing]
        tags = [RunTag("overrides", " ".join(record.get("overrides") or [])[:5000])]
        client.log_batch(self.run_id, params=params, tags=tags)
        log.info("logger=mlflow: run %s (%s) in experiment %r at %s", run_name, self.run_id, experiment, shown)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except Exception:  # noqa: BLE001 - another worker created it first (a server; SQLite is locked)
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise NormsweepError(
                f"the MLflow experiment {name!r} (id {exp.experiment_id}) was deleted: restore it "
                f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or pass logger.experiment=NAME"
            )
        return exp.experiment_id

    def _resumable_run(self, uri: str):
        """The run this job directory started before, in the same store (``uri`` redacted), if it still exists."""
        path = self.out / MLFLOW_RUN_FILE
        if not path.exists() or not self.resuming(self.out):
            return None
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            return None
        if saved.get("tracking_uri") != uri:
            log.warning("logger=mlflow: this job's earlier run %s is in %s, not %s: starting a new run",
                        saved.get("run_id"), saved.get("tracking_uri"), uri)  # fmt: skip
            return None
        try:
            run = self.client.get_run(saved["run_id"])
        except Exception as e:  # noqa: BLE001 - deleted from the store
            log.warning("logger=mlflow: cannot reopen run %s (%s): starting a new run", saved.get("run_id"), e)
            return None
        return None if run.info.lifecycle_stage == "deleted" else run

    def _epochs_logged(self, run_id: str) -> int:
        """The last epoch whose every metric the run already holds."""
        steps = [max((m.step for m in self.client.get_metric_history(run_id, k)), default=0) for k in EPOCH_METRICS]
        return int(min(steps))

    def log_epoch(self, stats: EpochStats) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(getattr(stats, k)), now, stats.epoch) for k in EPOCH_METRICS]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, record: dict, files: list[Path]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        status = record.get("status", "failed")
        try:
            step, now = int(record.get("epochs_completed") or 0), int(time.time() * 1000)
            metrics = [Metric(k, float(record[k]), now, step) for k in FINAL_METRICS if record.get(k) is not None]
            tags = [RunTag("status", status)] + (
                [RunTag("error", str(record["error"])[:5000])] if record.get("error") else []
            )
            self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
            for f in files:
                rel = (
                    f.resolve().parent.relative_to(self.out.resolve())
                    if f.resolve().is_relative_to(self.out.resolve())
                    else None
                )
                self.client.log_artifact(self.run_id, str(f), None if rel in (None, Path(".")) else rel.as_posix())
            if status == "completed":
                self._log_confusion(record)
        finally:
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))

    def _log_confusion(self, record: dict) -> None:
        """The run's test confusion matrix (from its saved predictions) as ``plots/confusion.png``."""
        from normsweep.base.results import PREDICTIONS_FILE
        from normsweep.report.plots import plot_confusion

        if not (self.out / PREDICTIONS_FILE).exists() or not record.get("classes"):
            return
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_confusion(self.out, Path(tmp), tuple(record["classes"]))
            self.client.log_artifact(self.run_id, str(png), "plots")


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _store_lock(uri: str):
    if not uri.startswith("sqlite:///"):
        return _NoLock()
    from filelock import FileLock

    path = Path(uri[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".normsweep-lock")


# logger.kind -> (logger.* settings, the job directory) -> the tracker. The schema's LoggerKind lists the same
# names (it sits below this module, whose trackers read the config); tests/test_one_place.py checks they agree.
TRACKERS: Registry[Callable[[LoggerConfig, Path], Tracker]] = Registry("logger.kind")
TRACKERS.register("none", lambda cfg, out: Tracker())
TRACKERS.register("tensorboard", lambda cfg, out: TensorBoardTracker(tensorboard_dir(cfg, out), out))
TRACKERS.register("mlflow", MLflowTracker)


def make_tracker(cfg: LoggerConfig, out: Path) -> Tracker:
    """The tracker ``logger.kind`` names (not started)."""
    return TRACKERS.entry(cfg.kind)(cfg, out)
