"""What a search's studies hold, read from their storage: best settings, every trial, Optuna's plots.

The sweeper writes these at the end of every search command; ``python -m normsweep.studies
STORAGE [--out DIR]`` writes them at any time, for a search that is still running, was stopped, or
runs on other machines, without running a trial:

* ``optimization_results.yaml`` / ``.md``: each study's best parameters, best validation accuracy,
  the test accuracy of that trial, and its counts of complete / pruned / failed trials;
* ``trials.md``: every trial with its state, values, parameters, last epoch and why it failed;
* ``optuna/<study>/{history,importances,slice}.png``: Optuna's figures.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from omegaconf import OmegaConf

from normsweep.base.credentials import redact
from normsweep.base.errors import NormsweepError
from normsweep.base.results import atomic_write, write_text
from normsweep.search.storage import open_storage, resolve_storage, storage_file
from normsweep.search.trials import FINISHED, JOB_DIR_ATTR

log = logging.getLogger(__name__)


def fmt_value(v: Any) -> str:
    """A parameter's value as the tables show it (floats to 4 significant digits)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def study_summary(study: optuna.Study) -> dict:
    """The study's trial counts per finished state and, once a trial is complete, its best trial."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in FINISHED}
    summary: dict[str, Any] = {"study": study.study_name, "overrides": study.user_attrs.get("overrides", []),
                               "trials": counts}  # fmt: skip
    if counts["COMPLETE"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_params=dict(best.params), best_val_acc=best.value,
                       best_test_acc=best.user_attrs.get("final_test_acc"),
                       best_job_dir=best.user_attrs.get(JOB_DIR_ATTR))  # fmt: skip
    return summary


def summary_markdown(summaries: list[dict]) -> list[str]:
    lines = ["# Best settings per study (objective: final validation accuracy)", "",
             "| study | grid point | best params | best val acc | test acc of that trial | complete / pruned / failed |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for s in summaries:
        params = ", ".join(f"{k}={fmt_value(v)}" for k, v in s.get("best_params", {}).items())
        val = f"{s['best_val_acc']:.2f}" if s.get("best_val_acc") is not None else "—"
        test = f"{s['best_test_acc']:.2f}" if s.get("best_test_acc") is not None else "—"
        t = s["trials"]
        lines.append(f"| {s['study']} | {' '.join(s['overrides']) or '—'} | {params or '—'} | {val} | {test} | "
                     f"{t['COMPLETE']} / {t['PRUNED']} / {t['FAIL']} |")  # fmt: skip
    return lines


def write_summary(summaries: list[dict], out: Path) -> list[str]:
    """``optimization_results.yaml`` and ``.md`` in ``out``; returns the markdown's lines."""
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"studies": summaries}), out / "optimization_results.yaml")
    lines = summary_markdown(summaries)
    write_text(out / "optimization_results.md", "\n".join(lines) + "\n")
    return lines


def trials_markdown(study: optuna.Study) -> list[str]:
    """One row per trial: state, final validation and test accuracy, parameters, last epoch, error."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    lines = [f"## {study.study_name}", "",
             "| trial | state | val acc | test acc | " + " | ".join(keys) + " | last epoch | note |",
             "|---:|---|---:|---:|" + "---:|" * len(keys) + "---:|---|"]  # fmt: skip
    for t in trials:
        test = t.user_attrs.get("final_test_acc") if t.state == optuna.trial.TrialState.COMPLETE else None
        notes = [t.user_attrs.get("enqueued"), f"retry of {t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else None,
                 t.user_attrs.get("error")]  # fmt: skip
        note = "; ".join(n for n in notes if n)
        cells = [str(t.number), t.state.name, f"{t.value:.2f}" if t.value is not None else "—",
                 f"{test:.2f}" if isinstance(test, (int, float)) else "—",
                 *(fmt_value(t.params[k]) if k in t.params else "—" for k in keys),
                 str(max(t.intermediate_values)) if t.intermediate_values else "—", note.replace("|", "/")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_optuna_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optuna's own figures (optimization history, parameter importances, slices) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out.mkdir(parents=True, exist_ok=True)
    written = []
    plots = {"history": ovm.plot_optimization_history, "importances": ovm.plot_param_importances,
             "slice": ovm.plot_slice}  # fmt: skip
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" notices and tight_layout hints
                ax = plot(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.tight_layout()
            # atomic: two search processes that share a storage may write these at the same time
            atomic_write(out / f"{name}.png", lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
            plt.close(fig)
            written.append(out / f"{name}.png")
        except Exception as e:  # e.g. importances need >1 completed trial and >1 distinct value
            log.info("optuna %s plot skipped for %s: %s", name, study.study_name, e)
    return written


def write_studies(studies: list[optuna.Study], out: Path, trials: bool = True) -> list[str]:
    """Everything above for ``studies`` into ``out``; returns the summary's markdown lines."""
    for study in studies:
        write_optuna_plots(study, out / "optuna" / study.study_name)
    lines = write_summary([study_summary(s) for s in studies], out)
    if trials:
        write_text(
            out / "trials.md", "\n".join(["# Every trial", ""] + [r for s in studies for r in trials_markdown(s)])
        )
    return lines


def show(spec: str, out: Optional[Path], names: list[str]) -> str:
    """Every study in the storage ``spec`` (or those named) as markdown, and with ``out`` every file of
    :func:`write_studies` there. Reads only; runs no trial."""
    file = storage_file(spec)
    if file is not None and not file.is_file():
        raise NormsweepError(f"no study storage at {file}: give the search.storage of the search, e.g. journal:PATH "
                             f"or sqlite:///PATH (the default is sqlite:///<launch dir>/optuna/normsweep.db)")  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec)
    found = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    missing = [n for n in names if n not in found]
    if missing or not found:
        held = f"; it holds: {', '.join(found)}" if found else ""
        raise NormsweepError(f"{redact(spec)} holds no study {', '.join(missing)}{held}" if missing else
                             f"{redact(spec)} holds no study")  # fmt: skip
    studies = [optuna.load_study(study_name=n, storage=storage) for n in names or found]
    if out is not None:
        write_studies(studies, out)
    lines = summary_markdown([study_summary(s) for s in studies]) + [""]
    return "\n".join(lines + [row for s in studies for row in trials_markdown(s)])


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m normsweep.studies STORAGE [--out DIR] [--study NAME]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m normsweep.studies",
        description="A search's studies, read from their storage (a running or stopped search too; no trial is run): "
        "each study's best settings and every trial; --out writes optimization_results.md/.yaml, trials.md and "
        "Optuna's plots there.",
    )  # fmt: skip
    parser.add_argument("storage", help="the search.storage: journal:PATH, sqlite:///PATH or a database URL "
                        "(a bare PATH is a journal file)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="directory to write the files into")
    parser.add_argument("--study", action="append", default=[], help="only this study (repeat for more)")
    args = parser.parse_args(argv)
    url = args.storage if ":" in args.storage.split("/")[0] else f"journal:{args.storage}"
    try:
        print(show(resolve_storage(url, Path.cwd()), args.out, args.study))
    except NormsweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
