"""The runs of one or more sweeps as one pandas DataFrame: the job directories found, each run's ``results.json``
a row (:func:`collect`), or a results.csv written before read back (:func:`read_results_csv`); its columns
(``METRICS``, ``ACCURACIES``, ...) and the runs grouped by configuration (:func:`group_by_config`).

Failed or unfinished runs are rows with their status and the first line of their error. A run whose results.json
says "running" is shown as running while its process lives (or runs on another host: a worker of a shared sweep),
and as "stopped" once that process is gone.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path, PurePath
from typing import Any

import pandas as pd
import yaml

from normsweep.base.results import RESULTS_FILE, RunRecord
from normsweep.config import is_result_neutral
from normsweep.report.columns import SETTINGS

METRICS = [
    "params", "best_val_acc", "final_val_acc", "final_test_acc", "final_val_acc_tta", "final_test_acc_tta",
    "final_train_loss", "seconds_per_epoch", "epochs_completed",
]  # fmt: skip
DATA_FACTS = ["dataset", "num_classes", "image_size"]  # results.json's record of the data a run trained on
ACCURACIES = ["best_val_acc", "final_val_acc", "final_test_acc"]
# Final accuracy with flip test-time augmentation: null when the run had it off, absent in older
# results.json files. Averaged over the runs that have it; left out of a table where no run has it.
TTA_ACCURACIES = ["final_val_acc_tta", "final_test_acc_tta"]
NUMERIC = ["best_val_acc", "final_val_acc", "final_test_acc", *TTA_ACCURACIES, "final_train_loss", "seconds_per_epoch"]
# Columns of a run that are neither a setting nor a metric; ``run`` is the short id, ``job`` the job directory.
RUN_COLUMNS = ["run", "job", "path", "status", "error"]


class ReportError(RuntimeError):
    pass


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _unfinished_job(job_dir: Path) -> RunRecord:
    """A job Hydra started that never wrote results.json (killed before its first write)."""
    hydra_dir = job_dir / ".hydra"
    overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
    config = yaml.safe_load((hydra_dir / "config.yaml").read_text()) if (hydra_dir / "config.yaml").exists() else {}
    hydra = yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) if (hydra_dir / "hydra.yaml").exists() else {}
    choices = _get(hydra or {}, "hydra.runtime.choices") or {}
    return RunRecord(status="unfinished", error="no results.json: the job stopped before writing it",
                     overrides=overrides, config=config or {}, choices=choices)  # fmt: skip


def _alive(res: RunRecord) -> bool:
    """Whether the process that wrote a "running" record still runs (assumed so on another host)."""
    if res.host != socket.gethostname() or not res.pid:
        return True
    try:
        os.kill(int(res.pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def _row(job_dir: Path, res: RunRecord, base: Path) -> dict:
    config = res.config
    row: dict[str, Any] = {"job": str(job_dir.relative_to(base)) if job_dir.is_relative_to(base) else str(job_dir)}
    for col, path in SETTINGS:
        row[col] = res.choices.get(col) if path is None else _get(config, path)
    for col in DATA_FACTS:  # what the run read: shown where the runs differ in it, like any setting
        row[col] = getattr(res, col, None)
    for override in res.overrides:  # swept keys the fixed columns do not cover
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in {p for _, p in SETTINGS if p} or key in row or key.startswith(("hydra.", "search")):
            continue
        if not is_result_neutral(key):  # where or how fast a run went is not a setting to compare by
            row[key] = value
    for m in METRICS:
        row[m] = getattr(res, m)
    row["status"] = res.status
    error = res.error
    if row["status"] == "running" and not _alive(res):
        row["status"] = "stopped"
        error = (f"the process ({res.host}, pid {res.pid}) ended before the run finished; "
                 f"run the same command with the same output dir to resume")  # fmt: skip
    row["error"] = error.strip().splitlines()[0] if error else ""
    row["path"] = str(job_dir.resolve())
    return row


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job directories under ``sweep_dir``: those with results.json or Hydra's .hydra/ folder."""
    jobs = {p.parent for p in sweep_dir.rglob(RESULTS_FILE)}
    jobs |= {p.parent for p in sweep_dir.rglob(".hydra") if (p / "overrides.yaml").exists()}
    return sorted(jobs)


