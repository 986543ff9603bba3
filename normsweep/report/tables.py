"""The comparison table of a sweep: every run's ``results.json`` into one pandas DataFrame.

``python -m normsweep.report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--no-plots] [--correction holm|fdr|none]``
writes

* ``results.csv`` / ``results.md``: one row per run, sorted by final test accuracy; ``run`` is a short id
  (Hydra's job number), the CSV keeps the full job directory name in ``job``, the markdown shows the
  settings that vary and states the others once;
* ``results_by_config.csv`` / ``.md``: runs that differ only by ``trainer.seed`` grouped, with
  mean, standard deviation and n of each accuracy (written when some configuration has >1 seed);
* ``comparisons.csv`` / ``.md``: with those, every pair of configurations that differ in one
  setting: difference in mean final test accuracy with its 95% confidence interval, Hedges' g,
  Welch's t-test p-value raw and adjusted for the whole table (Holm by default), whether the pair
  is distinguishable on the adjusted p-value, and the seeds per configuration that would resolve
  the difference (:func:`compare_configs`; the statistics in :mod:`normsweep.report.statistics`);
* ``plots/``: the figures of :mod:`normsweep.report.plots`.

``python -m normsweep.report --from-csv results.csv --out DIR`` writes the comparisons of a results.csv
written before (the published ones in docs/, whose runs are not kept).

The same report is written at the end of every multirun by :class:`ReportCallback` (registered
in ``conf/train.yaml``, with its ``correction``). Failed or unfinished runs are listed with their status
and the first line of their error; they never stop the table from being written. A run whose results.json
says "running" is shown as running while its process lives (or runs on another host: a worker of a
shared sweep), and as "stopped" once that process is gone.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd
import yaml
from filelock import FileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from normsweep.base.results import RESULTS_FILE, RunRecord, remove_stray_temp_files, write_text
from normsweep.config import is_result_neutral
from normsweep.report.columns import SETTINGS, setting_text, varying_columns
from normsweep.report.statistics import (
    ALPHA,
    CORRECTIONS,
    DEFAULT_CORRECTION,
    POWER,
    adjust_p_values,
    correction_name,
    hedges_g,
    per_test_alpha,
    pooled_std,
    seeds_needed,
    welch,
)

log = logging.getLogger(__name__)

METRICS = [
    "params", "best_val_acc", "final_val_acc", "final_test_acc", "final_val_acc_tta", "final_test_acc_tta",
    "final_train_loss", "seconds_per_epoch", "epochs_completed",
]  # fmt: skip
ACCURACIES = ["best_val_acc", "final_val_acc", "final_test_acc"]
# Final accuracy with flip test-time augmentation: null when the run had it off, absent in older
# results.json files. Averaged over the runs that have it; left out of a table where no run has it.
TTA_ACCURACIES = ["final_val_acc_tta", "final_test_acc_tta"]
NUMERIC = ["best_val_acc", "final_val_acc", "final_test_acc", *TTA_ACCURACIES, "final_train_loss", "seconds_per_epoch"]
REPORT_LOCK_FILE = ".normsweep-report.lock"  # in the report's folder, held while it is written
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


@dataclass
class Comparisons:
    """Pairs of configurations that differ in one setting: ``table`` compared, ``skipped`` (n < 2 on a side).

    ``correction`` is how the table's p-values were adjusted (``holm``, ``fdr`` or ``none``) and ``family_size``
    how many tests they were adjusted for: every compared pair with a p-value, the whole table as one family.
    """

    metric: str
    table: pd.DataFrame
    skipped: pd.DataFrame
    correction: str = DEFAULT_CORRECTION
    family_size: int = 0


COMPARISON_COLUMNS = [
    "setting", "a", "b", "where", "n_a", "n_b", "mean_a", "std_a", "mean_b", "std_b", "diff", "ci_low", "ci_high",
    "g", "g_low", "g_high", "df", "p_value", "p_adjusted", "correction", "family_size", "distinguishable",
    "seeds_needed",
]  # fmt: skip


def _seed_word(n_a: int, n_b: int) -> str:
    return f"n={n_a} seeds" if n_a == n_b else f"n={n_a}/{n_b} seeds"


def _set_by_recipes(configs: list[tuple[dict, np.ndarray]], keys: list[str]) -> set[str]:
    """The settings a norm's own recipe can have set: those every configuration of a norm run with its own
    recipe (``recipe=<norm>``) shares. A setting swept within one norm's runs (the batch-size study's batch
    size) is not a recipe's."""
    by_norm: dict[str, list[dict]] = {}
    for c, _ in configs:
        if c.get("recipe") == c.get("norm"):
            by_norm.setdefault(c.get("norm"), []).append(c)
    return {k for k in keys if all(len({c[k] for c in cs}) == 1 for cs in by_norm.values())}


