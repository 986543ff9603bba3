"""The Optuna search through normsweep's Hydra sweeper: resumable, pruned, failure-tolerant, per norm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from normsweep.search.trials import split_overrides, to_distribution

from . import warm_python
from .conftest import REPO, compose_config, small_data_args

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_hydra_sweep_syntax_becomes_optuna_distributions() -> None:
    d = to_distribution("optimizer.lr", "tag(log, interval(1e-3, 1.0))")
    assert d == optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    assert to_distribution("model.dropout", "interval(0.0, 0.2)") == optuna.distributions.FloatDistribution(0.0, 0.2)
    assert to_distribution("trainer.batch_size", "choice(128, 256)").choices == (128, 256)
    assert to_distribution("trainer.epochs", "range(1, 4)") == optuna.distributions.IntDistribution(1, 3)
    with pytest.raises(ValueError, match="search.params.model.dropout=.*not a search dimension"):
        to_distribution("model.dropout", "0.1")


def test_command_line_intervals_are_dimensions_other_sweeps_are_a_grid() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(
        ["norm=batch,group", "model.dropout=interval(0, 0.5)", "trainer.epochs=1"]
    )
    dims, grid, fixed = split_overrides(parsed)
    assert list(dims) == ["model.dropout"]
    assert grid == [["norm=batch", "norm=group"]]
    assert fixed == ["trainer.epochs=1"]
    # a choice tagged `search` is a dimension, not a grid axis
    dims, grid, _ = split_overrides(OverridesParser.create().parse_overrides(
        ["norm=batch,group", "norm.groups=tag(search, choice(2, 4))"]))  # fmt: skip
    assert list(dims) == ["norm.groups"] and grid == [["norm=batch", "norm=group"]]
    assert to_distribution("norm.groups", dims["norm.groups"]).choices == (2, 4)


def told(job_dir: Path, number: int) -> optuna.trial.FrozenTrial:
    """What the study records when trial ``number``'s job left ``job_dir`` as it is."""
    from normsweep.search.worker import tell_from_job

    study = optuna.create_study(direction="maximize")
    for _ in range(number + 1):
        trial = study.ask()
    tell_from_job(study, trial, job_dir)
    return study.get_trials()[-1]


@pytest.mark.parametrize(
    "status, trial, state, error",
    [
        ("running", 5, "FAIL", "the job stopped before recording its run (results.json says running); "),
        # A retry whose job refused to start (another config's checkpoint) left the stopped trial's record:
        # the study once blamed the retry for that trial's "RunInterrupted: stopped by signal SIGTERM".
        ("interrupted", 4, "FAIL", "the job stopped before recording its run (trial 4's record, interrupted); "),
        ("interrupted", 5, "FAIL", "RunInterrupted: stopped by signal SIGTERM after epoch 3"),  # its own stop
        ("completed", 4, "COMPLETE", None),  # the same parameters' finished run, skipped by the job: its result
    ],
)
def test_a_trial_is_told_from_its_own_record_only(tmp_path: Path, status, trial, state, error) -> None:
    from normsweep.base.results import RunRecord

    RunRecord(status=status, trial=trial, error="RunInterrupted: stopped by signal SIGTERM after epoch 3" if
              status == "interrupted" else None, final_val_acc=80.0 if status == "completed" else None,
              final_test_acc=79.0).write(tmp_path)  # fmt: skip
    t = told(tmp_path, 5)
    assert (
        t.state.name == state
        and t.user_attrs.get("error", "").startswith(error or "")
        and (error or not t.user_attrs.get("error"))
    )
    if error and error.startswith("the job stopped"):
        assert t.user_attrs["error"].endswith(f"{tmp_path / 'normsweep.log'} says why")


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory), "trainer.threads=1", "trainer.epochs=1"]


def search(tmp_path: Path, data_args: list[str], *args: str, sweep: str = "sweep") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "normsweep", "-m", "search=optuna", f"search.storage=sqlite:///{tmp_path}/optuna.db",
           *data_args, *args, f"hydra.sweep.dir={tmp_path / sweep}"]  # fmt: skip
    proc = warm_python.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    return proc


