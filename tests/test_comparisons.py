"""Statistics in the sweep report: pairwise Welch comparisons, Hedges' g, the multiple-comparison correction,
seed counts, flip-TTA columns, 95% CI bars.

Every expected number is computed here from the accuracies written into the runs, by hand
(Welch's standard error and degrees of freedom, Student's t quantiles, Holm's adjustment, Hedges' g,
the t-test's power by numerical integration), not through the report's own ``ttest_ind`` call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from scipy import stats

from normsweep.report import plots
from normsweep.report.comparisons import compare_configs, comparisons_from_csv
from normsweep.report.runs import collect
from normsweep.report.statistics import seeds_needed, welch
from normsweep.report.tables import ReportCallback, main, write_report

from .conftest import batch_size_sweep, power_by_integration, write_run

# final test accuracy per seed of each configuration (norm, lr)
ACC = {
    ("batch", 0.2): [81.9, 81.3, 82.0],
    ("group", 0.2): [77.2, 78.0, 76.9],
    ("layer", 0.2): [77.5, 77.1, 76.8],
    ("instance", 0.2): [70.0],  # one seed: its pairs are skipped
    ("batch", 0.1): [80.0, 81.5],  # differs from batch@0.2 in lr only, from group/layer@0.2 in two settings
}


def by_hand(a: list[float], b: list[float]) -> dict:
    """Welch's test and Hedges' g from the textbook formulas."""
    n1, n2 = len(a), len(b)
    m1, m2 = sum(a) / n1, sum(b) / n2
    v1 = sum((x - m1) ** 2 for x in a) / (n1 - 1)
    v2 = sum((x - m2) ** 2 for x in b) / (n2 - 1)
    se = math.sqrt(v1 / n1 + v2 / n2)
    dof = (v1 / n1 + v2 / n2) ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    diff = m1 - m2
    half = stats.t.ppf(0.975, dof) * se
    p = 2 * stats.t.sf(abs(diff / se), dof)
    pooled = math.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    j = 1 - 3 / (4 * (n1 + n2) - 9)
    return {"mean_a": m1, "mean_b": m2, "diff": diff, "ci_low": diff - half, "ci_high": diff + half, "df": dof,
            "p_value": p, "g": j * diff / pooled, "effect": abs(diff) / pooled}  # fmt: skip


def is_least_seed_count(n: int, effect: float, alpha: float) -> bool:
    """Whether n is the least count >= 2 at which a t-test at ``alpha`` has 80% power (by numerical integration)."""
    enough = power_by_integration(n, effect, alpha) >= 0.8
    return enough and (n == 2 or power_by_integration(n - 1, effect, alpha) < 0.8)


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm's adjusted p-values: sorted ascending, max over j <= i of (m - j + 1)·p(j), capped at 1."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    s = tmp_path / "sweep"
    for (norm, lr), accs in ACC.items():
        for seed, acc in enumerate(accs):
            write_run(s / f"{norm}_lr{lr}_seed{seed}", norm, seed, test=acc, val=acc + 0.5, lr=lr)
    return s


def md_rows(text: str) -> list[list[str]]:
    """The cells of a markdown table's body rows."""
    rows = [line for line in text.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_pairs_differing_in_one_setting_have_exact_welch_statistics(sweep: Path) -> None:
    write_report([sweep], plots=False)
    csv = pd.read_csv(sweep / "comparisons.csv", keep_default_na=False, na_values=[""])
    pairs = list(zip(csv["setting"], csv["a"].astype(str), csv["b"].astype(str), csv["where"]))
    # group@0.2 vs batch@0.1 differ in norm *and* lr: not compared; instance has one seed: skipped
    assert pairs == [
        ("norm", "batch", "group", "lr=0.2"),
        ("norm", "batch", "layer", "lr=0.2"),
        ("norm", "group", "layer", "lr=0.2"),
        ("lr", "0.2", "0.1", "norm=batch"),
    ]
    sides = [(ACC["batch", 0.2], ACC["group", 0.2]), (ACC["batch", 0.2], ACC["layer", 0.2]),
             (ACC["group", 0.2], ACC["layer", 0.2]), (ACC["batch", 0.2], ACC["batch", 0.1])]  # fmt: skip
    holm = holm_by_hand([by_hand(a, b)["p_value"] for a, b in sides])
    for row, (a, b), adjusted in zip(csv.itertuples(), sides, holm):
        want = by_hand(a, b)
        assert (row.n_a, row.n_b) == (len(a), len(b))
        for key in ("mean_a", "mean_b", "diff", "ci_low", "ci_high", "df", "p_value", "g"):
            assert getattr(row, key) == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
        assert row.std_a == pytest.approx(np.std(a, ddof=1)) and row.std_b == pytest.approx(np.std(b, ddof=1))
        assert row.p_adjusted == pytest.approx(adjusted, rel=1e-9)
        assert (row.correction, row.family_size) == ("holm", 4)
        assert row.g_low < row.g < row.g_high
        assert is_least_seed_count(int(row.seeds_needed), want["effect"], 0.05 / 4)  # corrected: alpha / m, m = 4

    batch_group, batch_layer, group_layer, lr = csv.iloc[0], csv.iloc[1], csv.iloc[2], csv.iloc[3]
    # distinguishable: BN is 4.4 points above GN, the interval excludes 0, p < 0.05 after Holm, 3 seeds would do
    assert batch_group["p_adjusted"] < 0.05 and batch_group["ci_low"] > 0 and batch_group["g_low"] > 0
    assert batch_group["distinguishable"] == "yes" and batch_group["seeds_needed"] == 3
    # not distinguishable: GN vs LN, 0.23 points apart at a spread of ~0.47: 94 seeds each would resolve it at
    # 0.05/4 (67 at 0.05 uncorrected; the normal approximation used before said 65)
    assert group_layer["p_value"] > 0.05 and group_layer["ci_low"] < 0 < group_layer["ci_high"]
    assert group_layer["distinguishable"] == "no — not distinguishable with n=3 seeds"
    assert group_layer["seeds_needed"] == 94
    assert lr["distinguishable"] == "no — not distinguishable with n=3/2 seeds"
    assert batch_layer["distinguishable"] == "yes"


def test_markdown_shows_the_table_and_says_which_pairs_were_skipped(sweep: Path) -> None:
    write_report([sweep], plots=False)
    md = (sweep / "comparisons.md").read_text()
    assert md.startswith("# Pairwise comparisons of final test accuracy")
    header = [line for line in md.splitlines() if line.startswith("|")][0]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "setting", "a", "b", "where", "n (a / b)", "a: mean ± std", "b: mean ± std", "a − b [95% CI]",
        "Hedges' g [95% CI]", "Welch df", "p (Welch)", "p (Holm)", "distinguishable (Holm p<0.05)", "seeds needed",
    ]  # fmt: skip
    rows = md_rows(md)
    assert len(rows) == 4
    w = by_hand(ACC["group", 0.2], ACC["layer", 0.2])
    csv = pd.read_csv(sweep / "comparisons.csv")
    assert rows[2] == [
        "norm", "group", "layer", "lr=0.2", "3 / 3",
        f"{w['mean_a']:.2f} ± {np.std(ACC['group', 0.2], ddof=1):.2f}",
        f"{w['mean_b']:.2f} ± {np.std(ACC['layer', 0.2], ddof=1):.2f}",
        f"{w['diff']:+.2f} [{w['ci_low']:+.2f}, {w['ci_high']:+.2f}]",
        f"{w['g']:+.1f} [{csv['g_low'][2]:+.1f}, {csv['g_high'][2]:+.1f}]", f"{w['df']:.1f}", f"{w['p_value']:.4f}",
        f"{csv['p_adjusted'][2]:.4f}", "no — not distinguishable with n=3 seeds", "94",
    ]  # fmt: skip
    # the same, written out; Holm: the lr pair's p = 0.403, third of 4, times 2 is 0.806, which the largest keeps
    assert rows[2][7] == "+0.23 [-0.93, +1.39]" and rows[2][10] == "0.5841" and rows[2][11] == "0.8063"
    assert rows[0][12] == "yes"
    assert "**Corrected for 4 tests**: the family is the whole table" in md
    assert "2 of 4 pairs are distinguishable after the correction, 2 before it." in md
    assert "t-test at α/m = 0.05/4" in md
    skipped = md.split("Skipped, fewer than 2 seeds on a side:")[1]
    assert skipped.strip().splitlines() == [
        "- norm=batch (n=3) vs norm=instance (n=1) (lr=0.2)",
        "- norm=group (n=3) vs norm=instance (n=1) (lr=0.2)",
        "- norm=layer (n=3) vs norm=instance (n=1) (lr=0.2)",
    ]
    assert "instance" not in pd.read_csv(sweep / "comparisons.csv")["b"].tolist()
    assert "differ in more settings are not compared" in md


