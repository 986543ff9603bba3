"""The comparison table of a sweep: every run's ``results.json`` into one pandas DataFrame.

``python -m normsweep.report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--no-plots]`` writes

* ``results.csv`` / ``results.md``: one row per run, sorted by final test accuracy;
* ``results_by_config.csv`` / ``.md``: runs that differ only by ``trainer.seed`` grouped, with
  mean, standard deviation and n of each accuracy (written when some configuration has >1 seed);
* ``plots/``: the figures of :mod:`normsweep.plots`.

The same report is written at the end of every multirun by :class:`ReportCallback` (registered
in ``conf/train.yaml``). Failed or unfinished runs are listed with their status and the first
line of their error; they never stop the table from being written. A run whose results.json says
"running" is shown as running while its process lives (or runs on another host: a worker of a
shared sweep), and as "stopped" once that process is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .results import RESULTS_FILE, write_text

log = logging.getLogger(__name__)

# (column, path into the run's config); the swept settings a reader compares runs by.
SETTINGS = [
    ("norm", "norm.kind"),
    ("groups", "norm.groups"),
    ("model", "model.arch"),
    ("augment", None),
    ("optimizer", "optimizer.name"),
    ("scheduler", "scheduler.name"),
    ("lr", "optimizer.lr"),
    ("weight_decay", "optimizer.weight_decay"),
    ("dropout", "model.dropout"),
    ("batch_size", "trainer.batch_size"),
    ("label_smoothing", "trainer.label_smoothing"),
    ("epochs", "trainer.epochs"),
    ("train_size", "data.train_size"),
    ("seed", "trainer.seed"),
]
METRICS = [
    "params", "best_val_acc", "final_val_acc", "final_test_acc", "final_train_loss", "seconds_per_epoch",
    "epochs_completed",
]  # fmt: skip
ACCURACIES = ["best_val_acc", "final_val_acc", "final_test_acc"]
# Overrides that say where or how fast a run went, not what it was: never comparison columns.
NOT_SETTINGS = ("data.root", "data.cache_dir", "data.download", "trainer.threads", "trainer.progress", "trainer.reuse_memory",
                "trainer.device", "trainer.compile", "hydra.", "search")  # fmt: skip


class ReportError(RuntimeError):
    pass


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _unfinished_job(job_dir: Path) -> dict:
    """A job Hydra started that never wrote results.json (killed before its first write)."""
    hydra_dir = job_dir / ".hydra"
    overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
    config = yaml.safe_load((hydra_dir / "config.yaml").read_text()) if (hydra_dir / "config.yaml").exists() else {}
    hydra = yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) if (hydra_dir / "hydra.yaml").exists() else {}
    choices = _get(hydra or {}, "hydra.runtime.choices") or {}
    return {"status": "unfinished", "error": "no results.json: the job stopped before writing it",
            "overrides": overrides, "config": config or {}, "choices": choices}  # fmt: skip


def _alive(res: dict) -> bool:
    """Whether the process that wrote a "running" record still runs (assumed so on another host)."""
    if res.get("host") != socket.gethostname() or not res.get("pid"):
        return True
    try:
        os.kill(int(res["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def _row(job_dir: Path, res: dict, base: Path) -> dict:
    config = res.get("config") or {}
    row: dict[str, Any] = {"job": str(job_dir.relative_to(base)) if job_dir.is_relative_to(base) else str(job_dir)}
    for col, path in SETTINGS:
        row[col] = (res.get("choices") or {}).get("augment") if path is None else _get(config, path)
    for override in res.get("overrides") or []:  # swept keys the fixed columns do not cover
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key not in {p for _, p in SETTINGS if p} and key not in row and not key.startswith(NOT_SETTINGS):
            row[key] = value
    for m in METRICS:
        row[m] = res.get(m)
    row["status"] = res.get("status", "unknown")
    error = res.get("error")
    if row["status"] == "running" and not _alive(res):
        row["status"] = "stopped"
        error = (f"the process ({res.get('host')}, pid {res.get('pid')}) ended before the run finished; "
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
    rows = []
    for d in map(Path, sweep_dirs):
        if not d.is_dir():
            raise ReportError(f"{d} is not a directory; pass a sweep directory such as multirun/DATE/TIME")
        for job in find_jobs(d):
            try:
                res = json.loads((job / RESULTS_FILE).read_text()) if (job / RESULTS_FILE).exists() else _unfinished_job(job)
            except (OSError, ValueError) as e:
                res = {"status": "unreadable", "error": f"{job / RESULTS_FILE}: {e}"}
            rows.append(_row(job, res, d))
    if not rows:
        raise ReportError(
            f"no runs under {', '.join(map(str, sweep_dirs))}: no job directory with a results.json or a "
            f".hydra/ folder; pass the directory a multirun wrote (e.g. multirun/DATE/TIME)"
        )
    df = pd.DataFrame(rows).astype({"params": "Int64", "epochs_completed": "Int64"})
    df = df.sort_values("final_test_acc", ascending=False, na_position="last", kind="stable")
    return df.reset_index(drop=True)


def _varying(df: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if c in df and df[c].astype(str).nunique(dropna=False) > 1]


def group_by_config(df: pd.DataFrame) -> pd.DataFrame | None:
    """Completed runs that differ only by seed, grouped: mean, std and n of each accuracy.

    None when no configuration was run with more than one seed.
    """
    done = df[df["status"] == "completed"]
    keys = [c for c in df.columns if c not in {"job", "path", "seed", "status", "error", *METRICS}]
    if done.empty or not keys:
        return None
    grouped = done.astype({k: str for k in keys}).groupby(keys, dropna=False, sort=False)
    if grouped.size().max() < 2:
        return None
    table = grouped[ACCURACIES + ["seconds_per_epoch"]].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table["n"] = grouped.size()
    table = table.reset_index().sort_values("final_test_acc_mean", ascending=False, kind="stable")
    return table.reset_index(drop=True)


def _compact(df: pd.DataFrame) -> pd.DataFrame:
    """Drop settings that are the same in every row (the markdown table shows what differs)."""
    settings = [c for c, _ in SETTINGS] + [c for c in df.columns if "." in c]
    keep_always = {"norm"}
    drop = [c for c in settings if c in df and c not in keep_always and c not in _varying(df, [c])]
    return df.drop(columns=drop)


def to_markdown(df: pd.DataFrame, title: str, fixed: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    if fixed:
        lines += ["Same in every run: " + ", ".join(f"{k}={v}" for k, v in fixed.items()), ""]
    lines.append(df.to_markdown(index=False, floatfmt=".2f"))
    return "\n".join(lines) + "\n"


def _fixed_settings(df: pd.DataFrame) -> dict:
    return {c: df[c].iloc[0] for c, _ in SETTINGS if c in df and c != "norm" and not _varying(df, [c])}


def mean_std_markdown(table: pd.DataFrame) -> pd.DataFrame:
    out = table.drop(columns=[c for c in table.columns if c.endswith(("_mean", "_std"))])
    for m in ACCURACIES + ["seconds_per_epoch"]:
        mean, std = table[f"{m}_mean"], table[f"{m}_std"].fillna(0.0)
        out[m] = [f"{a:.2f} ± {s:.2f}" for a, s in zip(mean, std)]
    return out


def write_report(sweep_dirs: list[str | Path], out_dir: str | Path | None = None, plots: bool = True) -> pd.DataFrame:
    """Write the tables (and plots) for ``sweep_dirs`` into ``out_dir`` (default: the first sweep dir)."""
    df = collect(sweep_dirs)
    out = Path(out_dir) if out_dir else Path(sweep_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.csv", df.to_csv(index=False))
    compact = _compact(df).drop(columns="path")
    if not compact["error"].astype(bool).any():
        compact = compact.drop(columns="error")
    write_text(out / "results.md", to_markdown(compact, "Runs, best test accuracy first", _fixed_settings(df)))
    by_config = group_by_config(df)
    if by_config is not None:
        write_text(out / "results_by_config.csv", by_config.to_csv(index=False))
        shown = _compact(mean_std_markdown(by_config))
        write_text(out / "results_by_config.md", to_markdown(shown, "Mean ± std over seeds"))
    if plots:
        from .plots import write_plots

        try:
            write_plots(df, [Path(d) for d in sweep_dirs], out / "plots")
        except Exception as e:  # a figure that cannot be drawn must not cost the tables
            log.warning("plots not written: %s: %s", type(e).__name__, e)
    return df


def print_table(df: pd.DataFrame) -> str:
    cols = [c for c in ("norm", "status", "params", "final_test_acc", "best_val_acc", "seconds_per_epoch") if c in df]
    varying = _varying(df, [c for c, _ in SETTINGS if c != "norm"])
    return _compact(df)[["job", *varying, *cols]].to_string(index=False, float_format=lambda v: f"{v:.2f}")


class ReportCallback(Callback):
    """Hydra callback: write the sweep's report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            df = write_report([sweep_dir])
        except Exception as e:  # never let the report hide the sweep's own outcome
            log.error("could not write the sweep report for %s: %s", sweep_dir, e)
            return
        log.info("sweep report: %s/results.md\n%s", sweep_dir, print_table(df))
        # A pruned trial is the search working; a running one belongs to another worker of a shared sweep.
        running = df[df["status"] == "running"]
        if len(running):
            log.info("%d runs in %s are still running in other processes", len(running), sweep_dir)
        bad = df[~df["status"].isin(["completed", "pruned", "running"])]
        if len(bad):
            log.error(
                "%d of %d runs did not complete (%s); see %s/results.md",
                len(bad), len(df), ", ".join(sorted(set(bad["status"]))), sweep_dir,
            )  # fmt: skip
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m normsweep.report",
        description="Collect the runs of one or more sweep directories into results.csv/.md and plots.",
    )
    parser.add_argument("sweep_dirs", nargs="+", help="directories written by `python -m normsweep -m ...`")
    parser.add_argument("--out", help="where to write the report (default: the first sweep directory)")
    parser.add_argument("--no-plots", action="store_true", help="write only the tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        df = write_report(args.sweep_dirs, args.out, plots=not args.no_plots)
    except ReportError as e:
        print(f"normsweep.report: {e}", file=sys.stderr)
        return 2
    print(print_table(df))
    print(f"\nwrote {Path(args.out or args.sweep_dirs[0]) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
