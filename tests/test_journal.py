"""Optuna's journal file survives a torn write (normsweep/search/journal.py).

The faults are made for real: a writer process killed in the middle of an append, or whose
append stops part-way with ENOSPC (``tests/crash_injector.py``, loaded as ``sitecustomize``,
cuts the record on disk to its first half, then kills the process or fails its fsync), a record
another worker is still writing, and a journal glued by Optuna's own backend after a torn record
(what older versions did). After each, the file reads back through Optuna's ``JournalStorage``
and optuna-dashboard, and the search command completes its ``n_trials``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from normsweep.search import journal
from normsweep.search.journal import REPAIR_COMMAND, JournalDamaged, scan
from normsweep.search.storage import open_storage
from normsweep.search.trials import STALE_ATTR

from . import warm_python
from .conftest import REPO, dashboard_trials, small_data_args

optuna.logging.set_verbosity(optuna.logging.WARNING)
State = optuna.trial.TrialState
INJECTOR = Path(__file__).with_name("crash_injector.py")


def read_back(path: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as Optuna's own reader sees them; every line of the file is a whole record."""
    assert scan(path.read_bytes()).dropped == []
    (summary,) = optuna.get_all_study_summaries(JournalStorage(JournalFileBackend(str(path))))
    return optuna.load_study(
        study_name=summary.study_name, storage=JournalStorage(JournalFileBackend(str(path)))
    ).trials


def dashboard_states(path: Path) -> list[str]:
    """Trial states as optuna-dashboard shows them (``optuna-dashboard PATH``, through its JSON API)."""
    pytest.importorskip("optuna_dashboard")
    return [t["state"] for t in dashboard_trials(str(path))[1]]


def run_python(code: str, *args: str, environ: dict | None = None) -> subprocess.CompletedProcess:
    return warm_python.run([sys.executable, "-c", code, *args], cwd=REPO, env=environ or os.environ,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def fault_env(tmp_path: Path, stage: str, record: str = "") -> dict:
    """A process environment that loads the injector, to tear the first journal record containing ``record`` at ``stage``."""
    shim = tmp_path / "injector"
    shim.mkdir(exist_ok=True)
    shutil.copy(INJECTOR, shim / "sitecustomize.py")
    return {**os.environ, "PYTHONPATH": str(shim), "NORMSWEEP_TEST_KILL_AT": f"study.journal:1:{stage}",
            "NORMSWEEP_TEST_RECORD": record}  # fmt: skip


def new_study(path: Path, complete: int = 2) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=open_storage(f"journal:{path}"), direction="maximize")
    for i in range(complete):
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, float(i))
    return study


# ------------------------------------------------------------------ a torn tail


def test_a_torn_tail_left_by_another_worker_is_cut_before_the_next_append(tmp_path: Path, caplog) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path)  # this worker opened the journal before the other one tore it
    trial = study.ask()
    before = path.read_bytes()
    other = run_python("import sys, optuna; from normsweep.search.storage import open_storage; "
                       "optuna.load_study(study_name='s', storage=open_storage(sys.argv[1])).set_user_attr('note', 1)",
                       f"journal:{path}", environ=fault_env(tmp_path, "enospc-append"))  # fmt: skip
    assert other.returncode != 0 and "No space left on device" in other.stderr, other.stderr[-2000:]
    torn = path.read_bytes()
    assert torn.startswith(before) and len(torn) > len(before) and not torn.endswith(b"\n")  # half a record on disk

    with caplog.at_level(logging.WARNING, logger="normsweep.search.journal"):
        study.tell(trial, 5.0)  # this worker's next append
    assert (
        f"journal {path}: cut off {len(torn) - len(before)} bytes of a torn last record, a set_study_user_attr record"
        in caplog.text
    )
    trials = read_back(path)
    assert [(t.state, t.value) for t in trials] == [(State.COMPLETE, 0.0), (State.COMPLETE, 1.0), (State.COMPLETE, 5.0)]
    assert (
        "note"
        not in optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path)))).user_attrs
    )
    assert dashboard_states(path) == ["Complete"] * 3