def studies(tmp_path: Path) -> dict[str, list[optuna.trial.FrozenTrial]]:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
            for s in optuna.get_all_study_summaries(storage)}  # fmt: skip


State = optuna.trial.TrialState


@pytest.mark.slow
def test_search_completes_resumes_without_repeating_and_tops_up_to_n_trials(tmp_path: Path, data_args) -> None:
    first = search(tmp_path, data_args, "search.n_trials=3", "search.pruner=none")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ((name, trials),) = studies(tmp_path).items()
    assert name.startswith("normsweep-batch-") and [t.state for t in trials] == [State.COMPLETE] * 3
    # search.enqueue_current (on by default): trial 0 is what the command runs without a search
    recipe = compose_config(data_args)
    assert trials[0].params == {"model.dropout": recipe.model.dropout, "optimizer.lr": recipe.optimizer.lr}
    assert all(t.params != trials[0].params for t in trials[1:])
    for t in trials:  # the objective is validation accuracy, read from the trial's own job
        res = json.loads((Path(t.user_attrs["job_dir"]) / "results.json").read_text())
        assert t.value == res["final_val_acc"] and res["trial"] == t.number
        assert res["config"]["optimizer"]["lr"] == t.params["optimizer.lr"]
        assert 1e-3 <= t.params["optimizer.lr"] <= 1.0 and 0.0 <= t.params["model.dropout"] <= 0.2
    summary = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())["studies"][0]
    best = max(trials, key=lambda t: t.value)
    assert summary["best_val_acc"] == best.value and summary["best_params"] == best.params
    assert summary["best_test_acc"] == best.user_attrs["final_test_acc"]
    assert (tmp_path / "sweep" / "results.csv").exists()
    assert (tmp_path / "sweep" / "optuna" / name / "history.png").stat().st_size > 5_000

    again = search(tmp_path, data_args, "search.n_trials=3", "search.pruner=none", sweep="sweep2")
    assert again.returncode == 0
    assert len(studies(tmp_path)[name]) == 3  # nothing re-run

    more = search(tmp_path, data_args, "search.n_trials=5", "search.pruner=none")
    assert more.returncode == 0, more.stdout[-3000:]
    trials = studies(tmp_path)[name]
    assert len(trials) == 5 and all(t.state == State.COMPLETE for t in trials)
    assert len({(t.params["optimizer.lr"], t.params["model.dropout"]) for t in trials}) == 5


