"""Optuna's journal file, kept readable: a torn last record is cut off, damage in the middle repaired.

Optuna's ``JournalFileBackend`` appends one JSON record per line while it holds the journal's
lock (the symlink ``<file>.lock``, taken by every Optuna process that appends: workers,
optuna-dashboard). A writer killed, or out of disk space, in the middle of an append leaves the
start of a record without its newline. Optuna's reader skips a broken *last* line, but the next
append is glued onto it, and after one more no reader of the file gets past it.

normsweep appends through :class:`TailCheckingLock`: Optuna's own lock, which, once held, cuts a
torn tail off before the append goes on (:func:`open_journal` also takes it once when a search
opens the file). Since the check runs under the lock every appender holds, a record another
worker is still writing is never taken for a torn one. Its cost is a ``seek`` to the end and a
one-byte read per append; only a torn file is read further.

A journal broken in the middle (by an older normsweep or another tool) is not rewritten on the
fly: :func:`open_journal` raises :class:`JournalDamaged`, which points to ``python -m
normsweep.search.storage repair FILE`` (:func:`repair`): a backup, then every readable record written back.
Nothing here runs code from the file: records are read with ``json.loads`` only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend, JournalFileSymlinkLock

from normsweep.base.errors import NormsweepError
from normsweep.search.internals import journal_operations, study_id, trial_id

log = logging.getLogger(__name__)

RECORD_START = b'{"op_code":'  # how Optuna writes every record (compact json.dumps, "op_code" first)
REPAIR_COMMAND = "python -m normsweep.storage repair"
_CHUNK = 1 << 16  # read backwards this much at a time to find the start of the last line

Namer = Callable[[str, int], str]  # ("trial" | "study", Optuna's id) -> a name for people


class JournalDamaged(NormsweepError):
    """A journal file that Optuna cannot read whole, and that normsweep will not rewrite on its own."""


# ------------------------------------------------------------------ records, and what a broken one was


def _record(data: bytes) -> Optional[dict]:
    """The record ``data`` holds (one line, without its newline), or None when it is not a whole record."""
    if not data.startswith(RECORD_START):
        return None
    try:
        record = json.loads(data)
    except ValueError:  # a torn or garbled record (JSONDecodeError, invalid UTF-8)
        return None
    return record if isinstance(record, dict) else None


class _Records(BaseJournalBackend):
    """Whole records already read from a journal, for Optuna's replay without touching the file."""

    def __init__(self, records: list[bytes]) -> None:
        self._records = records

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        return (json.loads(r) for r in self._records[log_number_from:])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        raise RuntimeError("a replay of records read from a journal is read-only")


def _namer(backend: BaseJournalBackend) -> Namer:
    """Names Optuna's study and trial ids (``study s``, ``trial 2 of study s``) from a replay of ``backend``."""
    names: dict[tuple[str, int], str] = {}
    try:
        storage = JournalStorage(backend)
        for study in storage.get_all_studies():
            names["study", study_id(study)] = f"study {study.study_name}"
            for t in storage.get_all_trials(study_id(study), deepcopy=False):
                names["trial", trial_id(t)] = f"trial {t.number} of study {study.study_name}"
    except Exception:  # records that Optuna cannot replay: the ids are all there is to name
        pass
    return lambda kind, id_: names.get((kind, id_), f"{kind}_id {id_}")


def _describe(data: bytes, name: Namer) -> str:
    """What the (possibly torn) bytes ``data`` were: ``a set_trial_param record of trial 2 of study s``."""
    op = re.match(rb'\{"op_code":(\d+)[,}]', data)
    if not op:
        if data and RECORD_START.startswith(data[: len(RECORD_START)]):
            return "the first bytes of a record"
        return "bytes that are not a journal record" if data else "an empty line"
    try:
        kind = journal_operations()(int(op[1])).name.lower()
    except ValueError:
        kind = f"op_code {int(op[1])}"
    for key in ("trial", "study"):
        found = re.search(rb'"%s_id":(\d+)[,}]' % key.encode(), data)
        if found:
            return f"a {kind} record of {name(key, int(found[1]))}"
    return f"a {kind} record (its trial or study id was in the lost bytes)"


