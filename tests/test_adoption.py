"""docs/search_full/adoption.py: a search candidate's seeds against the recipe's, and the adoption rule."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from .conftest import REPO


def adoption():
    spec = importlib.util.spec_from_file_location("adoption", REPO / "docs" / "search_full" / "adoption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs_csv(path, norm: str, vals: list[float], tests: list[float], status: str = "completed"):
    rows = [{"job": f"{norm}_s{s}", "norm": norm, "seed": s, "status": status, "final_val_acc": v,
             "final_test_acc": t, "final_test_acc_tta": t + 1} for s, (v, t) in enumerate(zip(vals, tests))]  # fmt: skip
    other = {"job": "x", "norm": "batch", "seed": 0, "status": "completed", "final_val_acc": 99.0,
             "final_test_acc": 99.0, "final_test_acc_tta": 99.0}  # fmt: skip
    pd.DataFrame(rows + [other]).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("candidate_val, adopt", [([82.0, 82.4, 82.2], "yes"), ([81.0, 81.4, 81.2], "no")])
def test_the_rule_compares_validation_means_and_welch_gives_the_difference(tmp_path, candidate_val, adopt):
    recipe = runs_csv(tmp_path / "recipe.csv", "group", [81.6, 81.8, 82.0], [81.0, 81.2, 81.4])
    cand = runs_csv(tmp_path / "cand.csv", "group", candidate_val, [80.5, 80.9, 80.7])
    text = adoption().report(cand, [recipe], "group")
    row = next(line for line in text.splitlines() if line.startswith(f"| {recipe} |") and "p =" in line)
    assert row.endswith(f"| {adopt} |")
    diff = sum(candidate_val) / 3 - 81.8
    assert f"{diff:+.2f} [" in row  # the batch row (99%) was filtered out by --norm
    assert "-0.50 [" in row  # test: 80.7 - 81.2


def test_too_few_completed_seeds_is_an_error_naming_the_source(tmp_path):
    recipe = runs_csv(tmp_path / "recipe.csv", "group", [81.6, 81.8], [81.0, 81.2], status="failed")
    cand = runs_csv(tmp_path / "cand.csv", "group", [82.0, 82.4], [80.5, 80.9])
    with pytest.raises(SystemExit, match=r"recipe.csv has 0 completed run\(s\) of norm=group"):
        adoption().report(cand, [recipe], "group")
    with pytest.raises(SystemExit, match="does not exist"):
        adoption().report(str(tmp_path / "missing"), [recipe], "group")