def test_zero_difference_needs_infinitely_many_seeds(tmp_path: Path) -> None:
    s = tmp_path / "s"
    for seed, (b, g) in enumerate([(70.0, 71.0), (72.0, 71.0)]):  # equal means, 71.0 each
        write_run(s / f"b{seed}", "batch", seed, test=b, val=b)
        write_run(s / f"g{seed}", "group", seed, test=g, val=g)
    write_report([s], plots=False)
    row = pd.read_csv(s / "comparisons.csv").iloc[0]
    assert row["diff"] == 0 and row["p_value"] == pytest.approx(1.0)
    assert math.isinf(row["seeds_needed"])  # written as "inf"
    assert "inf" in (s / "comparisons.csv").read_text().splitlines()[1].split(",")
    assert md_rows((s / "comparisons.md").read_text())[0][-1] == "—"
    assert seeds_needed(0.0, 1.0) == math.inf
    assert seeds_needed(5.0, 0.0) == 2  # at least 2


def test_no_spread_on_either_side_is_no_test(tmp_path: Path) -> None:
    s = tmp_path / "s"
    for seed in range(2):
        write_run(s / f"b{seed}", "batch", seed, test=80.0, val=80.0)
        write_run(s / f"g{seed}", "group", seed, test=79.0, val=79.0)
    write_report([s], plots=False)
    row = pd.read_csv(s / "comparisons.csv").iloc[0]
    assert row["diff"] == pytest.approx(1.0) and math.isnan(row["p_value"]) and math.isnan(row["df"])
    assert row["distinguishable"] == "— (no spread between seeds: no test)"


