"""How well does a trial's validation accuracy after epoch k rank its final one? The pruner's argument.

    python docs/search_full/pruning_evidence.py docs/search_full/optuna.journal [more journals or sweep dirs...]

For every study in the journals, over its COMPLETE trials (the ones that ran every epoch), and for
every sweep directory, over its completed runs grouped by norm and number of epochs (runs that differ
in their settings: a screen), prints Spearman's rank correlation between the validation accuracy at
epoch k and the final validation accuracy (the objective), and whether the run that is best at the
end was already in the upper half at epoch k (what a median pruner keeps). A pruner that acts at
epoch k is only as good as this ranking is.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import optuna
from scipy.stats import spearmanr

from normsweep.base.results import RunRecord
from normsweep.report.runs import find_jobs
from normsweep.search.storage import open_storage, resolve_storage

Curve = dict[int, float]  # epoch -> validation accuracy; the last epoch's is the final one


def ranking_table(title: str, curves: list[Curve]) -> list[str]:
    lines = [f"## {title}: {len(curves)} complete runs", ""]
    if len(curves) < 3:
        return lines + ["too few complete runs to rank", ""]
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    finals = [c[max(c)] for c in curves]
    best = curves[max(range(len(curves)), key=finals.__getitem__)]
    lines += ["| epoch k | Spearman ρ (acc at k, final acc) | best run in the upper half at k |", "|---:|---:|---|"]
    for k in epochs:
        at_k = [c[k] for c in curves]
        rho = spearmanr(at_k, finals).statistic
        median = sorted(at_k)[len(at_k) // 2]
        lines.append(f"| {k} | {rho:+.2f} | {'yes' if best[k] >= median else 'no'} |")
    return lines + [""]


def journal_curves(path: str) -> dict[str, list[Curve]]:
    storage = open_storage(resolve_storage(f"journal:{path}", Path.cwd()))
    out = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        out[summary.study_name] = [dict(t.intermediate_values) for t in complete]
    return out


def sweep_curves(sweep_dir: str) -> dict[str, list[Curve]]:
    groups: dict[str, list[Curve]] = defaultdict(list)
    for job in find_jobs(Path(sweep_dir)):
        run = RunRecord.read(job)
        if run.status == "completed" and run.history:
            groups[f"{sweep_dir}: {run.norm}, {run.epochs} epochs"].append({e.epoch: e.val_acc for e in run.history})
    return dict(groups)


def main(paths: list[str]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for path in paths:
        studies = sweep_curves(path) if Path(path).is_dir() else journal_curves(path)
        for title, curves in studies.items():
            print("\n".join(ranking_table(title, curves)))


if __name__ == "__main__":
    main(sys.argv[1:] or ["docs/search_full/optuna.journal"])