# ------------------------------------------------------------------ the tail, before every append


def _line_before(f, end: int) -> bytes:
    """The bytes of the open file ``f`` after the last newline before offset ``end``, up to ``end``."""
    start = end
    while start > 0:
        chunk_start = max(0, start - _CHUNK)
        f.seek(chunk_start)
        i = f.read(start - chunk_start).rfind(b"\n")
        if i >= 0:
            start = chunk_start + i + 1
            break
        start = chunk_start
    f.seek(start)
    return f.read(end - start)


def cut_torn_tail(path: Path) -> Optional[str]:
    """Make the journal at ``path`` end with a whole record; call it holding the journal's lock.

    Bytes after the last newline are the start of a record whose writer stopped in the middle:
    they are cut off. A whole record that lost only its newline gets it back. Returns what was
    done, or None for a file that ends with a newline (the usual case: a seek and a one-byte read).
    Bytes that cannot be the start of a record are left alone: :class:`JournalDamaged`.
    """
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return None
        tail = _line_before(f, end)
    if not RECORD_START.startswith(tail[: len(RECORD_START)]):
        raise damaged(path)
    whole = _record(tail) is not None
    with open(path, "rb+") as f:
        if whole:
            f.seek(end)
            f.write(b"\n")
        else:
            f.truncate(end - len(tail))
        f.flush()
        os.fsync(f.fileno())
    what = _describe(tail, _namer(JournalFileBackend(str(path))))
    if whole:
        return f"its last record, {what}, had lost its newline: added it back"
    return f"cut off {len(tail)} bytes of a torn last record, {what}"