def test_welch_interval_without_scipys_confidence_interval_is_the_same(monkeypatch) -> None:
    a, b = [81.9, 81.3, 82.0], [80.0, 81.5]
    with_scipy = welch(a, b)
    want = by_hand(a, b)
    for key in ("diff", "ci_low", "ci_high", "df", "p_value"):
        assert with_scipy[key] == pytest.approx(want[key], rel=1e-9), key
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert (with_scipy["ci_low"], with_scipy["ci_high"]) == pytest.approx(tuple(ref.confidence_interval(0.95)))

    class OldResult:  # an older scipy: statistic and p-value only
        def __init__(self, r):
            self.statistic, self.pvalue = r.statistic, r.pvalue

    real = stats.ttest_ind
    monkeypatch.setattr(stats, "ttest_ind", lambda *args, **kw: OldResult(real(*args, **kw)))
    fallback = welch(a, b)
    for key in ("diff", "ci_low", "ci_high", "df", "p_value"):
        assert fallback[key] == pytest.approx(want[key], rel=1e-9), key


def test_only_configurations_with_seeds_are_compared(tmp_path: Path) -> None:
    s = tmp_path / "s"
    write_run(s / "b0", "batch", 0, test=80.0, val=80.0)
    write_run(s / "b1", "batch", 1, test=81.0, val=81.0)
    write_run(s / "g0", "group", 0, test=78.0, val=78.0)  # one seed
    write_run(s / "l0", "layer", 0, test=77.0, val=77.0, lr=0.1)  # one seed, and two settings from batch
    write_report([s], plots=False)
    c = compare_configs(collect([s]))
    assert len(c.table) == 0
    assert c.skipped[["setting", "a", "b", "n_a", "n_b"]].values.tolist() == [["norm", "batch", "group", 2, 1]]
    md = (s / "comparisons.md").read_text()
    assert "No pair of configurations with at least 2 seeds each differs in exactly one setting." in md
    assert "- norm=batch (n=2) vs norm=group (n=1)" in md and "layer" not in md