@pytest.mark.slow
def test_the_current_settings_are_not_enqueued_when_switched_off(tmp_path: Path, data_args) -> None:
    proc = search(tmp_path, data_args, "search.n_trials=1", "search.enqueue_current=false", "search.pruner=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ((trial,),) = studies(tmp_path).values()
    assert trial.params["optimizer.lr"] != compose_config(data_args).optimizer.lr and "enqueued" not in trial.user_attrs


@pytest.mark.slow
def test_same_seed_proposes_the_same_first_trials(tmp_path: Path, data_args) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert search(a, data_args, "search.n_trials=2").returncode == 0
    assert search(b, data_args, "search.n_trials=2").returncode == 0
    (ta,), (tb,) = studies(a).values(), studies(b).values()
    assert [t.params for t in ta] == [t.params for t in tb]


@pytest.mark.slow
def test_a_failing_trial_is_recorded_fail_and_the_others_complete(tmp_path: Path, data_args) -> None:
    # label smoothing >= 1 is rejected when the job starts: those trials fail, the rest run.
    proc = search(tmp_path, data_args, "search.n_trials=4", "search.max_failure_rate=1.0",
                  "trainer.label_smoothing=interval(0.0, 2.0)")  # fmt: skip
    (trials,) = studies(tmp_path).values()
    states = [t.state for t in trials]
    assert len(trials) == 4 and State.FAIL in states and State.COMPLETE in states, states
    for t in trials:
        assert (t.state == State.FAIL) == (t.params["trainer.label_smoothing"] >= 1.0)
        if t.state == State.FAIL:
            assert "trainer.label_smoothing" in t.user_attrs["error"]
    assert proc.returncode != 0  # the sweep reports that some runs did not complete
    assert "failed" in (tmp_path / "sweep" / "results.md").read_text()


@pytest.mark.slow
def test_a_forced_pruner_prunes_and_records_the_epoch(tmp_path: Path, data_args) -> None:
    args = ("search.n_trials=2", "search.pruner=threshold", "search.prune_below=101", "trainer.epochs=3")
    search(tmp_path, data_args, *args)
    (trials,) = studies(tmp_path).values()
    assert [t.state for t in trials] == [State.PRUNED] * 2
    for t in trials:
        res = json.loads((Path(t.user_attrs["job_dir"]) / "results.json").read_text())
        assert res["status"] == "pruned" and res["epochs_completed"] == 1 and "after epoch 1" in res["error"]
        assert t.user_attrs["epochs_completed"] == 1


@pytest.mark.slow
def test_one_study_per_norm(tmp_path: Path, data_args) -> None:
    proc = search(tmp_path, data_args, "search.n_trials=2", "norm=batch,group", "norm.groups=tag(search, choice(2, 4))")
    assert proc.returncode == 0, proc.stdout[-3000:]
    found = studies(tmp_path)
    assert sorted(n.split("-")[1] for n in found) == ["batch", "group"]
    for name, trials in found.items():
        norm = name.split("-")[1]
        assert len(trials) == 2
        for t in trials:
            res = json.loads((Path(t.user_attrs["job_dir"]) / "results.json").read_text())
            assert res["norm"] == norm and res["config"]["norm"]["groups"] == t.params["norm.groups"] in (2, 4)
    table = (tmp_path / "sweep" / "optimization_results.md").read_text()
    assert "norm=batch" in table and "norm=group" in table


@pytest.mark.parametrize(
    "sweep,expected",
    [
        ("tag(log, int(interval(1, 64)))", optuna.distributions.IntDistribution(1, 64, log=True)),
        ("int(interval(2, 9))", optuna.distributions.IntDistribution(2, 9)),
        ("interval(1, 9)", optuna.distributions.FloatDistribution(1.0, 9.0)),
        ("tag(log, interval(1e-4, 1e-2))", optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)),
        ("range(0.1, 0.5, step=0.1)", optuna.distributions.FloatDistribution(0.1, 0.4, step=0.1)),
        ("range(0.0, 1.0, step=0.25)", optuna.distributions.FloatDistribution(0.0, 0.75, step=0.25)),
        ("range(1, 5)", optuna.distributions.IntDistribution(1, 4)),
        ("range(0, 10, step=3)", optuna.distributions.IntDistribution(0, 9, step=3)),
    ],
)
def test_every_sweep_form_means_what_hydra_means(sweep: str, expected) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert to_distribution("x", sweep) == expected
    parsed = OverridesParser.create().parse_override(f"x={sweep}")
    if "range" in sweep:  # Hydra's own expansion of the range: the same values, stop exclusive
        values = [float(v) for v in parsed.sweep_string_iterator()]
        grid = [expected.low + i * (expected.step or 1) for i in range(len(values))]
        assert values == pytest.approx(grid) and max(values) == pytest.approx(expected.high)


def test_an_int_log_interval_proposes_integers() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    dist = to_distribution("trainer.batch_size", "tag(log, int(interval(16, 1024)))")
    values = [study.ask({"b": dist}).params["b"] for _ in range(20)]
    assert all(isinstance(v, int) and 16 <= v <= 1024 for v in values)


def test_an_empty_float_range_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="search.params.x=.*empty range"):
        to_distribution("x", "range(0.5, 0.5, step=0.1)")


@pytest.mark.slow  # seconds: real processes
def test_a_sqlite_study_waits_for_another_writer_instead_of_failing(tmp_path: Path) -> None:
    import sqlite3
    import threading
    import time

    from normsweep.search.storage import open_storage

    db = tmp_path / "study.db"
    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{db}"))
    other = sqlite3.connect(db, check_same_thread=False)  # another process's long write (a busy dashboard, a worker)
    other.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(6.5, other.rollback)  # longer than SQLite's default 5 s wait
    t0 = time.monotonic()  # before the timer: however late the ask starts, it returns after the release
    release.start()
    try:
        trial = study.ask()  # a write: waits for the other writer instead of "database is locked"
        waited = time.monotonic() - t0
    finally:
        release.join()
        other.close()
    assert waited > 5.5 and trial.number == 0
