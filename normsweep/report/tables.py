"""The report's tables written: the runs and grouped tables as markdown, the report of one or more sweeps
(:func:`write_report`; :class:`ReportCallback` at the end of every multirun, registered in ``conf/train.yaml``)
and the command line ``python -m normsweep.report``.

``python -m normsweep.report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--no-plots] [--correction holm|fdr|none]``
writes

* ``results.csv`` / ``results.md``: one row per run, sorted by final test accuracy; ``run`` is a short id
  (Hydra's job number), the CSV keeps the full job directory name in ``job``, the markdown shows the
  settings that vary and states the others once (the runs: :mod:`normsweep.report.runs`);
* ``results_by_config.csv`` / ``.md``: runs that differ only by ``trainer.seed`` grouped, with
  mean, standard deviation and n of each accuracy (written when some configuration has >1 seed);
* ``comparisons.csv`` / ``.md``: with those, every pair of configurations that differ in one setting
  (:mod:`normsweep.report.comparisons`);
* ``plots/``: the figures of :mod:`normsweep.report.plots`.

``python -m normsweep.report --from-csv results.csv --out DIR`` writes the comparisons of a results.csv
written before (the published ones in docs/, whose runs are not kept). Failed or unfinished runs never stop
the tables from being written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from normsweep.base.results import remove_stray_temp_files, write_text
from normsweep.report.columns import SETTINGS, setting_text, varying_columns
from normsweep.report.comparisons import (
    Comparisons,
    compare_configs,
    comparisons_from_csv,
    comparisons_text,
    write_comparisons,
)
from normsweep.report.runs import (
    ACCURACIES,
    METRICS,
    NUMERIC,
    RUN_COLUMNS,
    TTA_ACCURACIES,
    ReportError,
    _tta_present,
    collect,
    group_by_config,
)
from normsweep.report.statistics import CORRECTIONS, DEFAULT_CORRECTION, correction_name

log = logging.getLogger(__name__)

REPORT_LOCK_FILE = ".normsweep-report.lock"  # in the report's folder, held while it is written


def _setting_columns(df: pd.DataFrame) -> list[str]:
    """The settings in ``df``: the fixed columns and the swept keys they do not cover (``data.val_size``, ...);
    not the grouped table's count of runs, ``n``."""
    fixed = [c for c, _ in SETTINGS if c in df]
    return fixed + [c for c in df.columns if c not in {*fixed, *RUN_COLUMNS, *METRICS, "n"} and _is_setting(c)]


def _compact(df: pd.DataFrame) -> pd.DataFrame:
    """Drop settings that are the same in every row (the markdown table shows what differs)."""
    drop = [c for c in _setting_columns(df) if c != "norm" and not varying_columns(df, [c])]
    return df.drop(columns=drop)


def _is_setting(column: str) -> bool:
    return column not in METRICS and column not in NUMERIC and not column.endswith(("_mean", "_std", "_n", "_ci"))


def _settings_as_text(df: pd.DataFrame) -> pd.DataFrame:
    """Setting columns as text, so that the tables' two-decimal format applies to metrics only."""
    out = df.copy()
    for c in filter(_is_setting, df.columns):
        out[c] = out[c].map(setting_text)
    return out


def to_markdown(df: pd.DataFrame, title: str, fixed: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    if fixed:
        lines += ["Same in every run: " + ", ".join(f"{k}={setting_text(v) or 'null'}" for k, v in fixed.items()), ""]
    # Per column: metrics with two decimals, settings as given (tabulate would re-read "0.001" as a number).
    floatfmt = ["g" if _is_setting(c) else ".2f" for c in df.columns]
    lines.append(df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=floatfmt))
    return "\n".join(lines) + "\n"


def _fixed_settings(df: pd.DataFrame) -> dict:
    """The settings every run shares, stated once above the runs table."""
    return {c: df[c].iloc[0] for c in _setting_columns(df) if c != "norm" and not varying_columns(df, [c])}


def mean_std_markdown(table: pd.DataFrame) -> pd.DataFrame:
    tta_counts = [f"{m}_n" for m in TTA_ACCURACIES]
    out = table.drop(columns=[c for c in table.columns if c.endswith(("_mean", "_std")) or c in tta_counts])
    for m in ACCURACIES + [m for m in TTA_ACCURACIES if f"{m}_mean" in table] + ["seconds_per_epoch"]:
        mean, std = table[f"{m}_mean"], table[f"{m}_std"].fillna(0.0)
        cells = ["—" if pd.isna(a) else f"{a:.2f} ± {s:.2f}" for a, s in zip(mean, std)]
        if f"{m}_n" in table:  # flip TTA: say when fewer runs of the configuration had it
            cells = [c if k == n or c == "—" else f"{c} (n={k})" for c, k, n in zip(cells, table[f"{m}_n"], table["n"])]
        out[m] = cells
    return out


def write_report(sweep_dirs: list[str | Path], out_dir: str | Path | None = None, plots: bool = True,
                 correction: str = DEFAULT_CORRECTION) -> pd.DataFrame:  # fmt: skip
    """Write the tables (and plots) for ``sweep_dirs`` into ``out_dir`` (default: the first sweep dir);
    ``correction`` adjusts the comparisons' p-values (:func:`compare_configs`). Returns the runs table."""
    return _report(sweep_dirs, out_dir, plots, correction)[0]


