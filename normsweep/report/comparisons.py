"""The pairwise comparisons table: every pair of configurations that differ in one setting, compared over
seeds (:func:`compare_configs`, with the statistics of :mod:`normsweep.report.statistics`), as a DataFrame,
markdown and text, and written as comparisons.csv / .md (:func:`write_comparisons`, :func:`comparisons_from_csv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from normsweep.base.results import write_text
from normsweep.report.runs import _by_config, read_results_csv
from normsweep.report.statistics import (
    ALPHA,
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


def write_comparisons(comparisons: Comparisons | None, out: Path, source: str | None = None) -> None:
    """comparisons.csv (unrounded) and comparisons.md into ``out``; nothing when there is nothing to compare."""
    if comparisons is not None:
        write_text(out / "comparisons.csv", comparisons.table.to_csv(index=False))
        write_text(out / "comparisons.md", comparisons_markdown(comparisons, source))


def comparisons_from_csv(csv: str | Path, out: str | Path, correction: str = DEFAULT_CORRECTION) -> Comparisons | None:
    """Write comparisons.csv/.md into ``out`` from a results.csv alone (the runs need not exist any more)."""
    comparisons = compare_configs(read_results_csv(csv), correction=correction)
    Path(out).mkdir(parents=True, exist_ok=True)
    source = (f"From `{Path(csv).as_posix()}`, the runs' table: `python -m normsweep.report --from-csv "
              f"{Path(csv).as_posix()} --correction {correction}`.")  # fmt: skip
    write_comparisons(comparisons, Path(out), source)
    return comparisons