def test_comparisons_are_printed_and_logged(sweep: Path, capsys, caplog) -> None:
    from omegaconf import OmegaConf

    assert main([str(sweep), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "pairwise comparisons of final_test_acc:" in out
    assert "no — not distinguishable with n=3 seeds" in out and "+0.23 [-0.93, +1.39]" in out
    assert "(3 pairs skipped: fewer than 2 seeds on a side; see comparisons.md)" in out
    (sweep / "comparisons.csv").unlink()
    with caplog.at_level("INFO", logger="normsweep.report.tables"):
        ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert "pairwise comparisons" in caplog.text and "+4.37 [+3.20, +5.53]" in caplog.text
    assert (sweep / "comparisons.csv").exists()


# --- flip test-time augmentation fields ------------------------------------------------------------


def test_tta_fields_are_columns_and_averaged_per_configuration(tmp_path: Path) -> None:
    s = tmp_path / "s"
    tta = {("batch", 0): 82.5, ("batch", 1): 83.1, ("group", 0): 78.0, ("group", 1): None}  # group seed 1: TTA off
    for (norm, seed), t in tta.items():
        write_run(s / f"{norm}{seed}", norm, seed, test=80.0 + seed, val=81.0,
                  final_test_acc_tta=t, final_val_acc_tta=None if t is None else t + 1)  # fmt: skip
    write_run(s / "old", "layer", 0, test=70.0, val=71.0)  # an old record: no TTA fields at all
    df = write_report([s], plots=False)
    assert df.set_index("job").loc["batch1", "final_test_acc_tta"] == 83.1
    assert df.set_index("job")[["final_test_acc_tta"]].loc[["group1", "old"]].isna().all().item()
    csv = pd.read_csv(s / "results.csv")
    assert {"final_test_acc_tta", "final_val_acc_tta"} <= set(csv.columns)
    g = pd.read_csv(s / "results_by_config.csv").set_index("norm")
    assert g.loc["batch", "final_test_acc_tta_mean"] == pytest.approx((82.5 + 83.1) / 2)
    assert g.loc["batch", "final_test_acc_tta_std"] == pytest.approx(np.std([82.5, 83.1], ddof=1))
    assert g.loc["batch", "final_val_acc_tta_mean"] == pytest.approx((83.5 + 84.1) / 2)
    assert (g.loc["batch", "final_test_acc_tta_n"], g.loc["group", "final_test_acc_tta_n"]) == (2, 1)
    assert g.loc["group", "final_test_acc_tta_mean"] == 78.0 and math.isnan(g.loc["layer", "final_test_acc_tta_mean"])
    md = (s / "results_by_config.md").read_text()
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    row = dict(zip(header, md_rows(md)[0]))
    assert row["norm"] == "batch" and row["final_test_acc_tta"] == "82.80 ± 0.42"
    by_norm = {r[0]: dict(zip(header, r)) for r in md_rows(md)}
    assert by_norm["group"]["final_test_acc_tta"] == "78.00 ± 0.00 (n=1)"  # one of its two runs had TTA
    assert by_norm["layer"]["final_test_acc_tta"] == "—"
    assert "final_test_acc_tta" in (s / "results.md").read_text()


def test_old_results_without_tta_fields_still_report(tmp_path: Path, capsys) -> None:
    s = tmp_path / "s"
    for seed in range(2):
        write_run(s / f"b{seed}", "batch", seed, test=80.0 + seed, val=81.0)
        write_run(s / f"g{seed}", "group", seed, test=75.0 + seed, val=76.0)
    for job in s.iterdir():  # as written before the TTA fields existed
        assert "final_test_acc_tta" not in json.loads((job / "results.json").read_text())
    assert main([str(s), "--no-plots"]) == 0
    assert "final_test_acc_tta" not in capsys.readouterr().out
    csv = pd.read_csv(s / "results.csv")
    assert csv["final_test_acc_tta"].isna().all() and csv["final_val_acc_tta"].isna().all()
    assert "tta" not in (s / "results.md").read_text()  # no empty columns in the markdown
    assert not any("tta" in c for c in pd.read_csv(s / "results_by_config.csv").columns)
    assert "tta" not in (s / "results_by_config.md").read_text()
    assert pd.read_csv(s / "comparisons.csv").iloc[0]["diff"] == pytest.approx(5.0)


# --- the bar chart's 95% intervals ---------------------------------------------------------------


def test_bars_show_95_percent_t_intervals_and_n(sweep: Path, monkeypatch) -> None:
    df = collect([sweep])
    s = plots.bar_stats(df)
    for (norm, lr), accs in ACC.items():
        label = f"{norm} lr={lr}"
        n = len(accs)
        half = stats.t.ppf(0.975, n - 1) * np.std(accs, ddof=1) / math.sqrt(n) if n > 1 else 0.0
        assert s.loc[label, "count"] == n and s.loc[label, "mean"] == pytest.approx(np.mean(accs))
        assert s.loc[label, "ci"] == pytest.approx(half, rel=1e-12)
    # t(0.975, 2) = 4.303: the interval of three seeds is 2.48 standard deviations each side
    assert s.loc["group lr=0.2", "ci"] == pytest.approx(4.302652729911275 * np.std(ACC["group", 0.2], ddof=1) / 3**0.5)

    drawn = {}

    def capture(fig, path, dpi):
        ax = fig.axes[0]
        drawn["texts"] = [t.get_text() for t in ax.texts]
        drawn["labels"] = [t.get_text() for t in ax.get_yticklabels()]
        bars = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
        drawn["xerr"] = [seg[:, 0].tolist() for seg in bars.lines[2][0].get_segments()]
        drawn["xlabel"] = ax.get_xlabel()
        path.write_bytes(b"png")

    monkeypatch.setattr(plots, "_save", capture)
    plots.plot_test_accuracy_bars(df, sweep)
    labels = drawn["labels"]
    i = labels.index("group lr=0.2")
    g = s.loc["group lr=0.2"]
    assert drawn["texts"][i] == f"{g['mean']:.1f}% ± {g['ci']:.1f} (95% CI, n=3)" == "77.4% ± 1.4 (95% CI, n=3)"
    assert drawn["xerr"][i] == pytest.approx([g["mean"] - g["ci"], g["mean"] + g["ci"]])
    assert drawn["texts"][labels.index("instance lr=0.2")] == "70.0% (n=1, no interval)"
    assert drawn["texts"][labels.index("batch lr=0.1")].endswith("(95% CI, n=2)")
    assert "95% CI" in drawn["xlabel"]


def test_bar_chart_is_written(sweep: Path) -> None:
    path = plots.plot_test_accuracy_bars(collect([sweep]), sweep)
    assert path.stat().st_size > 10_000


def test_norms_each_with_its_own_recipe_are_compared_as_norms(tmp_path: Path) -> None:
    s = tmp_path / "sweep"
    accs = {"batch": [81.4, 81.2, 80.9], "group": [80.9, 80.5, 80.5]}
    for norm, values in accs.items():
        for seed, acc in enumerate(values):
            job = s / f"{norm}{seed}"
            write_run(job, norm, seed, test=acc, val=acc, choices={"augment": "crop_flip", "recipe": norm})
            res = json.loads((job / "results.json").read_text())
            res["config"]["norm"]["ws"] = norm == "group"  # what the group recipe sets
            res["config"]["optimizer"]["weight_decay"] = 1e-3 if norm == "group" else 5e-4
            (job / "results.json").write_text(json.dumps(res))
    table = compare_configs(collect([s])).table
    (row,) = table.to_dict("records")
    assert (row["setting"], row["a"], row["b"]) == ("norm", "batch", "group")
    assert "own recipe (ws, weight_decay)" in row["where"]
    assert row["diff"] == pytest.approx(np.mean(accs["batch"]) - np.mean(accs["group"]))
    # The same runs under one shared recipe that still differ in two settings are not compared.
    for job in s.iterdir():
        res = json.loads((job / "results.json").read_text())
        res["choices"]["recipe"] = "shared"
        (job / "results.json").write_text(json.dumps(res))
    assert compare_configs(collect([s])) is None or not len(compare_configs(collect([s])).table)


# --- the multiple-comparison correction, the callback's setting, --from-csv --------------------------------


def close_pair_sweep(s: Path) -> None:
    """Four norms, 3 seeds each: batch and group 0.8 points apart (p = 0.031 alone), layer and instance level
    (p = 0.87), the other pairs about 10 points apart."""
    accs = {"batch": [80.4, 81.0, 80.7], "group": [79.6, 80.2, 79.9], "layer": [70.0, 71.5, 69.5],
            "instance": [70.3, 69.4, 70.9]}  # fmt: skip
    for norm, values in accs.items():
        for seed, acc in enumerate(values):
            write_run(s / f"{norm}{seed}", norm, seed, test=acc, val=acc)


def test_a_pair_that_passes_only_before_holm_says_so_and_fdr_or_none_are_chosen_on_the_command_line(
    tmp_path: Path, capsys
) -> None:
    s = tmp_path / "s"
    close_pair_sweep(s)
    assert main([str(s), "--no-plots"]) == 0  # holm, the default
    holm = pd.read_csv(s / "comparisons.csv").set_index(["a", "b"])
    close = holm.loc["batch", "group"]
    raw = close["p_value"]
    # Holm: the second largest of 6 p-values is multiplied by 2
    assert raw == pytest.approx(0.0309, abs=1e-4) and close["p_adjusted"] == pytest.approx(2 * raw)
    assert close["family_size"] == 6
    assert close["distinguishable"] == "no — not distinguishable with n=3 seeds (p<0.05 before the Holm correction)"
    assert holm.loc[("layer", "instance"), "distinguishable"] == "no — not distinguishable with n=3 seeds"
    assert holm.drop([("batch", "group"), ("layer", "instance")])["distinguishable"].eq("yes").all()
    assert "(p adjusted with Holm for the table's 6 tests)" in capsys.readouterr().out

    assert main([str(s), "--no-plots", "--correction", "fdr"]) == 0
    fdr = pd.read_csv(s / "comparisons.csv").set_index(["a", "b"])
    assert fdr["correction"].eq("fdr").all()
    assert fdr.loc[("batch", "group"), "p_adjusted"] == pytest.approx(raw * 6 / 5)  # BH: rank 5 of 6, p·6/5
    assert fdr.loc[("batch", "group"), "distinguishable"] == "yes"  # the false discovery rate lets it pass
    md = (s / "comparisons.md").read_text()
    assert "distinguishable (Benjamini–Hochberg p<0.05)" in md and "p (Benjamini–Hochberg)" in md

    assert main([str(s), "--no-plots", "--correction", "none"]) == 0
    none = pd.read_csv(s / "comparisons.csv").set_index(["a", "b"])
    assert (none["p_adjusted"] == none["p_value"]).all() and none.loc[("batch", "group"), "distinguishable"] == "yes"
    md = (s / "comparisons.md").read_text()
    assert "**No multiple-comparison correction**" in md and "p (none)" not in md
    assert "distinguishable at p<0.05 (no correction)" in md and "t-test at α = 0.05" in md
    with pytest.raises(SystemExit):
        main([str(s), "--correction", "bonferroni"])


def test_the_callback_takes_its_correction_from_conf_train_yaml(tmp_path: Path, caplog, monkeypatch) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .conftest import REPO

    monkeypatch.setattr(plots, "write_plots", lambda *args: [])  # the tables are the point here
    node = OmegaConf.load(REPO / "conf" / "train.yaml").hydra.callbacks.report
    assert node.correction == "holm"
    s = tmp_path / "s"
    close_pair_sweep(s)
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(s)}}})
    for correction in ("holm", "fdr"):  # hydra.callbacks.report.correction=fdr on the command line
        callback = instantiate(OmegaConf.merge(node, {"correction": correction}))
        assert isinstance(callback, ReportCallback)
        with caplog.at_level("INFO", logger="normsweep.report.tables"):
            callback.on_multirun_end(sweep)
        assert pd.read_csv(s / "comparisons.csv")["correction"].eq(correction).all()
    assert "(p adjusted with Benjamini–Hochberg for the table's 6 tests)" in caplog.text
    with pytest.raises(ValueError, match="correction='bh': choose one of holm, fdr, none"):
        ReportCallback(correction="bh")