def _report(sweep_dirs: list[str | Path], out_dir: str | Path | None, plots: bool,
            correction: str) -> tuple[pd.DataFrame, Comparisons | None]:  # fmt: skip
    """:func:`write_report`, returning the comparisons it wrote too (None when there were none)."""
    correction_name(correction)  # an unknown correction fails before any work
    df = collect(sweep_dirs)
    out = Path(out_dir) if out_dir else Path(sweep_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(out / REPORT_LOCK_FILE):  # one writer of the report at a time (workers of one sweep)
        remove_stray_temp_files(out)  # a report killed mid-write: its files are intact, its temp files stale
        remove_stray_temp_files(out / "plots", recursive=True)
        comparisons = _write_report(df, sweep_dirs, out, plots, correction)
    return df, comparisons


def _write_report(df: pd.DataFrame, sweep_dirs: list[str | Path], out: Path, plots: bool,
                  correction: str) -> Comparisons | None:  # fmt: skip
    write_text(out / "results.csv", df.to_csv(index=False))
    compact = _compact(df).drop(columns=["job", "path"])  # the short run id stays; the CSV has the job directory
    if not compact["error"].astype(bool).any():
        compact = compact.drop(columns="error")
    compact = compact.drop(columns=[m for m in TTA_ACCURACIES if m not in _tta_present(df)])
    write_text(out / "results.md", to_markdown(compact, "Runs, best test accuracy first", _fixed_settings(df)))
    by_config = group_by_config(df)
    comparisons = None
    if by_config is not None:
        write_text(out / "results_by_config.csv", by_config.to_csv(index=False))
        shown = _compact(mean_std_markdown(by_config))
        write_text(out / "results_by_config.md", to_markdown(shown, "Mean ± std over seeds"))
        comparisons = compare_configs(df, correction=correction)
        write_comparisons(comparisons, out)
    if plots:
        from normsweep.report.plots import write_plots

        try:
            write_plots(df, [Path(d) for d in sweep_dirs], out / "plots")
        except Exception as e:  # a figure that cannot be drawn must not cost the tables
            log.warning("plots not written: %s: %s", type(e).__name__, e)
    return comparisons


def print_table(df: pd.DataFrame) -> str:
    tta = [m for m in ("final_test_acc_tta",) if m in _tta_present(df)]
    cols = ["norm", "status", "params", "final_test_acc", *tta, "best_val_acc", "seconds_per_epoch"]
    cols = [c for c in cols if c in df]
    varying = varying_columns(df, [c for c, _ in SETTINGS if c != "norm"])
    table = _settings_as_text(_compact(df)[["run", *varying, *cols]])
    return table.to_string(index=False, float_format=lambda v: f"{v:.2f}")


class ReportCallback(Callback):
    """Hydra callback: write the sweep's report when a multirun ends.

    ``correction`` (``hydra.callbacks.report.correction`` in conf/train.yaml: holm, fdr or none) adjusts
    the comparisons' p-values for the table's number of tests, as ``--correction`` does.
    """

    def __init__(self, correction: str = DEFAULT_CORRECTION) -> None:
        correction_name(correction)  # a wrong value fails when the sweep starts, not after it
        self.correction = correction

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            df, comparisons = _report([sweep_dir], None, True, self.correction)
        except Exception as e:  # never let the report hide the sweep's own outcome
            log.error("could not write the sweep report for %s: %s", sweep_dir, e)
            return
        log.info("sweep report: %s/results.md\n%s", sweep_dir, print_table(df))
        if comparisons is not None:
            log.info("pairwise comparisons (%s/comparisons.md):\n%s", sweep_dir, comparisons_text(comparisons))
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m normsweep.report",
        description="Collect the runs of one or more sweep directories into results.csv/.md, comparisons and plots.",
    )
    parser.add_argument("sweep_dirs", nargs="*", help="directories written by `python -m normsweep -m ...`")
    parser.add_argument("--out", help="where to write the report (default: the first sweep directory, or the "
                                      "folder of --from-csv)")  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="write only the tables")
    parser.add_argument(
        "--correction",
        choices=list(CORRECTIONS),
        default=DEFAULT_CORRECTION,
        help="multiple-comparison correction of the comparisons' p-values, the whole table one "
        "family: holm (family-wise error rate, the default), fdr (Benjamini-Hochberg) or none",
    )
    parser.add_argument(
        "--from-csv",
        metavar="RESULTS_CSV",
        help="write only comparisons.csv/.md, from a results.csv an earlier report wrote",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.from_csv) == bool(args.sweep_dirs):
        parser.error("give sweep directories or --from-csv RESULTS_CSV, one of the two")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.from_csv:
            out = Path(args.out or Path(args.from_csv).parent)
            comparisons = comparisons_from_csv(args.from_csv, out, args.correction)
        else:
            out = Path(args.out or args.sweep_dirs[0])
            df, comparisons = _report(args.sweep_dirs, out, not args.no_plots, args.correction)
            print(print_table(df))
    except ReportError as e:
        print(f"normsweep.report.tables: {e}", file=sys.stderr)
        return 2
    if comparisons is not None:
        print(f"\npairwise comparisons of {comparisons.metric}:\n{comparisons_text(comparisons)}")
    print(f"\nwrote {out / ('comparisons.md' if args.from_csv else 'results.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
