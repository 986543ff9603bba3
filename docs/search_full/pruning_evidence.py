"""How well does a trial's validation accuracy after epoch k rank its final one? The pruner's argument.

    python docs/search_full/pruning_evidence.py docs/search_full/optuna.journal [more journals...]

For every study in the journals, over its COMPLETE trials (the ones that ran every epoch), prints
Spearman's rank correlation between the validation accuracy reported at epoch k and the final
validation accuracy (the objective), and whether the trial that is best at the end was already in
the upper half at epoch k (what a median pruner keeps). A pruner that acts at epoch k is only as good
as this ranking is.
"""

from __future__ import annotations

import sys

import optuna
from scipy.stats import spearmanr

from normsweep.storage import open_storage, resolve_storage
from pathlib import Path


def ranking_table(study: optuna.Study) -> list[str]:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    epochs = sorted(set.intersection(*(set(t.intermediate_values) for t in trials))) if trials else []
    lines = [f"## {study.study_name}: {len(trials)} complete trials", ""]
    if len(trials) < 3:
        return lines + ["too few complete trials to rank", ""]
    finals = [t.value for t in trials]
    best = max(trials, key=lambda t: t.value)
    lines += ["| epoch k | Spearman ρ (acc at k, final acc) | best trial in the upper half at k |", "|---:|---:|---|"]
    for k in epochs:
        at_k = [t.intermediate_values[k] for t in trials]
        rho = spearmanr(at_k, finals).statistic
        median = sorted(at_k)[len(at_k) // 2]
        lines.append(f"| {k} | {rho:+.2f} | {'yes' if best.intermediate_values[k] >= median else 'no'} |")
    return lines + [""]


def main(paths: list[str]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for path in paths:
        storage = open_storage(resolve_storage(f"journal:{path}", Path.cwd()))
        for summary in optuna.get_all_study_summaries(storage):
            print("\n".join(ranking_table(optuna.load_study(study_name=summary.study_name, storage=storage))))


if __name__ == "__main__":
    main(sys.argv[1:] or ["docs/search_full/optuna.journal"])