def test_comparisons_from_a_results_csv_are_the_report_s_own(sweep: Path, tmp_path: Path, capsys) -> None:
    write_report([sweep], plots=False)
    comparisons_from_csv(sweep / "results.csv", tmp_path / "again")
    written = pd.read_csv(sweep / "comparisons.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "comparisons.csv"), written)
    md = (tmp_path / "again" / "comparisons.md").read_text()
    assert f"From `{(sweep / 'results.csv').as_posix()}`" in md
    assert md.split("\n\n", 2)[2] == (sweep / "comparisons.md").read_text().split("\n\n", 1)[1]  # same below
    assert main(["--from-csv", str(sweep / "results.csv"), "--out", str(tmp_path / "cli"), "--correction", "fdr"]) == 0
    assert pd.read_csv(tmp_path / "cli" / "comparisons.csv")["correction"].eq("fdr").all()
    assert not (tmp_path / "cli" / "results.md").exists()  # only the comparisons
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert main(["--from-csv", str(tmp_path / "other.csv")]) == 2
    assert "is not a results.csv of normsweep.report: no column final_test_acc, job, status" in capsys.readouterr().err
    for argv in ([], [str(sweep), "--from-csv", str(sweep / "results.csv")]):
        with pytest.raises(SystemExit):
            main(argv)


def test_norms_with_their_own_recipes_are_compared_at_the_same_batch_size_only(tmp_path: Path) -> None:
    s = tmp_path / "sweep"
    batch_size_sweep(s, lambda norm, batch, seed: 70.0 + len(norm) + batch / 100 + seed * 0.3)
    for job in s.iterdir():  # each norm with its own recipe, as `experiment=batch_size` runs them
        res = json.loads((job / "results.json").read_text())
        res["choices"]["recipe"] = res["norm"]
        (job / "results.json").write_text(json.dumps(res))
    table = compare_configs(collect([s])).table
    norms, sizes = table[table["setting"] == "norm"], table[table["setting"] == "batch_size"]
    # 3 norms x 4 batch sizes: 3 norm pairs at each size, 6 size pairs per norm; no BN at 2 against GN at 256
    assert (len(norms), len(sizes), len(table)) == (12, 18, 30)
    assert norms["where"].str.contains(r"batch_size=\d+; each norm with its own recipe").all()
    assert not table["where"].str.contains("batch_size)", regex=False).any()
    assert table["family_size"].eq(30).all()