def _each_with_its_own_recipe(ca: dict, cb: dict, differ: list[str], set_by_recipes: set[str]) -> bool:
    """Whether two configs are two norms each run with its own tuned recipe (``recipe=<norm>``).

    Such a pair is a comparison of norms at their own best: it differs in the norm and in what the
    norms' recipes set (:func:`_set_by_recipes`), and everything else is equal.
    """
    if "norm" not in differ or not all(c.get("recipe") == c.get("norm") for c in (ca, cb)):
        return False
    return set(differ) - {"norm", "recipe"} <= set_by_recipes


def _configs(df: pd.DataFrame, metric: str) -> tuple[list[str], list[tuple[dict, np.ndarray]]] | None:
    """(the key columns, [(setting -> value as text, the metric's values over seeds)], highest mean first)."""
    grouped, keys = _by_config(df)
    if grouped is None or grouped.size().max() < 2:
        return None
    configs = []
    for key, g in grouped:
        key = key if isinstance(key, tuple) else (key,)
        values = g[metric].dropna().to_numpy(dtype=float)
        setting = {k: "None" if pd.isna(v) else str(v) for k, v in zip(keys, key)}  # NaN != NaN: compare as text
        configs.append((setting, values))
    configs.sort(key=lambda c: -c[1].mean() if len(c[1]) else math.inf)  # stable: a is the higher mean
    return keys, configs


def _pairs(keys: list[str], configs: list[tuple[dict, np.ndarray]]):
    """(row, a, b) for each pair of configurations that differ in exactly one setting (or in the norm, each
    with its own recipe); ``row`` names the setting, its two values and where the pair sits in the sweep."""
    varying = [k for k in keys if len({c[k] for c, _ in configs}) > 1]
    by_recipes = _set_by_recipes(configs, keys)
    for i, (ca, a) in enumerate(configs):
        for cb, b in configs[i + 1 :]:
            differ = [k for k in keys if ca[k] != cb[k]]
            own_recipes = _each_with_its_own_recipe(ca, cb, differ, by_recipes)
            if len(differ) != 1 and not own_recipes:
                continue
            setting = "norm" if own_recipes else differ[0]
            where = ", ".join(f"{k}={ca[k]}" for k in varying if k not in differ)
            if own_recipes:  # the norms at their tuned best: what their recipes set differs too
                tuned = ", ".join(k for k in differ if k not in ("norm", "recipe"))
                where = "; ".join(filter(None, [where, f"each norm with its own recipe ({tuned or 'same values'})"]))
            yield {"setting": setting, "a": ca[setting], "b": cb[setting], "where": where,
                   "n_a": len(a), "n_b": len(b)}, a, b  # fmt: skip


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    """One pair's numbers: mean and std per side, Welch's difference, interval, df and p, Hedges' g."""
    return {"mean_a": a.mean(), "std_a": a.std(ddof=1), "mean_b": b.mean(), "std_b": b.std(ddof=1),
            **welch(a, b), **hedges_g(a, b), "pooled_std": pooled_std(a, b)}  # fmt: skip


def _verdict(row: dict, correction: str) -> str:
    """Distinguishable on the adjusted p-value; a pair that passes only before the correction says so."""
    if math.isnan(row["p_value"]):
        return "— (no spread between seeds: no test)"
    if row["p_adjusted"] < ALPHA:
        return "yes"
    verdict = f"no — not distinguishable with {_seed_word(row['n_a'], row['n_b'])}"
    if row["p_value"] < ALPHA:
        verdict += f" (p<{ALPHA:g} before the {correction_name(correction)} correction)"
    return verdict


def _decide(rows: list[dict], correction: str) -> int:
    """Adjust the p-values of ``rows`` as one family, then decide each pair and count its seeds (in place).

    Seeds needed: per configuration, for the observed difference at the observed pooled spread to pass the
    corrected test whatever the other pairs' p-values, i.e. at α/m (:func:`per_test_alpha`). Returns m.
    """
    adjusted = adjust_p_values([r["p_value"] for r in rows], correction)
    family_size = int(sum(not math.isnan(r["p_value"]) for r in rows))
    level = per_test_alpha(family_size, correction)
    for row, p in zip(rows, adjusted):
        row.update(p_adjusted=float(p), correction=correction, family_size=family_size)
        row["distinguishable"] = _verdict(row, correction)
        need = seeds_needed(row["diff"], row.pop("pooled_std"), alpha=level)
        row["seeds_needed"] = "inf" if math.isinf(need) else need
    return family_size


