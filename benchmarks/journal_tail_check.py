"""Cost of the torn-tail check that precedes every append to a journal file (normsweep/search/journal.py).

    python benchmarks/journal_tail_check.py [--dir DIR] [--records 200000] [--appends 2000]

Builds a journal of ``--records`` records (about 150 bytes each, as heartbeats are) in DIR
(default: a temporary directory), then times, alternating in rounds so that machine noise hits
both, ``--appends`` appends through Optuna's ``JournalFileBackend`` with its own lock and with
normsweep's :class:`~normsweep.search.journal.TailCheckingLock`, and the check alone on the healthy file.
Prints the median time per call of each, and the difference per append.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from optuna.storages.journal import JournalFileBackend

from normsweep.search.journal import TailCheckingLock, cut_torn_tail

PLAIN = "Optuna's lock"


def record(i: int) -> dict:
    return {"op_code": 9, "worker_id": "0" * 36 + "-140406971222912", "trial_id": i % 100,
            "system_attr": {"normsweep:heartbeat": 1764500000.0 + i}}  # fmt: skip


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "bench.journal"
        plain = JournalFileBackend(str(path))
        plain.append_logs([record(i) for i in range(args.records)])
        checked = JournalFileBackend(str(path), lock_obj=TailCheckingLock(path))
        n = args.appends // args.rounds
        times: dict[str, list[float]] = {PLAIN: [], "TailCheckingLock": [], "check alone": []}
        for _ in range(args.rounds):
            times[PLAIN].append(per_call(lambda i: plain.append_logs([record(i)]), n))
            times["TailCheckingLock"].append(per_call(lambda i: checked.append_logs([record(i)]), n))
            times["check alone"].append(per_call(lambda i: cut_torn_tail(path), n * 10))
        size = path.stat().st_size / 1e6
    print(f"journal of {size:.0f} MB in {args.dir or tempfile.gettempdir()}; median of {args.rounds} rounds:")
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:>16}: {v:9.1f} us per call")
    print(f"  the check adds {med['TailCheckingLock'] - med[PLAIN]:.1f} us per append")


if __name__ == "__main__":
    main()
