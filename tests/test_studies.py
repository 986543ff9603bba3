"""``python -m normsweep.studies``: a search's studies read from their storage, without running a trial."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import yaml

from normsweep.search.storage import open_storage

from . import warm_python
from .conftest import REPO

LR = optuna.distributions.FloatDistribution(0.01, 1.0, log=True)


def make_studies(path: Path) -> None:
    """Two studies as a stopped search leaves them: complete, pruned, failed and waiting trials."""
    storage = open_storage(f"journal:{path}")
    a = optuna.create_study(study_name="normsweep-batch-1", storage=storage, direction="maximize")
    a.set_user_attr("overrides", ["norm=batch"])
    a.enqueue_trial({"optimizer.lr": 0.2}, user_attrs={"enqueued": "current settings (search.enqueue_current)"})
    for lr, value, state in [
        (0.2, 83.5, "COMPLETE"),
        (0.5, 81.0, "COMPLETE"),
        (0.05, None, "PRUNED"),
        (0.3, None, "FAIL"),
    ]:
        t = a.ask({"optimizer.lr": LR})
        assert t.params["optimizer.lr"] == lr or t.number > 0
        for epoch in (1, 2):
            t.report(40.0 + epoch + t.number, epoch)
        if value is not None:
            t.set_user_attr("final_test_acc", value - 1)
        if state == "FAIL":
            t.set_user_attr("error", "FloatingPointError: loss is nan | at step 3")
        a.tell(t, value, state=optuna.trial.TrialState[state])
    a.enqueue_trial({"optimizer.lr": 0.3}, user_attrs={"retry_of": 3})
    b = optuna.create_study(study_name="normsweep-layer-2", storage=storage, direction="maximize")
    b.ask({"optimizer.lr": LR})  # RUNNING: a worker still on it


def show(*args: str):
    return warm_python.run([sys.executable, "-m", "normsweep.studies", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=300)  # fmt: skip


def test_show_reads_every_study_and_trial_writes_the_files_and_changes_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "s.journal"
    make_studies(journal)
    before = journal.read_bytes()
    done = show(str(journal), "--out", str(tmp_path / "out"))  # a bare path is a journal file
    assert done.returncode == 0, done.stderr
    assert journal.read_bytes() == before  # reads only
    out = done.stdout
    assert "| normsweep-batch-1 | norm=batch | optimizer.lr=0.2 | 83.50 | 82.50 | 2 / 1 / 1 |" in out
    assert "| normsweep-layer-2 | — | — | — | — | 0 / 0 / 0 |" in out
    rows = {
        line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in out.splitlines() if line.startswith("| ")
    }
    assert "current settings (search.enqueue_current)" in rows["| 0 | COMPLETE"]
    assert "FloatingPointError: loss is nan / at step 3" in rows["| 3 | FAIL"]  # a | in an error keeps the table
    assert "retry of 3" in rows["| 4 | WAITING"] and "| 2 | PRUNED" in rows and "| 0 | RUNNING" in rows
    assert rows["| 2 | PRUNED"].split(" | ")[-2] == "2"  # the last epoch reported
    written = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {"optimization_results.md", "optimization_results.yaml", "trials.md",
            "optuna/normsweep-batch-1/history.png", "optuna/normsweep-batch-1/slice.png"} <= written  # fmt: skip
    summary = yaml.safe_load((tmp_path / "out" / "optimization_results.yaml").read_text())["studies"]
    assert summary[0]["best_val_acc"] == 83.5 and summary[0]["trials"] == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 1}
    assert "retry of 3" in (tmp_path / "out" / "trials.md").read_text()

    one = show(f"journal:{journal}", "--study", "normsweep-layer-2")
    assert one.returncode == 0 and "normsweep-batch-1" not in one.stdout and "normsweep-layer-2" in one.stdout


def test_show_names_what_is_wrong_with_its_arguments(tmp_path: Path) -> None:
    missing = show(str(tmp_path / "nowhere.journal"))
    assert missing.returncode == 2 and f"no study storage at {tmp_path / 'nowhere.journal'}" in missing.stderr
    assert not (tmp_path / "nowhere.journal").exists()  # not created by reading
    journal = tmp_path / "s.journal"
    make_studies(journal)
    unknown = show(str(journal), "--study", "normsweep-group-9")
    assert unknown.returncode == 2
    assert "holds no study normsweep-group-9; it holds: normsweep-batch-1, normsweep-layer-2" in unknown.stderr
