"""The adoption check of a search's candidate: its seeds against the recipe's, on validation and test.

    python docs/search_full/adoption.py CANDIDATE RECIPE [RECIPE ...] [--norm group] [--out FILE]

CANDIDATE and each RECIPE are a sweep directory (`python -m normsweep -m ... trainer.seed=0,1,2`)
or a results.csv written by `python -m normsweep.report` (e.g. docs/tuned_3seeds_results.csv, the
recipes' published runs); `--norm` keeps that norm's completed runs of each. Per side: the seeds,
mean ± std of the final validation accuracy (the search's objective and the adoption rule's), the
final test accuracy and the flip-TTA test accuracy; per recipe, Welch's comparison (normsweep.report.statistics's
`welch`) of candidate − recipe. The rule (issue 19): adopt only if the candidate's validation mean
beats the recipe's. A recipe given twice (e.g. as published and re-run under the candidate's
conditions) is compared separately, so a difference in precision or machine shows as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from normsweep.base.results import write_text
from normsweep.report.runs import collect
from normsweep.report.statistics import welch

METRICS = {"final_val_acc": "final val", "final_test_acc": "final test", "final_test_acc_tta": "test, flip TTA"}


def load(source: str, norm: str | None) -> pd.DataFrame:
    """The completed runs of a sweep directory or a report's results.csv, of ``norm`` if given."""
    path = Path(source)
    if not path.exists():
        raise SystemExit(f"error: {source} does not exist (a sweep directory or a results.csv)")
    df = pd.read_csv(path) if path.is_file() else collect([path])
    df = df[df["status"] == "completed"]
    if norm:
        df = df[df["norm"] == norm]
    if len(df) < 2:
        raise SystemExit(f"error: {source} has {len(df)} completed run(s){f' of norm={norm}' if norm else ''}; "
                         "the comparison needs at least 2 seeds")  # fmt: skip
    return df.sort_values("seed")


def side(label: str, df: pd.DataFrame) -> str:
    cells = [f"{df[m].mean():.2f} ± {df[m].std(ddof=1):.2f} ({' / '.join(f'{v:.2f}' for v in df[m])})" for m in METRICS]
    return f"| {label} | {', '.join(str(int(s)) for s in df['seed'])} | " + " | ".join(cells) + " |"


def report(candidate: str, recipes: list[str], norm: str | None) -> str:
    cand = load(candidate, norm)
    lines = [
        "# Adoption check: the search's candidate against its recipe",
        "",
        f"`python docs/search_full/adoption.py {candidate} {' '.join(recipes)}{f' --norm {norm}' if norm else ''}`",
        "",
        "Mean ± std over seeds (per seed in brackets), %:",
        "",
        "| runs | seeds | " + " | ".join(METRICS.values()) + " |",
        "|---|---|" + "---:|" * len(METRICS),
        side(f"candidate: {candidate}", cand),
    ]
    others = [(source, load(source, norm)) for source in recipes]
    lines += [side(f"recipe: {source}", df) for source, df in others]
    lines += ["", "Candidate − recipe, Welch (95% interval, two-sided p):", "",
              "| recipe | " + " | ".join(METRICS.values()) + " | adopt (val mean above the recipe's) |",
              "|---|" + "---:|" * len(METRICS) + "---|"]  # fmt: skip
    for source, df in others:
        cells = []
        for m in METRICS:
            w = welch(cand[m].dropna(), df[m].dropna())
            cells.append(f"{w['diff']:+.2f} [{w['ci_low']:+.2f}, {w['ci_high']:+.2f}], p = {w['p_value']:.2f}")
        adopt = "yes" if cand["final_val_acc"].mean() > df["final_val_acc"].mean() else "no"
        lines.append(f"| {source} | " + " | ".join(cells) + f" | {adopt} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", help="sweep directory or results.csv of the candidate's seeds")
    parser.add_argument("recipes", nargs="+", help="sweep directories or results.csv of the recipe's seeds")
    parser.add_argument("--norm", help="keep only this norm's runs (e.g. of docs/tuned_3seeds_results.csv)")
    parser.add_argument("--out", help="write the markdown here too")
    args = parser.parse_args(argv)
    text = report(args.candidate, args.recipes, args.norm)
    print(text)
    if args.out:
        write_text(args.out, text)  # atomic, like every file normsweep writes
    return 0


if __name__ == "__main__":
    sys.exit(main())
