"""Experiment trackers and the Optuna dashboard, read back through each library's own reader API.

TensorBoard through its ``EventAccumulator`` / ``EventMultiplexer`` (what ``tensorboard --logdir``
reads), MLflow through ``MlflowClient`` (what ``mlflow ui`` reads), optuna-dashboard through its own
WSGI app and JSON API (what its web page reads). Nothing here greps a file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from normsweep.config import LoggerConfig, LoggerKind, NormsweepError, register_configs
from normsweep.data import CLASSES
from normsweep.run.trackers import EPOCH_METRICS, MLFLOW_RUN_FILE, TrackerMissing, make_tracker
from normsweep.run.train import EpochStats

from . import crash_injector, warm_python
from .conftest import REPO, dashboard_trials, hparams, scalars, small_data_args

TIMEOUT = 3600  # generous: these CLI runs share 2 cores with whatever else is running
PER_CLASS = 150  # training images of each class in the CLI tests' dataset


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory, n_train=PER_CLASS, n_test=20), "trainer.threads=1",
            "trainer.progress=false"]  # fmt: skip


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    e.pop("MLFLOW_TRACKING_URI", None)  # the tests choose the store
    return e


def cli(*args: str, cwd: Path = REPO, wait: bool = True, environ: dict | None = None):
    cmd, environ = [sys.executable, "-m", "normsweep", *args], environ or env()
    if wait:
        return warm_python.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=TIMEOUT)
    return warm_python.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def output(proc) -> str:
    return (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:]


def history(job: Path) -> list[dict]:
    return json.loads((job / "results.json").read_text())["history"]


# ---------------------------------------------------------------------------- any tracker


@pytest.mark.parametrize(
    "kind,modules",
    [
        ("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
        ("mlflow", ["mlflow", "mlflow.entities", "mlflow.tracking"]),
    ],
)
def test_a_missing_package_stops_the_run_at_start_naming_the_extra(kind, modules, tmp_path, monkeypatch) -> None:
    from hydra import compose, initialize_config_dir

    from normsweep.run.job import run

    for name in modules:  # as if the package were not installed: importing it raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TrackerMissing, match=rf"pip install 'normsweep\[{kind}\]'") as err:
        make_tracker(LoggerConfig(kind=LoggerKind(kind)), tmp_path).start({}, {})
    assert isinstance(err.value, NormsweepError) and f"logger={kind}" in str(err.value)

    register_configs()  # the same through a job: stopped before any data is read, the reason recorded
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("train", overrides=[f"logger={kind}", f"data.root={tmp_path / 'no-data'}", "trainer.device=cpu"])
    with pytest.raises(TrackerMissing):
        run(dcfg, tmp_path / "job")
    res = json.loads((tmp_path / "job" / "results.json").read_text())
    assert res["status"] == "failed" and f"pip install 'normsweep[{kind}]'" in res["error"]


@pytest.mark.slow  # seconds: a fresh interpreter
def test_a_plain_run_imports_neither_tracker_library() -> None:
    code = (
        "import sys; from pathlib import Path; import normsweep.run.job, normsweep.__main__;"
        "from normsweep.run.trackers import make_tracker; from normsweep.config import LoggerConfig;"
        "t = make_tracker(LoggerConfig(), Path('.')); t.start({}, {}); t.log_history([]); t.close({}, []);"
        "bad = [m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard', 'optuna_dashboard') if m in sys.modules];"
        "assert not bad, bad"
    )
    warm_python.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=TIMEOUT)


def test_logger_keys_of_another_logger_are_rejected_naming_the_key() -> None:
    with pytest.raises(NormsweepError, match="logger.tracking_uri=.*null unless logger=mlflow"):
        LoggerConfig(kind=LoggerKind.tensorboard, tracking_uri="http://x")
    with pytest.raises(NormsweepError, match="logger.dir=.*null unless logger=tensorboard"):
        LoggerConfig(kind=LoggerKind.mlflow, dir="tb")


# ---------------------------------------------------------------------------- TensorBoard


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores scalars as float32


@pytest.mark.slow
def test_tensorboard_logs_every_epoch_of_every_job_of_a_sweep(tmp_path: Path, data_args) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", "norm=batch,layer", "logger=tensorboard", "trainer.epochs=2", *data_args, f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, output(proc)
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(jobs) == 2

    # What `tensorboard --logdir SWEEP` shows: one run per job, named by its directory.
    mux = EventMultiplexer().AddRunsFromDirectory(str(sweep))
    mux.Reload()
    assert set(mux.Runs()) == {j.name for j in jobs}

    for job in jobs:
        res = json.loads((job / "results.json").read_text())
        logged = scalars(job)
        for key in EPOCH_METRICS:  # per epoch, step = epoch, exactly the values of results.json
            assert logged[key] == [(h["epoch"], f32(h[key])) for h in res["history"]], key
        assert logged["final/final_test_acc"] == [(2, f32(res["final_test_acc"]))]
        assert logged["final/best_val_acc"] == [(2, f32(res["best_val_acc"]))]
        hp = hparams(job)  # the HParams view: the resolved config, flattened
        assert hp["norm.kind"] == res["norm"] and hp["trainer.epochs"] == 2
        assert hp["optimizer.lr"] == pytest.approx(res["config"]["optimizer"]["lr"])


@pytest.mark.slow  # seconds: real processes
def test_tensorboard_resume_logs_each_epoch_once_and_a_fresh_start_hides_the_old_run(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    out, cfg = tmp_path / "job", LoggerConfig(kind=LoggerKind.tensorboard)
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")  # what makes a job resume: train() continues from it
    hist = [EpochStats(e, 2.0 / e, 10.0 * e, 20.0 * e, 15.0 * e, 0.1 / e, 1.5) for e in range(1, 5)]
    config = {"norm": {"kind": "batch"}, "model": {"widths": [16, 24]}}

    first = make_tracker(cfg, out)
    first.start(config, {})
    first.log_history(hist[:2])
    first.close({"status": "interrupted"}, [])
    time.sleep(1.1)  # event files are ordered by the second they were created in
    with SummaryWriter(str(out)) as w:  # the process was killed half-way through logging epoch 3
        w.add_scalar("train_loss", 999.0, 3)
    time.sleep(1.1)

    again = make_tracker(cfg, out)
    again.start(config, {})
    assert again.last_epoch == 2  # read back from the event files
    again.log_history(hist[:3])  # the checkpoint held epoch 3: it is logged now, 1 and 2 are not repeated
    again.log_history(hist)
    time.sleep(1.1)  # as in a real run, the HParams file comes seconds after the resumed writer's
    final = {"status": "completed", "epochs_completed": 4, "final_test_acc": 60.0, "best_val_acc": 40.0}
    again.close(final, [])
    logged = scalars(out)
    for key in EPOCH_METRICS:
        assert logged[key] == [(h.epoch, f32(getattr(h, key))) for h in hist], key
    assert logged["final/final_test_acc"] == [(4, 60.0)]
    assert hparams(out)["model.widths"] == "[16, 24]"

    time.sleep(1.1)
    (out / "checkpoint.pt").unlink()  # no checkpoint: the job starts over, and so does its TensorBoard run
    over = make_tracker(cfg, out)
    over.start(config, {})
    assert over.last_epoch == 0
    over.log_history([EpochStats(1, 5.0, 1.0, 2.0, 3.0, 0.2, 1.0)])
    over.close({"status": "interrupted"}, [])
    assert scalars(out)["val_acc"] == [(1, 2.0)]


# ---------------------------------------------------------------------------- MLflow


def wait_for_epoch(sweep: Path, epoch: int, proc: subprocess.Popen) -> Path:
    """The job directory of a one-job sweep, once its results.json shows ``epoch`` done."""
    start = time.time()
    while time.time() - start < TIMEOUT:
        for results in sweep.glob("*/results.json"):
            try:
                if json.loads(results.read_text())["epochs_completed"] >= epoch:
                    return results.parent
            except (ValueError, KeyError):
                pass
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for epoch {epoch}")


@pytest.mark.slow
def test_mlflow_one_run_per_job_resumed_after_sigterm_with_every_epoch_once(tmp_path: Path, data_args) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    # Launched from tmp_path with no logger.tracking_uri: the default store is <launch dir>/mlruns.db.
    epochs = 4
    args = ("-m", "norm=batch", "logger=mlflow", f"trainer.epochs={epochs}", "augment=seed", *data_args,
            "hydra.sweep.dir=sweep")  # fmt: skip
    shim = crash_injector.injector_dir(tmp_path)  # parks the run in its epoch 2's first step: it is live for good
    park = f"step:{crash_injector.steps_per_epoch(len(CLASSES) * PER_CLASS, data_args) + 1}:park"
    environ = crash_injector.env(shim, park)
    environ.pop("MLFLOW_TRACKING_URI", None)  # the test chooses the store
    proc = cli(*args, cwd=tmp_path, wait=False, environ=environ)
    crash_injector.wait_parked(proc, shim, timeout=TIMEOUT)
    job = wait_for_epoch(tmp_path / "sweep", 1, proc)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=TIMEOUT)[0]
    stopped = json.loads((job / "results.json").read_text())
    assert stopped["status"] == "interrupted", log[-3000:]
    done = stopped["epochs_completed"]
    assert done == 1

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sweep")  # named after the sweep directory
    (run,) = client.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "KILLED" and run.info.run_name == job.name  # the job's directory in the sweep
    assert json.loads((job / MLFLOW_RUN_FILE).read_text())["run_id"] == run_id
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == list(range(1, done + 1))

    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, output(again)
    res = json.loads((job / "results.json").read_text())
    assert res["status"] == "completed" and len(res["history"]) == epochs

    (run,) = client.search_runs([exp.experiment_id])  # still one run: the resumed job continued it
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in EPOCH_METRICS:  # each epoch exactly once, step = epoch, the values of results.json
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert logged == [(h["epoch"], h[key]) for h in res["history"]], key
    assert run.data.metrics["final_test_acc"] == res["final_test_acc"]
    assert run.data.metrics["best_val_acc"] == res["best_val_acc"]
    params = run.data.params  # the resolved config, flattened with dotted keys
    assert params["norm.kind"] == "batch" and params["trainer.epochs"] == str(epochs)
    assert params["augment.rotate_deg"] == str(res["config"]["augment"]["rotate_deg"])
    assert run.data.tags["status"] == "completed"

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"results.json", "model_summary.txt", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/confusion.png"}
    local = client.download_artifacts(run_id, "results.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["status"] == "completed"  # the final record, not the interrupted one
    assert any((tmp_path / "mlartifacts").rglob("confusion.png"))  # artifacts under the launch dir


# ---------------------------------------------------------------------------- optuna-dashboard


@pytest.mark.slow
def test_optuna_dashboard_shows_a_cli_study_with_complete_failed_and_pruned_trials(
    tmp_path: Path, tmp_path_factory
) -> None:
    pytest.importorskip("optuna_dashboard")
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"  # the same form as the default, sqlite:///optuna/normsweep.db
    base = ("-m", "search=optuna", f"search.storage={url}", "search.study_name=dash", "search.max_failure_rate=1.0",
            *small_data_args(tmp_path_factory), "trainer.threads=1", "trainer.progress=false")  # fmt: skip
    # One study (named, so that the three commands share it), a trial each: the search's resume
    # adds trials up to search.n_trials.
    ok = cli(*base, "search.n_trials=1", "trainer.epochs=1", "search.pruner=none", f"hydra.sweep.dir={tmp_path / 's1'}")
    assert ok.returncode == 0, output(ok)
    # label smoothing >= 1 is rejected when the job starts: that trial fails.
    cli(
        *base,
        "search.n_trials=2",
        "trainer.epochs=1",
        "trainer.label_smoothing=1.5",
        f"hydra.sweep.dir={tmp_path / 's2'}",
    )
    # a pruner that prunes anything: that trial is pruned after epoch 1 of 2 (never after its last).
    cli(*base, "search.n_trials=3", "trainer.epochs=2", "search.pruner=threshold", "search.prune_below=101",
        f"hydra.sweep.dir={tmp_path / 's3'}")  # fmt: skip

    expected = optuna.load_study(study_name="dash", storage=url).get_trials()
    assert [t.state.name for t in expected] == ["COMPLETE", "FAIL", "PRUNED"]

    study, trials = dashboard_trials(url)  # `optuna-dashboard sqlite:///...` opens the storage from this URL
    assert study["study_name"] == "dash" and study["directions"] == ["maximize"]
    assert [(t["number"], t["state"]) for t in trials] == [(0, "Complete"), (1, "Fail"), (2, "Pruned")]
    for shown, trial in zip(trials, expected):
        params = {p["name"]: float(p["param_external_value"]) for p in shown["params"]}
        assert params == trial.params and set(params) == {"model.dropout", "optimizer.lr"}
        attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
        assert attrs["job_dir"] == trial.user_attrs["job_dir"]
    assert trials[0]["values"] == [expected[0].value]  # the objective: final validation accuracy
    assert "trainer.label_smoothing" in {a["key"]: a["value"] for a in trials[1]["user_attrs"]}["error"]
    assert [v["step"] for v in trials[2]["intermediate_values"]] == [1]  # pruned after epoch 1
    assert "values" not in trials[1]  # a failed trial has no objective value


def test_optuna_dashboard_opens_a_journal_file_given_as_a_path(tmp_path: Path) -> None:
    pytest.importorskip("optuna_dashboard")
    import optuna

    from normsweep.search.storage import open_storage, resolve_storage

    path = tmp_path / "norms.journal"  # search.storage=journal:PATH; the dashboard takes PATH itself
    study = optuna.create_study(study_name="j", storage=open_storage(resolve_storage(f"journal:{path}", tmp_path)),
                                direction="maximize")  # fmt: skip
    study.enqueue_trial({"optimizer.lr": 0.1})
    study.optimize(lambda t: t.suggest_float("optimizer.lr", 1e-3, 1.0, log=True) * 100, n_trials=1)
    failed = study.ask({"optimizer.lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)})
    study.tell(failed, state=optuna.trial.TrialState.FAIL)

    shown, trials = dashboard_trials(str(path))  # what `optuna-dashboard PATH` does with a journal file
    assert shown["study_name"] == "j"
    assert [(t["state"], t["params"][0]["param_external_value"]) for t in trials][0] == ("Complete", "0.1")
    assert [t["state"] for t in trials] == ["Complete", "Fail"]