def compare_configs(df: pd.DataFrame, metric: str = "final_test_acc",
                    correction: str = DEFAULT_CORRECTION) -> Comparisons | None:  # fmt: skip
    """Each pair of configurations that differ in exactly one setting, compared on ``metric``.

    Two norms each run with its own recipe (the default multirun) count as differing in the norm alone,
    the comparison of the norms at their tuned best, when the other settings they differ in are ones each
    norm's runs all share (what a recipe sets, :func:`_set_by_recipes`).

    Per pair: n and mean ± std per side, the difference in means (a − b, a being the higher mean) with its
    95% confidence interval, Hedges' g with its interval, Welch's df and p-value, the p-value adjusted for
    the whole table (``correction``: Holm, ``fdr`` Benjamini–Hochberg or ``none``), whether the adjusted p
    is below ALPHA, and the seeds per configuration that would resolve the observed difference under the
    correction (:func:`_decide`). Pairs with fewer than 2 runs on a side go to ``skipped``; pairs that differ
    in more settings are not compared. None when no configuration has more than one seed or no pair differs
    in exactly one setting.
    """
    correction_name(correction)  # an unknown correction fails before any work
    found = _configs(df, metric)
    if found is None:
        return None
    keys, configs = found
    rows, skipped = [], []
    for row, a, b in _pairs(keys, configs):
        if min(len(a), len(b)) < 2:
            skipped.append(row)
        else:
            rows.append({**row, **_compare(a, b)})
    if not rows and not skipped:
        return None
    family_size = _decide(rows, correction)
    order = {k: i for i, k in enumerate(keys)}

    def frame(records: list[dict], cols: list[str]) -> pd.DataFrame:
        out = pd.DataFrame(records, columns=cols)
        by = ["setting", "where"]
        out = out.sort_values(by, key=lambda c: c.map(order) if c.name == "setting" else c, kind="stable")
        return out.reset_index(drop=True)

    return Comparisons(metric, frame(rows, COMPARISON_COLUMNS), frame(skipped, COMPARISON_COLUMNS[:6]),
                       correction, family_size)  # fmt: skip


def _fmt_p(p: float) -> str:
    return "—" if math.isnan(p) else f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _fmt_interval(value: float, low: float, high: float, digits: int) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _decision_header(c: Comparisons) -> str:
    if c.correction == "none":
        return f"distinguishable at p<{ALPHA:g} (no correction)"
    return f"distinguishable ({correction_name(c.correction)} p<{ALPHA:g})"


def comparisons_view(c: Comparisons) -> pd.DataFrame:
    """The compared pairs as display strings (markdown and console)."""
    t = c.table
    view = pd.DataFrame({
        "setting": t["setting"], "a": t["a"], "b": t["b"], "where": t["where"],
        "n (a / b)": [f"{x} / {y}" for x, y in zip(t["n_a"], t["n_b"])],
        "a: mean ± std": [f"{m:.2f} ± {s:.2f}" for m, s in zip(t["mean_a"], t["std_a"])],
        "b: mean ± std": [f"{m:.2f} ± {s:.2f}" for m, s in zip(t["mean_b"], t["std_b"])],
        "a − b [95% CI]": [_fmt_interval(*v, 2) for v in zip(t["diff"], t["ci_low"], t["ci_high"])],
        "Hedges' g [95% CI]": [_fmt_interval(*v, 1) for v in zip(t["g"], t["g_low"], t["g_high"])],
        "Welch df": ["—" if math.isnan(d) else f"{d:.1f}" for d in t["df"]],
        "p (Welch)": [_fmt_p(p) for p in t["p_value"]],
        f"p ({correction_name(c.correction)})": [_fmt_p(p) for p in t["p_adjusted"]],
        _decision_header(c): t["distinguishable"],
        "seeds needed": ["—" if s == "inf" else str(s) for s in t["seeds_needed"]],
    })  # fmt: skip
    if c.correction == "none":
        view = view.drop(columns="p (none)")
    if not view["where"].astype(bool).any():
        view = view.drop(columns="where")
    return view


METRIC_NAMES = {"final_test_acc": "final test accuracy", "final_val_acc": "final validation accuracy",
                "best_val_acc": "best validation accuracy", "final_test_acc_tta": "final test accuracy with flip TTA",
                "final_val_acc_tta": "final validation accuracy with flip TTA"}  # fmt: skip

CORRECTION_TEXT = {
    "holm": "Holm's step-down method (family-wise error rate: the chance that *any* pair that does not differ "
            "is called distinguishable stays at most α)",
    "fdr": "the Benjamini–Hochberg procedure (false discovery rate: of the pairs called distinguishable, at most "
           "a fraction α is expected not to differ)",
}  # fmt: skip