@pytest.mark.parametrize("lost", [17, 1], ids=["torn", "newline-lost"])
def test_opening_a_journal_cuts_a_torn_record_naming_its_trial_or_keeps_a_whole_one(
    tmp_path: Path, caplog, lost: int
) -> None:
    path = tmp_path / "study.journal"
    new_study(path)
    healthy = path.read_bytes()
    path.write_bytes(healthy[:-lost])  # the case: the last record (trial 1 told COMPLETE) lost 17 bytes

    with caplog.at_level(logging.WARNING, logger="normsweep.search.journal"):
        study = optuna.load_study(study_name="s", storage=open_storage(f"journal:{path}"))
    record = "a set_trial_state_values record of trial 1 of study s"
    if lost == 1:  # only the newline was lost: the record is whole and kept
        assert f"its last record, {record}, had lost its newline: added it back" in caplog.text
        assert path.read_bytes() == healthy
    else:
        last_start = healthy.rindex(b"\n", 0, len(healthy) - 1) + 1
        assert (
            f"journal {path}: cut off {len(healthy) - lost - last_start} bytes of a torn last record, {record}"
            in caplog.text
        )
        assert path.read_bytes() == healthy[:last_start]
    trial = study.ask()  # the study goes on
    study.tell(trial, 2.0)
    assert [t.state for t in read_back(path)] == [
        State.COMPLETE,
        State.RUNNING if lost > 1 else State.COMPLETE,
        State.COMPLETE,
    ]


def test_a_torn_record_longer_than_one_read_is_cut_whole(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path)
    kept = path.read_bytes()
    study.set_user_attr("notes", "x" * 300_000)  # a record of several of the check's 64 KiB reads
    path.write_bytes(path.read_bytes()[:-17])
    study = optuna.load_study(study_name="s", storage=open_storage(f"journal:{path}"))
    assert path.read_bytes() == kept and "notes" not in study.user_attrs


