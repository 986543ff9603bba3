"""Each data source end to end through the CLI (issue 36): ``python -m normsweep -m data=... norm=batch,group
trainer.epochs=1`` on a tiny dataset written here in the source's real format, then the sweep's report; every job's
results.json records the dataset, its class count and image size, and its model has that many outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from normsweep.base.results import load_model

from . import warm_python
from .conftest import REPO
from .test_datasets import FOLDER_CLASSES, write_cifar100, write_folder, write_svhn

pytestmark = pytest.mark.slow

CASES = {
    "cifar100": (write_cifar100, ["data=cifar100", "data.labels=coarse", "data.val_size=50", "data.train_size=200"], 20, 32),
    "svhn": (write_svhn, ["data=svhn", "data.val_size=40", "data.train_size=150"], 10, 32),
    "folder": (write_folder, ["data=folder", "data.image_size=24", "data.val_size=12", "trainer.batch_size=30"],
               len(FOLDER_CLASSES), 24),
}  # fmt: skip


@pytest.mark.parametrize("source", list(CASES))
def test_a_two_norm_sweep_runs_and_records_the_dataset(tmp_path: Path, source: str) -> None:
    write, args, num_classes, size = CASES[source]
    root = write(tmp_path / "data")
    sweep = tmp_path / "multirun"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "normsweep", "-m", *args, "norm=batch,group", "trainer.epochs=1", f"data.root={root}",
           f"data.cache_dir={tmp_path / 'cache'}", "data.download=false", "trainer.device=cpu", "trainer.batch_size=50",
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    if source == "folder":
        cmd.remove("trainer.batch_size=50")  # the case's own
    proc = warm_python.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 2
    for job in jobs:
        res = json.loads((job / "results.json").read_text())
        assert res["status"] == "completed", res.get("error")
        assert (res["dataset"], res["num_classes"], res["image_size"]) == (source, num_classes, size)
        assert len(res["classes"]) == num_classes
        state = load_model(job / "model.pt")["state_dict"]
        head = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2][-1]
        assert head.shape[0] == num_classes  # the model's head has the data's classes
    if source == "cifar100":  # 48,170 parameters with 20 classes; the budget counts a 10-class head
        assert "budget: 47,600 parameters counted" in proc.stdout + proc.stderr
    table = pd.read_csv(sweep / "results.csv")  # the sweep's report
    assert sorted(table["norm"]) == ["batch", "group"] and (table["status"] == "completed").all()
    for job in jobs:
        assert (sweep / "plots" / job.name / "mispredicted.png").stat().st_size > 1000  # the test images, read back