def collect(sweep_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per run found under ``sweep_dirs``, sorted by final test accuracy (best first)."""
    rows, sweeps = [], []
    for d in map(Path, sweep_dirs):
        if not d.is_dir():
            raise ReportError(f"{d} is not a directory; pass a sweep directory such as multirun/DATE/TIME")
        for job in find_jobs(d):
            try:
                res = RunRecord.read(job) if (job / RESULTS_FILE).exists() else _unfinished_job(job)
            except (OSError, ValueError) as e:
                res = RunRecord(status="unreadable", error=f"{job / RESULTS_FILE}: {e}")
            rows.append(_row(job, res, d))
            sweeps.append(d.resolve().name)
    if not rows:
        raise ReportError(
            f"no runs under {', '.join(map(str, sweep_dirs))}: no job directory with a results.json or a "
            f".hydra/ folder; pass the directory a multirun wrote (e.g. multirun/DATE/TIME)"
        )
    df = pd.DataFrame(rows).astype({"params": "Int64", "epochs_completed": "Int64"})
    df.insert(0, "run", run_ids(df["job"].tolist(), sweeps))
    df[NUMERIC] = df[NUMERIC].apply(pd.to_numeric, errors="coerce")  # null or absent fields (old records): NaN
    df = df.sort_values("final_test_acc", ascending=False, na_position="last", kind="stable")
    return df.reset_index(drop=True)


def _run_id(job: str) -> str:
    """A job directory's short name: Hydra's job number ("20" for "20_norm=group,trainer.seed=0"), else its name."""
    *parents, name = PurePath(job).parts or ("",)
    number = re.match(r"(\d+)_", name)
    return "/".join([*parents, number.group(1) if number else name])


def run_ids(jobs: list[str], sweeps: list[str]) -> list[str]:
    """Short, unique ids of the runs: :func:`_run_id`, prefixed by the sweep directory's name ("seed1/20") when
    runs of several sweeps share a number; the job directory itself where even that is not unique."""
    ids = [_run_id(j) for j in jobs]
    if len(set(ids)) < len(ids):
        ids = [f"{s}/{i}" for s, i in zip(sweeps, ids)]
    if len(set(ids)) < len(ids):
        ids = [f"{s}/{j}" for s, j in zip(sweeps, jobs)]
    return ids


def _config_keys(df: pd.DataFrame) -> list[str]:
    """The columns that identify a configuration: every setting but the seed."""
    return [c for c in df.columns if c not in {*RUN_COLUMNS, "seed", *METRICS}]


def _tta_present(df: pd.DataFrame) -> list[str]:
    return [m for m in TTA_ACCURACIES if m in df and df[m].notna().any()]


def _by_config(df: pd.DataFrame):
    """(completed runs grouped by configuration, the key columns); (None, keys) when there is nothing to group."""
    done = df[df["status"] == "completed"]
    keys = _config_keys(df)
    if done.empty or not keys:
        return None, keys
    return done.astype({k: str for k in keys}).groupby(keys, dropna=False, sort=False), keys


def group_by_config(df: pd.DataFrame) -> pd.DataFrame | None:
    """Completed runs that differ only by seed, grouped: mean, std and n of each accuracy.

    The flip-TTA accuracies are included when some run has them, averaged over the runs that do
    (their count in ``<metric>_n``). None when no configuration was run with more than one seed.
    """
    grouped, keys = _by_config(df)
    if grouped is None or grouped.size().max() < 2:
        return None
    tta = _tta_present(df[df["status"] == "completed"])
    table = grouped[ACCURACIES + tta + ["seconds_per_epoch"]].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table["n"] = grouped.size()
    for m in tta:
        table[f"{m}_n"] = grouped[m].count()
    table = table.reset_index().sort_values("final_test_acc_mean", ascending=False, kind="stable")
    return table.reset_index(drop=True)


def read_results_csv(path: str | Path) -> pd.DataFrame:
    """A results.csv written by an earlier report, as :func:`collect` returns it: metrics as numbers, settings
    as the text they were written as (an empty cell: None), so that the comparisons group and name them alike."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as e:
        raise ReportError(f"cannot read {path}: {e}") from e
    missing = {"job", "status", "final_test_acc"} - set(df.columns)
    if missing:
        raise ReportError(f"{path} is not a results.csv of normsweep.report: no column {', '.join(sorted(missing))}")
    numeric = [c for c in METRICS if c in df]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    text = [c for c in df.columns if c not in numeric]
    df[text] = df[text].astype(object).where(df[text] != "", None)
    return df
