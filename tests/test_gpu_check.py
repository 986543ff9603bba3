"""The GPU check (benchmarks/gpu_check.py): its quick mode runs every stage on the CPU, so the check is
known to work before a GPU ever runs it; a failing or overrunning stage is reported, not fatal."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from normsweep.base.results import RESULTS_FILE, RunRecord

from .conftest import REPO, write_folder_dataset

GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=1200)  # fmt: skip


def summary_rows(out: Path) -> dict[str, list[str]]:
    """The summary table's rows by stage: [status, seconds, found]."""
    rows = [line.strip("|").split(" | ") for line in (out / "summary.md").read_text().splitlines()]
    return {
        r[0].strip(): [c.strip() for c in r[1:]] for r in rows if len(r) == 4 and r[0].strip() not in ("stage", "---")
    }


@pytest.mark.slow
def test_the_quick_check_runs_every_stage_on_the_cpu_and_reports_what_it_measured(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "cifar", n_train=20, n_test=5)
    out = tmp_path / "check"
    tiny = ["data.val_size=50", "trainer.batch_size=50"]
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # normsweep's data cache, here
    proc = gpu_check("--quick", "--device", "cpu", str(root), *tiny, "--out", str(out), "--budget-s", "1000", env=cache)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = summary_rows(out)
    assert {stage: row[0] for stage, row in rows.items()} == {
        "environment": "ok", "data": "ok", "sweep": "ok", "throughput": "ok", "compile": "skipped", "packed": "ok",
        "resnet18": "ok"}  # fmt: skip
    assert "200 training and 50 test images" in rows["data"][2]

    runs = [RunRecord.read(p.parent) for p in (out / "sweep").glob(f"*/{RESULTS_FILE}")]
    assert sorted(r.norm for r in runs) == ["batch", "group", "layer"]
    assert {(r.status, r.epochs_completed) for r in runs} == {("completed", 1)}
    assert len({r.pid for r in runs}) == 3  # three joblib worker processes at once
    for r in runs:  # each run's accuracy, training time and peak memory, as the run recorded them
        assert f"{r.norm} completed: test {r.final_test_acc:.2f}%" in rows["sweep"][2]
        assert f"in {r.train_seconds:.1f} s, peak {r.peak_memory_mb:.0f} MB" in rows["sweep"][2]
    assert f"the longest run's): {max(r.train_seconds for r in runs):.1f} s" in rows["sweep"][2]

    (csv,) = (out / "throughput").glob("throughput-*.csv")
    measured = pd.read_csv(csv)
    assert sorted(measured["pipeline"]) == ["normsweep", "study"] and (measured["images_per_s"] > 0).all()
    study = measured.set_index("pipeline").loc["study", "images_per_s"]
    assert f"study {study:,.0f} img/s (1.0x" in rows["throughput"][2]

    (csv,) = (out / "packed").glob("packed-*.csv")
    packed = pd.read_csv(csv).set_index("mode")
    assert sorted(packed.index) == ["packed", "separate"] and (packed["seconds"] > 0).all()
    assert f"separate {packed.loc['separate', 'seconds']:.1f} s" in rows["packed"][2]
    assert f"packed {packed.loc['packed', 'speedup']:.2f}x the separate runs' speed" in rows["packed"][2]
    resnet = RunRecord.read(out / "resnet18")
    assert resnet.status == "completed" and resnet.params > 10**7  # torchvision's resnet18, not the study's CNN
    assert f"{resnet.params:,} parameters, one epoch in {resnet.history[0].seconds:.1f} s" in rows["resnet18"][2]

    assert "Targets not checked: --quick" in proc.stdout and "Result: every stage ran." in proc.stdout


@pytest.fixture
def module(monkeypatch):
    """benchmarks/gpu_check.py, imported."""
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_stage_that_fails_is_reported_and_the_stages_that_need_it_are_skipped(tmp_path: Path, module, capsys) -> None:
    out = tmp_path / "check"
    assert module.main(["--device", "cuda:99", str(tmp_path), "--out", str(out)]) == 1  # no machine has a 100th GPU
    printed = capsys.readouterr().out
    rows = summary_rows(out)
    assert rows["environment"][0] == "FAILED" and "**" in rows["environment"][2]  # the error, in bold
    assert {rows[s][0] for s in ("data", "sweep", "throughput", "compile", "packed", "resnet18")} == {"skipped"}
    assert "Result: FAILED: environment." in printed
    assert "Targets (training of the three runs <= 15 s" in printed and "not measured" in printed


@pytest.mark.slow  # seconds: real processes
def test_a_command_past_its_deadline_is_stopped_with_the_processes_it_started(tmp_path: Path, module) -> None:
    check = module.Check(module.parse_args([str(tmp_path), "--budget-s", "12"]), tmp_path)  # the sweep's deadline: 3 s
    with pytest.raises(module.StageError, match="stopped at the stage's deadline"):
        check.command("sweep", ["sh", "-c", "sleep 300 & echo $!; wait"])  # a child that would outlive its shell
    child = int((tmp_path / "sweep.log").read_text().split()[-1])
    for _ in range(100):  # killed at once; give the kernel a moment to tear it down
        state = Path(f"/proc/{child}/stat")
        if not state.exists() or state.read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the command's child {child} outlived the deadline")