def test_a_record_another_worker_is_still_writing_is_not_taken_for_a_torn_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, complete=0)
    trial = study.ask()
    theirs = json.dumps({"op_code": 8, "worker_id": "another-worker", "trial_id": trial._trial_id,
                         "user_attr": {"theirs": 1}}, separators=(",", ":")).encode() + b"\n"  # fmt: skip
    other = JournalFileSymlinkLock(str(path))  # another worker in the middle of its append: it holds the lock
    other.acquire()
    with open(path, "ab") as f:
        f.write(theirs[: len(theirs) // 2])
    waiting = threading.Event()
    real_acquire = JournalFileSymlinkLock.acquire

    def acquire(self) -> bool:  # this worker's append reaches the lock
        waiting.set()
        return real_acquire(self)

    monkeypatch.setattr(JournalFileSymlinkLock, "acquire", acquire)
    mine = threading.Thread(target=lambda: trial.set_user_attr("mine", 2))
    mine.start()
    assert waiting.wait(timeout=60)
    with open(path, "ab") as f:  # the other worker finishes its record, then releases its lock
        f.write(theirs[len(theirs) // 2 :])
    other.release()
    mine.join(timeout=60)
    assert not mine.is_alive()
    (read,) = read_back(path)
    assert read.user_attrs == {"theirs": 1, "mine": 2}


@pytest.mark.parametrize("tail, message", [(b"\0" * 300, "is damaged: 1 unreadable part\\(s\\), the first at line 8"),
                                           (None, "is not an Optuna journal file")], ids=["zeros", "sqlite"])  # fmt: skip
def test_bytes_that_cannot_be_a_torn_record_are_never_cut(tmp_path: Path, tail: bytes | None, message: str) -> None:
    path = tmp_path / "study.journal"
    if tail is None:  # a database given as journal:PATH by mistake
        optuna.create_study(storage=f"sqlite:///{path}")
    else:  # a power cut can leave zeros where the last write was
        new_study(path)
        path.write_bytes(path.read_bytes() + tail)
    before = path.read_bytes()
    with pytest.raises(JournalDamaged, match=message):
        open_storage(f"journal:{path}")
    assert path.read_bytes() == before


# ------------------------------------------------------------------ damage in the middle, and its repair


def glue_like_an_older_version(path: Path, appends: int) -> bytes:
    """The issue's journal: the last record torn, then appends through Optuna's plain backend glue onto it."""
    healthy = path.read_bytes()
    path.write_bytes(healthy[:-17])
    plain = JournalFileBackend(str(path))
    for i in range(appends):
        plain.append_logs([{"op_code": 2, "worker_id": "old", "study_id": 0, "user_attr": {f"after_{i}": i}}])
    return path.read_bytes()


@pytest.mark.parametrize("appends", [1, 2], ids=["glued-last-line", "broken-in-the-middle"])
def test_a_damaged_journal_is_refused_untouched_with_the_repair_command(tmp_path: Path, appends: int) -> None:
    path = tmp_path / "study.journal"
    new_study(path)
    damaged = glue_like_an_older_version(path, appends)
    if appends > 1:  # Optuna's reader cannot get past it
        with pytest.raises(ValueError):
            JournalStorage(JournalFileBackend(str(path)))
    # (with one glued append Optuna still reads it: the broken line is the last, and skipped; one more
    # append, and it never would again: normsweep refuses to make it)
    with pytest.raises(JournalDamaged) as refused:
        open_storage(f"journal:{path}")
    assert "line 7 (byte" in str(refused.value) and "a set_trial_state_values record of trial 1 of study s" in str(
        refused.value
    )
    assert f"`{REPAIR_COMMAND} {path}`" in str(refused.value)
    assert path.read_bytes() == damaged


def repair(path: Path) -> subprocess.CompletedProcess:
    return warm_python.run([sys.executable, "-m", "normsweep.storage", "repair", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_repair_keeps_a_backup_writes_every_readable_record_and_says_what_it_dropped(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    new_study(path)
    damaged = glue_like_an_older_version(path, appends=2)
    path.chmod(0o664)  # shared by a group of users' workers
    done = repair(path)
    assert done.returncode == 0, done.stderr
    (backup,) = tmp_path.glob("study.journal.broken-*")
    assert backup.read_bytes() == damaged
    lines = damaged.split(b"\n")  # 6 whole records, the torn one with the first append glued on, the second
    offset, torn = sum(len(line) + 1 for line in lines[:6]), lines[6].rindex(b'{"op_code":')
    assert (
        f"repaired {path}: kept 8 records (1 of them found glued after a torn record); dropped 1 unreadable part(s):"
        in done.stdout
    )
    assert f"line 7 (byte {offset}): {torn} bytes, a set_trial_state_values record of trial 1 of study s" in done.stdout
    assert f"the damaged file is kept as {backup}" in done.stdout
    assert path.stat().st_mode & 0o777 == backup.stat().st_mode & 0o777 == 0o664
    trials = read_back(path)  # trial 1's COMPLETE record was the torn one: it is RUNNING, as after a dead worker
    assert [t.state for t in trials] == [State.COMPLETE, State.RUNNING]
    study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    assert study.user_attrs == {"after_0": 0, "after_1": 1}  # the record glued onto the torn one was kept
    assert dashboard_states(path) == ["Complete", "Running"]
    repaired, said = path.read_bytes(), []
    assert journal.repair(path, say=said.append) is None  # a healthy journal is never rewritten
    assert said == [f"{path}: all 8 records are readable; nothing to repair"]
    assert path.read_bytes() == repaired and len(list(tmp_path.glob("study.journal.broken-*"))) == 1


# ------------------------------------------------------------------ the search command after each fault


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory), "trainer.epochs=1", "trainer.threads=1", "trainer.progress=false"]


def search(path: Path, n_trials: int, data_args: list[str], sweep: Path, environ: dict | None = None):
    args = ["-m", "normsweep", "-m", "search=optuna", f"search.storage=journal:{path}", f"search.n_trials={n_trials}",
            "search.pruner=none", "search.heartbeat_interval=5", "search.grace_period=10", *data_args,
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    return warm_python.run([sys.executable, *args], cwd=REPO, env=environ or os.environ, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


# A worker as the search runs one: it takes a trial slot, and its first heartbeat is the append that is torn.
TAKE_A_TRIAL_AND_BEAT = """
import sys, optuna
from normsweep.config import SearchConfig
from normsweep.search.trials import heartbeat, take_trial, to_distribution
from normsweep.search.storage import open_storage
spec, n_trials = sys.argv[1], int(sys.argv[2])
cfg = SearchConfig(n_trials=n_trials, heartbeat_interval=5, grace_period=10)
(summary,) = optuna.get_all_study_summaries(open_storage(spec))
study = optuna.load_study(study_name=summary.study_name, storage=open_storage(spec))
trial = take_trial(study, spec, cfg, {k: to_distribution(k, v) for k, v in cfg.params.items()})
with heartbeat(study, trial, cfg.heartbeat_interval):
    pass
"""


@pytest.mark.slow
def test_the_search_completes_after_enospc_and_after_a_kill_in_the_middle_of_journal_appends(
    tmp_path: Path, data_args
) -> None:
    path = tmp_path / "study.journal"
    # ENOSPC part-way through a heartbeat's append: that heartbeat is lost (the worker logs it and
    # goes on), and its next append first cuts the torn record off.
    first = search(
        path, 2, data_args, tmp_path / "sweep", environ=fault_env(tmp_path, "enospc-append", "normsweep:heartbeat")
    )
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert "heartbeat not recorded: [Errno 28] No space left on device" in out
    assert f"journal {path}: cut off" in out and "bytes of a torn last record, a set_trial_system_attr record" in out
    assert [t.state for t in read_back(path)] == [State.COMPLETE] * 2
    assert dashboard_states(path) == ["Complete"] * 2

    # Another worker is killed in the middle of its first heartbeat's append: half a record on disk,
    # Optuna's lock still held, its trial RUNNING. The same command, asking for one more trial, waits
    # out Optuna's grace period for the lock (30 s), cuts the record, fails the silent trial and reuses its slot.
    killed = run_python(
        TAKE_A_TRIAL_AND_BEAT, f"journal:{path}", "3", environ=fault_env(tmp_path, "mid-append", "normsweep:heartbeat")
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not path.read_bytes().endswith(b"\n") and Path(f"{path}.lock").is_symlink()
    second = search(path, 3, data_args, tmp_path / "sweep")  # the same command, one trial more
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"journal {path}: cut off" in out and "presumed dead" in out
    trials = read_back(path)
    assert [t.state for t in trials] == [State.COMPLETE, State.COMPLETE, State.FAIL, State.COMPLETE]
    assert trials[2].system_attrs[STALE_ATTR] and "no heartbeat" in trials[2].user_attrs["error"]
    assert dashboard_states(path) == ["Complete", "Complete", "Fail", "Complete"]


@pytest.mark.slow
def test_the_search_stops_on_a_damaged_journal_and_names_the_repair(tmp_path: Path, data_args) -> None:
    path = tmp_path / "study.journal"
    new_study(path)
    damaged = glue_like_an_older_version(path, appends=2)
    stopped = search(path, 3, data_args, tmp_path / "sweep")
    assert stopped.returncode != 0
    assert f"journal {path} is damaged" in stopped.stderr and f"`{REPAIR_COMMAND} {path}`" in stopped.stderr
    assert "JSONDecodeError" not in stopped.stderr  # the message, not Optuna's parse error
    assert path.read_bytes() == damaged
