"""Where Optuna studies live, and the lock that lets several workers share one study exactly.

``search.storage`` is one of:

* ``null``: ``sqlite:///<launch dir>/optuna/normsweep.db`` (one machine);
* ``journal:PATH``: Optuna's journal file, for several workers on one machine or a shared
  filesystem (the recommended multi-worker storage);
* any SQLAlchemy URL: ``sqlite:///PATH``, ``postgresql://USER@HOST:PORT/DB``, ``mysql://...``.

Workers that share a study take trial slots under :func:`trial_slot_lock`: "count the trials, and
ask for a new one if fewer than ``search.n_trials`` exist" is one critical section, so the workers
together run exactly ``n_trials`` trials and each proposal is made after every earlier one exists.
The lock is a file lock for journal and SQLite files (``<file>.normsweep-lock``), a PostgreSQL
advisory lock or a MySQL named lock for database servers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".normsweep-lock"  # beside the storage file; not Optuna's own "<file>.lock"
SQLITE_BUSY_TIMEOUT_S = 60  # how long a SQLite write waits for another process's to finish


def resolve_storage(url: Optional[str], base: Path) -> str:
    """The storage spec with the default filled in and relative paths made absolute."""
    if not url:
        path = base / "optuna" / "normsweep.db"
        return f"sqlite:///{path}"
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :]).expanduser()
        return f"journal:{path if path.is_absolute() else base / path}"
    return url


def storage_file(spec: str) -> Optional[Path]:
    """The file a journal or SQLite spec stores the studies in; None for a database server."""
    if spec.startswith("journal:"):
        return Path(spec[len("journal:") :])
    if spec.startswith("sqlite:///"):
        return Path(spec[len("sqlite:///") :])
    return None


def open_storage(spec: str):
    """The Optuna storage for a spec from :func:`resolve_storage`."""
    if spec.startswith("journal:"):  # appends cut a torn tail off first; damage stops with the repair command
        from normsweep.search.journal import open_journal

        path = Path(spec[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return open_journal(path)
    if spec.startswith("sqlite:///"):
        Path(spec[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import RDBStorage

    # Optuna creates its tables when it first opens a database; workers starting together on an
    # empty one would race to create them (a duplicate-key error on PostgreSQL), so one at a time.
    # SQLite lets one writer in at a time and makes the others wait 5 s by default; heartbeats, a
    # second worker and optuna-dashboard all write or read the file, so a busy machine needs longer.
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if spec.startswith("sqlite:") else None
    with trial_slot_lock(spec, "normsweep: create the schema"):
        return RDBStorage(spec, engine_kwargs=engine_kwargs)


def _lock_key(study_name: str) -> int:
    """A signed 64-bit key for a database advisory lock, the same in every worker."""
    return int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def trial_slot_lock(spec: str, study_name: str) -> Iterator[None]:
    """Hold the lock that serializes "count trials, then ask" among all workers of ``study_name``.

    ``study_name`` only keys the lock: any name gives a lock shared by every worker that uses it.
    """
    path = storage_file(spec)
    if path is not None:
        from filelock import FileLock

        with FileLock(f"{path}{LOCK_SUFFIX}"):
            yield
        return
    dialect = spec.split(":", 1)[0].split("+", 1)[0]
    if dialect not in ("postgresql", "mysql", "mariadb"):
        log.warning(
            "search.storage %s: no cross-worker lock for %s; with several workers the trial count may "
            "overshoot search.n_trials (use journal:PATH or PostgreSQL for exact counts)", spec, dialect
        )  # fmt: skip
        yield
        return
    import sqlalchemy as sa

    key = _lock_key(study_name)
    if dialect == "postgresql":  # a session-level advisory lock, held by this connection
        lock, unlock, params = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", {"k": key}
    else:  # MySQL / MariaDB named lock, waiting as long as it takes
        lock, unlock, params = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", {"k": f"normsweep-{key:x}"[:64]}
    engine = sa.create_engine(spec, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(lock), params)
            try:
                yield
            finally:
                conn.execute(sa.text(unlock), params)
    finally:
        engine.dispose()


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m normsweep.storage repair FILE``: rewrite a damaged journal file with every readable record."""
    import argparse

    from normsweep.base.errors import NormsweepError
    from normsweep.search.journal import repair

    parser = argparse.ArgumentParser(prog="python -m normsweep.storage", description="Maintain a study storage file.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "repair", help="keep a backup of a journal file, write back every record that can be read, list what is dropped"
    ).add_argument("file", type=Path, help="the journal file (search.storage=journal:FILE)")
    args = parser.parse_args(argv)
    try:
        repair(args.file)
    except NormsweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