class TailCheckingLock(JournalFileSymlinkLock):
    """Optuna's journal lock (the same ``<file>.lock``); once held, a torn tail is cut off (:func:`cut_torn_tail`).

    Optuna's ``JournalFileBackend.append_logs`` takes its lock around every append, so with this
    lock each append of a normsweep worker starts after a whole record.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = Path(path)

    def acquire(self) -> bool:
        super().acquire()
        try:
            done = cut_torn_tail(self.path)
        except BaseException:
            self.release()
            raise
        if done:
            log.warning("journal %s: %s. Its writer was killed or ran out of disk space in the middle of an "
                        "append; a trial it left RUNNING is failed once silent for search.grace_period, and its "
                        "slot reused", self.path, done)  # fmt: skip
        return True


def open_journal(path: Path) -> JournalStorage:
    """Optuna's journal storage on ``path``, appending through :class:`TailCheckingLock`.

    The tail is checked once now, under the lock. A line that is not a record raises
    :class:`JournalDamaged` (with the repair command) rather than Optuna's JSON error, the last
    line included: Optuna's reader skips a broken last line, but after one more append no reader
    could get past it.
    """
    lock = TailCheckingLock(path)
    backend = JournalFileBackend(str(path), lock_obj=lock)  # creates an empty file if there is none
    lock.acquire()  # cuts a torn tail, also for a worker that will find nothing left to append
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            last = _line_before(f, end - 1) if end else b""  # the file now ends with a newline
    finally:
        lock.release()
    if last and _record(last) is None:
        raise damaged(path)
    try:
        return JournalStorage(backend)
    except ValueError:  # Optuna's reader: a JSONDecodeError or "Invalid log format." on an earlier line
        found = scan(path.read_bytes())
        if not found.dropped:
            raise
        raise damaged(path, found) from None  # the message says all; Optuna's JSON error would only add noise


# ------------------------------------------------------------------ damage in the middle, and its repair


@dataclass
class Dropped:
    """Bytes of a journal that are not a whole record."""

    line: int  # 1-based line number in the file
    offset: int  # byte offset in the file
    data: bytes

    def describe(self, name: Namer) -> str:
        return f"line {self.line} (byte {self.offset}): {len(self.data)} bytes, {_describe(self.data, name)}"


@dataclass
class Scan:
    records: list[bytes] = field(default_factory=list)  # every whole record, in order, without newlines
    dropped: list[Dropped] = field(default_factory=list)
    salvaged: int = 0  # whole records found glued after a torn one on the same line


def scan(data: bytes) -> Scan:
    """Every whole record of a journal's bytes, and what is not one.

    A line that is not a record is split where records start (``{"op_code":``, which cannot
    occur inside a record: quotes in strings are escaped), so a record glued after a torn one is kept.
    """
    out, offset = Scan(), 0
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the file ends with a newline (or is empty)
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if _record(line) is not None:
            out.records.append(line)
        else:
            starts = [m.start() for m in re.finditer(re.escape(RECORD_START), line)]
            bounds = ([0] if not starts or starts[0] else []) + starts + [len(line)]
            for a, b in zip(bounds, bounds[1:]):
                if _record(line[a:b]) is not None:
                    out.records.append(line[a:b])
                    out.salvaged += 1
                else:
                    out.dropped.append(Dropped(number, offset + a, line[a:b]))
        offset += len(line) + 1
    return out


def damaged(path: Path, found: Optional[Scan] = None) -> JournalDamaged:
    """The error for a journal that Optuna cannot read whole: where, what, and how to repair it."""
    found = found or scan(path.read_bytes())
    if not found.records:
        return JournalDamaged(f"{path} is not an Optuna journal file: no line of it is a journal record. Check "
                              f"search.storage (journal:PATH names a journal file; a database is sqlite:///PATH)")  # fmt: skip
    first = found.dropped[0].describe(_namer(_Records(found.records))) if found.dropped else "?"
    return JournalDamaged(
        f"journal {path} is damaged: {len(found.dropped)} unreadable part(s), the first at {first}. Optuna "
        f"cannot read it whole, and normsweep does not rewrite it on its own. Stop every worker that uses it, "
        f"then run `{REPAIR_COMMAND} {path}`: it keeps a backup, writes back every readable record "
        f"({len(found.records)} here) and lists what it drops"
    )


def repair(path: Path, say: Callable[[str], None] = print) -> Optional[Path]:
    """Rewrite the journal at ``path`` with every readable record; return the backup of the old file.

    Under the journal's lock: the old file is copied to ``<file>.broken-<time>``, the readable
    records are written to a temporary file, replayed through Optuna's own reader, and the file is
    renamed onto ``path``. A journal with nothing to drop is left untouched (returns None).
    """
    from normsweep.base.results import (
        atomic_write,  # brings torch: imported here, not by every search that opens a journal
    )

    path = Path(path)
    if not path.is_file():
        raise JournalDamaged(f"{path}: no such file; give the path of a journal file (search.storage=journal:PATH)")
    lock = JournalFileSymlinkLock(str(path))  # Optuna's lock: no worker appends while the file is rewritten
    lock.acquire()
    try:
        found = scan(path.read_bytes())
        if not found.dropped:
            say(f"{path}: all {len(found.records)} records are readable; nothing to repair")
            return None
        if not found.records:
            raise damaged(path, found)
        backup = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        atomic_write(backup, lambda tmp: shutil.copy2(path, tmp))  # bytes, permissions and times
        studies: dict[str, int] = {}

        def write_and_replay(tmp: str) -> None:
            Path(tmp).write_bytes(b"".join(r + b"\n" for r in found.records))
            shutil.copymode(path, tmp)  # the workers that shared the file can still open it
            try:
                storage = JournalStorage(JournalFileBackend(tmp))  # what every reader of the file will do
            except Exception as e:
                raise JournalDamaged(f"the readable records of {path} do not replay through Optuna "
                                     f"({type(e).__name__}: {e}); {path} is left as it was") from e  # fmt: skip
            for study in storage.get_all_studies():
                studies[study.study_name] = len(storage.get_all_trials(study_id(study), deepcopy=False))

        atomic_write(path, write_and_replay)
    finally:
        lock.release()
    name = _namer(_Records(found.records))
    glued = f" ({found.salvaged} of them found glued after a torn record)" if found.salvaged else ""
    say(f"repaired {path}: kept {len(found.records)} records{glued}; dropped {len(found.dropped)} unreadable part(s):")
    for d in found.dropped:
        say(f"  {d.describe(name)}")
    say(f"the damaged file is kept as {backup}")
    say("the repaired file reads back through Optuna: "
        + (", ".join(f"study {s} with {n} trials" for s, n in studies.items()) or "no study"))  # fmt: skip
    return backup
