"""How busy search workers keep the cores: worker idle time between trials, measured.

    python benchmarks/search_utilisation.py [--data-root PATH] [--workers 2] [--n-trials 10] [--epochs 4]
                                            [--train-size 2000] [--old-code DIR]

Runs one Optuna search (median pruner: trials pruned after different epochs, so they differ in
length, as in a real search) through ``hydra/launcher=joblib`` with ``search.workers=N``, and reads
every trial's start and end back from the study. Reported:

* **workers** (measured): per worker, the seconds between the end of one of its trials and the
  start of its next (asking, composing the job, telling), and the share of the search's wall time
  the N workers spent inside trials;
* **batch-at-a-time** (computed from the same trials): the idle time of the schedule of a sweeper
  that launches N trials and waits for the slowest before asking again (Hydra's Optuna sweeper
  with ``n_jobs=N``): each batch costs its longest trial, the others' workers wait out the
  difference;
* **one at a time** (measured with ``--old-code DIR``, normsweep as it was before
  ``search.workers``: ``git archive 7f55098 | tar -x -C DIR && ln -s ../conf DIR/normsweep/conf``,
  the link because it reads its configs as the package ``normsweep.conf``): the same command
  through the same launcher, which then ran one trial at a time, unpruned (its pruning needed the
  basic launcher); N - 1 cores idle throughout.

Results go to benchmarks/results/search_utilisation-<host>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def search_command(args, code: Path, storage: Path, sweep: Path, workers: bool) -> list[str]:
    cmd = [sys.executable, "-m", "normsweep", "-m", "search=optuna", "hydra/launcher=joblib",
           f"hydra.launcher.n_jobs={args.workers}", f"search.storage=journal:{storage}", f"search.n_trials={args.n_trials}",
           "search.pruner=median", "search.pruner_startup_trials=2", f"trainer.epochs={args.epochs}",
           f"data.root={Path(args.data_root).resolve()}", f"data.train_size={args.train_size}", "data.val_size=1000",
           "data.test_size=1000", "trainer.progress=false", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    return cmd + ([f"search.workers={args.workers}"] if workers else [])


def run_search(cmd: list[str], code: Path, log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.monotonic()
    with log.open("w") as out:
        subprocess.run(cmd, cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - t0


def trials_of(storage: Path) -> list:
    import optuna

    from normsweep.search.storage import open_storage

    st = open_storage(f"journal:{storage}")
    (summary,) = optuna.get_all_study_summaries(st)
    return [t for t in optuna.load_study(study_name=summary.study_name, storage=st).get_trials() if t.datetime_complete]


def seconds(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds()


def worker_gaps(trials: list) -> dict[str, list[float]]:
    """Per worker, the seconds between the end of each of its trials and the start of its next."""
    by_worker: dict[str, list] = {}
    for t in sorted(trials, key=lambda t: t.datetime_start):
        by_worker.setdefault(t.user_attrs["worker"], []).append(t)
    return {
        w: [seconds(a.datetime_complete, b.datetime_start) for a, b in zip(ts, ts[1:])] for w, ts in by_worker.items()
    }


def batch_idle(durations: list[float], n: int) -> tuple[float, float]:
    """(worker idle seconds, wall seconds) of running ``durations`` in order, ``n`` at a time, each batch waiting for its slowest."""
    batches = [durations[i : i + n] for i in range(0, len(durations), n)]
    return sum(max(b) * n - sum(b) for b in batches), sum(max(b) for b in batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10-jpg"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-trials", type=int, default=10)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--old-code", help="a checkout of normsweep before search.workers, to measure it too")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="search-utilisation-"))
    load = os.getloadavg()[0]

    wall = run_search(search_command(args, REPO, work / "new.journal", work / "new", True), REPO, work / "new.log")
    trials = trials_of(work / "new.journal")
    durations = [seconds(t.datetime_start, t.datetime_complete) for t in sorted(trials, key=lambda t: t.number)]
    gaps = worker_gaps(trials)
    all_gaps = [g for gs in gaps.values() for g in gs]
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    span = seconds(first, last)
    busy = sum(durations) / (span * args.workers)
    b_idle, b_wall = batch_idle(durations, args.workers)
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    lines = [
        f"# Search workers: utilisation on {socket.gethostname()} ({len(os.sched_getaffinity(0))} cores, "
        f"load average {load:.1f} at the start)", "",
        f"{args.n_trials} trials, {args.epochs} epochs, median pruner, {args.train_size} training images, "
        f"`hydra/launcher=joblib hydra.launcher.n_jobs={args.workers}`; trials: {states}.", "",
        "| schedule | how | wall s (first trial start to last end) | worker idle s between trials | busy share of N workers |",
        "|---|---|---|---|---|",
        f"| search.workers={args.workers} | measured | {span:.1f} | {sum(all_gaps):.1f} total, max {max(all_gaps, default=0):.2f} "
        f"per gap ({len(all_gaps)} gaps) | {busy:.0%} |",
        f"| batch of {args.workers}, wait for the slowest | computed from the same trials | {b_wall:.1f} | {b_idle:.1f} | "
        f"{sum(durations) / (b_wall * args.workers):.0%} |",
    ]  # fmt: skip
    if args.old_code:
        old_wall = run_search(search_command(args, Path(args.old_code), work / "old.journal", work / "old", False),
                              Path(args.old_code), work / "old.log")  # fmt: skip
        old = trials_of(work / "old.journal")
        old_span = seconds(min(t.datetime_start for t in old), max(t.datetime_complete for t in old))
        old_busy = sum(seconds(t.datetime_start, t.datetime_complete) for t in old)
        lines.append(f"| one at a time, unpruned (before search.workers) | measured | {old_span:.1f} | "
                     f"{old_span * args.workers - old_busy:.1f} ({args.workers - 1} of {args.workers} cores idle) | "
                     f"{old_busy / (old_span * args.workers):.0%} |")  # fmt: skip
        lines.append(f"\nWhole command: {wall:.0f} s with search.workers={args.workers}, {old_wall:.0f} s before.")
    else:
        lines.append(f"\nWhole command: {wall:.0f} s (start-up of the workers included).")
    text = "\n".join(lines) + "\n"
    out = REPO / "benchmarks" / "results" / f"search_utilisation-{socket.gethostname()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, f"\nwrote {out}; runs in {work}", sep="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
