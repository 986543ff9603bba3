"""results.json has one writer and one reader: ``results.RunRecord``.

The file's format is that of the job's former hand-built dict: same keys, same order, the late
keys (bf16, data_root, dataset, num_classes, image_size, classes, finished_at, traceback) absent until
set. Old files are read and migrated (a file from before dataset, num_classes and image_size reads them
as None); unknown keys are kept. Every consumer (job resume, report, plots, search, benchmark)
reads through ``RunRecord.read``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from normsweep.base.results import RESULTS_FILE, EpochRecord, RunRecord
from normsweep.config import register_configs
from normsweep.data import DataError
from normsweep.report import plots
from normsweep.report.runs import collect
from normsweep.run import resume
from normsweep.search.worker import tell_from_job

from .conftest import REPO

# The keys of results.json in the order the job has always written them.
FILE_KEYS = [
    "status", "error", "norm", "arch", "choices", "params", "epochs", "epochs_completed", "best_val_acc",
    "best_epoch", "final_val_acc", "final_test_acc", "final_val_acc_tta", "final_test_acc_tta", "final_train_loss",
    "train_seconds", "seconds_per_epoch", "peak_memory_mb", "device", "overrides", "trial", "config", "started_at",
    "host", "pid", "platform", "torch", "history", "bf16", "data_root", "dataset", "num_classes", "image_size",
    "classes", "finished_at", "traceback",
]  # fmt: skip
LATE = ["bf16", "data_root", "dataset", "num_classes", "image_size", "classes", "finished_at", "traceback"]
DATA_KEYS = ["dataset", "num_classes", "image_size", "classes"]  # known once the data is read
CONFIG = {"norm": {"kind": "batch"}, "data": {"root": "/d", "format": "folder", "val_size": 5000, "cache_dir": None}}


def epoch(e: int, test: float = 50.0) -> dict:
    return {"epoch": e, "train_loss": 1.0 / e, "train_acc": 40.0, "val_acc": test + 1, "test_acc": test, "lr": 0.1,
            "seconds": 2.0}  # fmt: skip


def full_record() -> RunRecord:
    return RunRecord(
        status="completed", error=None, norm="batch", arch="resnet", choices={"augment": "crop_flip"}, params=47600,
        epochs=2, epochs_completed=2, best_val_acc=51.0, best_epoch=2, final_val_acc=51.0, final_test_acc=50.0,
        final_val_acc_tta=51.5, final_test_acc_tta=50.5, final_train_loss=0.5, train_seconds=4.0,
        seconds_per_epoch=2.0, peak_memory_mb=512.0, device="cpu (2 threads)", overrides=["norm=batch"], trial=3,
        config=CONFIG, started_at="2024-01-01T00:00:00+00:00", host="h", pid=123, platform="Linux", torch="2.4",
        history=[EpochRecord(**epoch(1)), EpochRecord(**epoch(2))], bf16=False, data_root="/d", dataset="folder",
        num_classes=2, image_size=64, classes=["a", "b"],
        finished_at="2024-01-01T00:01:00+00:00", traceback=None,
    )  # fmt: skip


def test_a_record_written_and_read_back_is_equal(tmp_path: Path) -> None:
    record = full_record()
    record.write(tmp_path)
    back = RunRecord.read(tmp_path)
    assert back == record and isinstance(back.history[0], EpochRecord)
    assert list(json.loads((tmp_path / RESULTS_FILE).read_text())) == [k for k in FILE_KEYS if k != "traceback"]


@pytest.mark.parametrize("stage", ["running", "completed", "failed"])
def test_the_file_is_byte_for_byte_what_the_job_wrote_before(tmp_path: Path, stage: str) -> None:
    legacy = full_record().to_dict()  # the values; the order is FILE_KEYS'
    legacy["history"] = [epoch(1), epoch(2)]
    legacy.update(traceback="Traceback ...", status=stage)
    present = {"running": [k for k in FILE_KEYS if k not in LATE], "completed": FILE_KEYS[:-1], "failed": FILE_KEYS}
    old = {k: legacy[k] for k in present[stage]}  # as the dict job.py used to build and mutate held them
    RunRecord.from_dict(old).write(tmp_path)
    assert (tmp_path / RESULTS_FILE).read_text() == json.dumps(old, indent=2, default=str) + "\n"


def test_an_old_file_is_read_and_migrated_and_unknown_keys_kept(tmp_path: Path) -> None:
    old = {"status": "completed", "norm": "group", "final_test_acc": 70.0, "config": None, "overrides": None,
           "history": [{**epoch(1), "grad_norm": 3.0}], "gpu_temp": 71}  # fmt: skip
    (tmp_path / RESULTS_FILE).write_text(json.dumps(old))
    record = RunRecord.read(tmp_path)
    assert record.final_test_acc_tta is None and record.arch is None and record.epochs_completed == 0
    assert record.config == {} and record.overrides == [] and record.choices == {}  # null or absent: empty
    assert record.history == [EpochRecord(**epoch(1))]  # an unknown per-epoch key is dropped
    assert record.extra == {"gpu_temp": 71}
    record.write(tmp_path)
    again = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert list(again) == [k for k in FILE_KEYS if k not in LATE] + ["gpu_temp"]  # known keys in order, then the rest
    assert again["gpu_temp"] == 71 and again["final_test_acc"] == 70.0


@pytest.mark.parametrize("text", ["[1, 2]", '{"history": 3}', '{"history": [1]}', "{not json"])
def test_a_file_that_is_not_a_record_is_a_value_error(tmp_path: Path, text: str) -> None:
    (tmp_path / RESULTS_FILE).write_text(text)
    with pytest.raises(ValueError):
        RunRecord.read(tmp_path)


def test_a_job_writes_its_record_through_the_one_writer_in_the_file_order(tmp_path: Path, monkeypatch) -> None:
    from normsweep.run.job import run

    writes = []
    original = RunRecord.write
    monkeypatch.setattr(RunRecord, "write", lambda self, d: (writes.append(self.status), original(self, d))[1])
    register_configs()  # fails at reading the data, after the device is recorded (the model needs the data's facts)
    overrides = [f"data.root={tmp_path / 'no-data'}", "data.download=false", "data.format=folder", "trainer.device=cpu",
                 f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("train", overrides=overrides)
    with pytest.raises(DataError, match="has no 'train/'"):
        run(dcfg, tmp_path / "job")
    assert writes == ["running", "failed"]
    saved = json.loads((tmp_path / "job" / RESULTS_FILE).read_text())
    assert list(saved) == [k for k in FILE_KEYS if k not in DATA_KEYS]  # the data was never read
    assert saved["status"] == "failed" and saved["params"] is None and saved["data_root"] == str(tmp_path / "no-data")


# --- every consumer reads through RunRecord.read -------------------------------------------------------------


@pytest.fixture
def redirected(tmp_path: Path, monkeypatch) -> Path:
    """A sweep with one completed job whose file says 50%; ``RunRecord.read`` says 99% (val 98%)."""
    job = tmp_path / "sweep" / "0_norm=batch"
    job.mkdir(parents=True)
    on_disk = RunRecord(status="completed", norm="batch", final_val_acc=51.0, final_test_acc=50.0, config=CONFIG,
                        overrides=["norm=batch"], history=[EpochRecord(**epoch(1)), EpochRecord(**epoch(2))])  # fmt: skip
    on_disk.write(job)
    n = 20
    np.savez(job / "predictions.npz", index=np.arange(n), target=np.arange(n) % 10, pred=(np.arange(n) + 1) % 10)
    original = RunRecord.read.__func__

    def read(cls, job_dir):
        record = original(cls, job_dir)
        record.final_val_acc, record.final_test_acc = 98.0, 99.0
        record.history = [EpochRecord(**epoch(e.epoch, test=99.0)) for e in record.history]
        record.classes = [f"class{i}" for i in range(10)]
        return record

    monkeypatch.setattr(RunRecord, "read", classmethod(read))
    return job


def test_the_report_reads_through_the_one_reader(redirected: Path) -> None:
    df = collect([redirected.parent])
    assert df["final_test_acc"].tolist() == [99.0]


def test_the_plots_read_through_the_one_reader(redirected: Path, monkeypatch) -> None:
    (hist,) = plots._histories([redirected])
    assert hist["test_acc"].tolist() == [99.0, 99.0]
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: seen.setdefault("titles", []).append(fig.get_suptitle()))
    monkeypatch.setattr(
        plots, "_load_test_images", lambda *a: (np.zeros((20, 32, 32, 3), np.uint8), tuple("abcdefghij"))
    )
    monkeypatch.setattr(plots, "plot_confusion", lambda job, out, classes: seen.setdefault("classes", classes))
    df = collect([redirected.parent])
    plots.write_plots(df, [redirected.parent], redirected.parent / "plots")
    assert any("test acc 99.0%" in t for t in seen["titles"])  # plot_mispredicted
    assert seen["classes"] == tuple(f"class{i}" for i in range(10))  # write_plots' confusion classes


def test_the_search_reads_through_the_one_reader(redirected: Path) -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    tell_from_job(study, trial, redirected)
    (done,) = study.get_trials()
    assert done.value == 98.0 and done.user_attrs["final_test_acc"] == 99.0


def test_resume_reads_through_the_one_reader(redirected: Path) -> None:
    previous = resume.previous_result(redirected, CONFIG)
    assert previous is not None and previous.final_val_acc == 98.0


def test_the_benchmark_reads_through_the_one_reader(redirected: Path) -> None:
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    med = pd.DataFrame({"pipeline": ["default"], "norm": ["batch"], "images_per_s": [1000.0]})
    table = throughput._from_sweep(redirected.parent, 90.0, med)
    header, _, row = ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines())
    got = dict(zip(header, row))
    assert (got["final_test_acc"], got["epochs_to_target"]) == ("99.0", "1")  # the file says 50%, never reached