def _correction_paragraph(c: Comparisons) -> str:
    """What family was corrected, how, and how many pairs pass before and after."""
    m, t = c.family_size, c.table
    before = int((t["p_value"] < ALPHA).sum())
    after = int((t["p_adjusted"] < ALPHA).sum())
    if c.correction == "none":
        return (f"**No multiple-comparison correction** (`--correction none`): each of the table's {m} tests is "
                f"judged on its own at p < {ALPHA:g}, and about one in twenty pairs that do not differ passes by "
                f"chance; {before} of {m} pass.")  # fmt: skip
    name = correction_name(c.correction)
    return (
        f"**Corrected for {m} tests**: the family is the whole table, every compared pair of this report "
        f"(pairs with no test not counted). p ({name}) is Welch's p adjusted with "
        f"{CORRECTION_TEXT[c.correction]}, through statsmodels' `multipletests`; *distinguishable* is decided "
        f"on it. {after} of {m} pairs are distinguishable after the correction, {before} before it."
    )


def _seeds_paragraph(c: Comparisons) -> str:
    """How the seeds needed were counted, at the level the corrected test needs (:func:`per_test_alpha`)."""
    corrected = per_test_alpha(c.family_size, c.correction) < ALPHA
    level = f"α/m = {ALPHA:g}/{c.family_size}" if corrected else f"α = {ALPHA:g}"
    text = (f"*Seeds needed*: seeds per configuration for a two-sided t-test at {level} to detect the observed "
            f"difference d with {POWER:.0%} power at the observed pooled spread s (the power of the t-test with "
            f"2n − 2 degrees of freedom and noncentrality (d/s)·√(n/2), from the noncentral t distribution), at "
            f"least 2; — when d = 0.")  # fmt: skip
    if corrected:
        text += " A p-value below α/m passes the correction whatever the other pairs' p-values show."
    return text


def comparisons_markdown(c: Comparisons, source: str | None = None) -> str:
    """The comparisons page: what each column means, the correction, the table and the skipped pairs."""
    name = METRIC_NAMES.get(c.metric, c.metric.replace("_", " "))
    lines = [f"# Pairwise comparisons of {name}", ""]
    if source:
        lines += [source, ""]
    lines += [
        f"Configurations that differ in exactly one setting, everything else equal (pairs that differ in more "
        f"settings are not compared). a − b is the difference of the mean {name} over seeds, in percentage points, "
        f"a being the higher mean, with its 95% confidence interval (t distribution with Welch–Satterthwaite degrees "
        f"of freedom); Hedges' g is the same difference in units of the pooled seed-to-seed standard deviation "
        f"(small-sample corrected) with its approximate 95% interval (Borenstein et al. 2009, normal approximation); "
        f"p (Welch) is Welch's two-sided t-test (unequal variances, `scipy.stats.ttest_ind(equal_var=False)`).", "",
        _correction_paragraph(c), "", _seeds_paragraph(c), "",
    ]  # fmt: skip
    if len(c.table):
        lines.append(comparisons_view(c).to_markdown(index=False, disable_numparse=True))  # cells exactly as formatted
    else:
        lines.append("No pair of configurations with at least 2 seeds each differs in exactly one setting.")
    if len(c.skipped):
        lines += ["", "Skipped, fewer than 2 seeds on a side:", ""]
        for r in c.skipped.itertuples(index=False):
            where = f" ({r.where})" if r.where else ""
            lines.append(f"- {r.setting}={r.a} (n={r.n_a}) vs {r.setting}={r.b} (n={r.n_b}){where}")
    return "\n".join(lines) + "\n"


def comparisons_text(c: Comparisons) -> str:
    """The comparisons for the console / log."""
    text = comparisons_view(c).to_string(index=False) if len(c.table) else "no pair with >= 2 seeds on each side"
    if c.correction != "none" and c.family_size:
        text += f"\n(p adjusted with {correction_name(c.correction)} for the table's {c.family_size} tests)"
    if len(c.skipped):
        text += f"\n({len(c.skipped)} pairs skipped: fewer than 2 seeds on a side; see comparisons.md)"
    return text


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


def write_comparisons(comparisons: Comparisons | None, out: Path, source: str | None = None) -> None:
    """comparisons.csv (unrounded) and comparisons.md into ``out``; nothing when there is nothing to compare."""
    if comparisons is not None:
        write_text(out / "comparisons.csv", comparisons.table.to_csv(index=False))
        write_text(out / "comparisons.md", comparisons_markdown(comparisons, source))


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


def comparisons_from_csv(csv: str | Path, out: str | Path, correction: str = DEFAULT_CORRECTION) -> Comparisons | None:
    """Write comparisons.csv/.md into ``out`` from a results.csv alone (the runs need not exist any more)."""
    comparisons = compare_configs(read_results_csv(csv), correction=correction)
    Path(out).mkdir(parents=True, exist_ok=True)
    source = (f"From `{Path(csv).as_posix()}`, the runs' table: `python -m normsweep.report --from-csv "
              f"{Path(csv).as_posix()} --correction {correction}`.")  # fmt: skip
    write_comparisons(comparisons, Path(out), source)
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
