"""The report's statistics (normsweep.report.statistics) against hand-computed values and simulation.

The multiple-comparison corrections are checked against values written out by hand from their definitions
(Holm 1979; Benjamini & Hochberg 1995) for five p-values, and against statsmodels; Hedges' g against the
textbook formulas and statsmodels' meta-analysis helper; the seed count against a t-test power computed by
numerical integration. A simulated sweep whose configurations differ only by seed noise shows why the report
corrects: about 5% of its pairs pass uncorrected, while after Holm a report with any false "distinguishable"
stays as rare as 5%; a real difference stays distinguishable.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from normsweep.report.comparisons import compare_configs
from normsweep.report.statistics import (
    ALPHA,
    adjust_p_values,
    correction_name,
    hedges_g,
    per_test_alpha,
    seeds_needed,
    t_test_power,
    welch,
)

from .conftest import power_by_integration


@pytest.fixture
def no_full_gc_per_call(monkeypatch):
    """statsmodels' Holm branch runs ``gc.collect()`` on every call (a fifth of a second with torch loaded);
    200 simulated reports need the numbers, not the collections."""
    monkeypatch.setattr(gc, "collect", lambda *args: 0)


# Five p-values and their adjusted values, written out by hand from the definitions (m = 5).
# Sorted: p(1..5) = 0.004, 0.012, 0.033, 0.039, 0.2 (input positions 3, 0, 2, 1, 4).
P = [0.012, 0.039, 0.033, 0.004, 0.2]
# Holm: max over j <= i of (m - j + 1)·p(j): 5·0.004 = 0.02; 4·0.012 = 0.048; 3·0.033 = 0.099;
# 2·0.039 = 0.078 -> max(0.099, 0.078) = 0.099; 1·0.2 = 0.2.
HOLM = [0.048, 0.099, 0.099, 0.02, 0.2]
# Benjamini-Hochberg: min over j >= i of m·p(j)/j: 0.2·5/5 = 0.2; 0.039·5/4 = 0.04875; 0.033·5/3 = 0.055 ->
# min(0.055, 0.04875) = 0.04875; 0.012·5/2 = 0.03; 0.004·5/1 = 0.02.
BH = [0.03, 0.04875, 0.04875, 0.02, 0.2]


def test_holm_and_benjamini_hochberg_match_the_hand_computed_values() -> None:
    from statsmodels.stats.multitest import multipletests

    assert adjust_p_values(P, "holm") == pytest.approx(HOLM, rel=1e-12)
    assert adjust_p_values(P, "fdr") == pytest.approx(BH, rel=1e-12)
    assert adjust_p_values(P, "none") == pytest.approx(P, rel=0)
    assert adjust_p_values(P, "holm") == pytest.approx(multipletests(P, method="holm")[1], rel=1e-12)
    assert adjust_p_values(P, "fdr") == pytest.approx(stats.false_discovery_control(P, method="bh"), rel=1e-12)
    # the decisions at 0.05: Holm keeps the family-wise promise and calls two pairs, BH four
    assert [p < ALPHA for p in adjust_p_values(P, "holm")] == [True, False, False, True, False]
    assert [p < ALPHA for p in adjust_p_values(P, "fdr")] == [True, True, True, True, False]


def test_a_pair_without_a_test_is_not_counted_in_the_family() -> None:
    with_nan = [P[0], math.nan, *P[1:]]
    adjusted = adjust_p_values(with_nan, "holm")
    assert math.isnan(adjusted[1])
    assert [adjusted[0], *adjusted[2:]] == pytest.approx(HOLM, rel=1e-12)  # m is still 5
    assert np.isnan(adjust_p_values([math.nan, math.nan], "fdr")).all()
    assert adjust_p_values([], "holm").size == 0


def test_an_unknown_correction_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="correction='bonferroni': choose one of holm, fdr, none"):
        adjust_p_values(P, "bonferroni")
    assert [correction_name(c) for c in ("holm", "fdr", "none")] == ["Holm", "Benjamini–Hochberg", "none"]


def test_below_alpha_over_m_a_p_value_passes_either_correction_whatever_the_others(no_full_gc_per_call) -> None:
    rng = np.random.default_rng(7)
    for _ in range(100):
        m = int(rng.integers(2, 40))
        p = rng.uniform(0, 1, m) ** 3  # many small p-values
        level = per_test_alpha(m, "holm")
        assert level == ALPHA / m == per_test_alpha(m, "fdr")
        for correction in ("holm", "fdr"):
            passed = adjust_p_values(p, correction) < ALPHA
            assert passed[p < level].all()
    assert per_test_alpha(7, "none") == ALPHA and per_test_alpha(1, "holm") == ALPHA


def test_hedges_g_and_its_interval_are_the_textbook_formulas() -> None:
    from statsmodels.stats.meta_analysis import effectsize_smd

    a, b = [82.1, 82.6, 82.4], [81.3, 81.6, 81.2, 81.9]
    n1, n2 = len(a), len(b)
    s = math.sqrt(((n1 - 1) * np.var(a, ddof=1) + (n2 - 1) * np.var(b, ddof=1)) / (n1 + n2 - 2))
    d = (np.mean(a) - np.mean(b)) / s
    j = 1 - 3 / (4 * (n1 + n2) - 9)  # Borenstein et al. (2009), eq. 4.22
    se = j * math.sqrt((n1 + n2) / (n1 * n2) + d**2 / (2 * (n1 + n2)))  # eqs. 4.20 and 4.24
    z = stats.norm.ppf(0.975)
    g = hedges_g(a, b)
    assert g == pytest.approx({"g": j * d, "g_low": j * d - z * se, "g_high": j * d + z * se}, rel=1e-12)
    smd, _ = effectsize_smd(np.mean(a), np.std(a, ddof=1), n1, np.mean(b), np.std(b, ddof=1), n2)
    assert g["g"] == pytest.approx(smd, rel=1e-12)  # statsmodels' bias-corrected standardized difference
    assert hedges_g(b, a)["g"] == pytest.approx(-g["g"])
    assert all(math.isnan(v) for v in hedges_g([80.0, 80.0], [79.0, 79.0]).values())  # no spread: undefined


@pytest.mark.parametrize("diff,std,alpha", [(0.23, 0.47, 0.05), (1.0, 1.0, 0.05), (0.18, 0.29, 0.05 / 3),
                                            (12.5, 2.2, 0.05 / 231), (4.8, 1.6, 0.05 / 231)])  # fmt: skip
def test_seeds_needed_is_the_least_n_whose_t_test_reaches_80_percent_power(diff, std, alpha) -> None:
    n = seeds_needed(diff, std, alpha)
    effect = diff / std
    assert power_by_integration(n, effect, alpha) >= 0.8
    assert n == 2 or power_by_integration(n - 1, effect, alpha) < 0.8
    assert t_test_power(n, effect, alpha) == pytest.approx(power_by_integration(n, effect, alpha), abs=1e-6)


def test_seeds_needed_agrees_with_statsmodels_and_grows_with_the_correction() -> None:
    from statsmodels.stats.power import TTestIndPower

    assert seeds_needed(0.23, 0.47) == math.ceil(TTestIndPower().solve_power(0.23 / 0.47, alpha=0.05, power=0.8))
    assert seeds_needed(0.23, 0.47) == 67  # the normal approximation said 65
    assert seeds_needed(0.23, 0.47, alpha=0.05 / 4) > 67
    # a large difference at a small level: the normal approximation says 2, a t-test with 2 seeds has 2 df
    assert seeds_needed(12.5, 2.2, alpha=0.05 / 231) == 5
    assert seeds_needed(0.0, 1.0) == math.inf and seeds_needed(5.0, 0.0) == 2


# --- the simulated sweep: 8 configurations x 3 seeds that differ only by seed noise -----------------------

CONFIGS, SEEDS, REPORTS = 8, 3, 200


def noise_report(rng: np.random.Generator, shift: dict[int, float] | None = None) -> pd.DataFrame:
    """The runs table of one simulated sweep: 8 "norms" whose accuracies are all drawn from N(80, 0.5²)
    (seed noise alone), the configurations in ``shift`` moved by that many points."""
    acc = rng.normal(80.0, 0.5, size=(CONFIGS, SEEDS))
    for config, points in (shift or {}).items():
        acc[config] += points
    return pd.DataFrame({
        "run": [str(i) for i in range(acc.size)], "job": "j", "path": "p", "status": "completed", "error": "",
        "norm": np.repeat([f"norm{i}" for i in range(CONFIGS)], SEEDS), "seed": np.tile(range(SEEDS), CONFIGS),
        "final_test_acc": acc.ravel(),
    })  # fmt: skip


def test_seed_noise_alone_passes_uncorrected_at_about_5_percent_and_holm_keeps_the_family_at_5(
    no_full_gc_per_call,
) -> None:
    rng = np.random.default_rng(2024)
    acc = rng.normal(80.0, 0.5, size=(REPORTS, CONFIGS, SEEDS))
    i, j = np.triu_indices(CONFIGS, 1)  # the 28 pairs of 8 configurations
    p = stats.ttest_ind(acc[:, i], acc[:, j], axis=2, equal_var=False).pvalue  # (reports, 28): welch() vectorized
    assert p.shape == (REPORTS, 28)
    assert p[0, 0] == pytest.approx(welch(acc[0, 0], acc[0, 1])["p_value"], rel=1e-12)
    raw = (p < ALPHA).mean()
    holm = np.array([adjust_p_values(row, "holm") for row in p])
    fdr = np.array([adjust_p_values(row, "fdr") for row in p])
    any_raw, any_holm, any_fdr = ((q < ALPHA).any(axis=1).mean() for q in (p, holm, fdr))
    # Welch's test with 3 seeds a side is a little conservative: 3.5% of the 5,600 null pairs pass uncorrected
    assert 0.02 <= raw <= 0.09, raw
    assert any_raw > 0.3, any_raw  # uncorrected, 44% of the reports show some "distinguishable" pair
    assert any_holm <= 0.06 and any_fdr <= 0.06, (any_holm, any_fdr)  # 2% each; all nulls: FDR = FWER

    acc[:, -1] -= 10.0  # one configuration broken: 10 points lower, at the same spread
    p = stats.ttest_ind(acc[:, i], acc[:, j], axis=2, equal_var=False).pvalue
    holm = np.array([adjust_p_values(row, "holm") for row in p])
    broken = j == CONFIGS - 1
    assert (p[:, broken] < ALPHA).all()
    # after Holm 97.5% of its pairs stay distinguishable (Welch's df can fall near 2 with 3 seeds a side)
    assert (holm[:, broken] < ALPHA).mean() >= 0.95
    assert (holm[:, ~broken] < ALPHA).any(axis=1).mean() <= 0.06  # and the others still hold the family's 5%


def test_the_report_calls_no_noise_pair_distinguishable_after_holm_but_a_real_difference_stays(
    no_full_gc_per_call,
) -> None:
    noise = compare_configs(noise_report(np.random.default_rng(12)), correction="holm")
    table = noise.table
    assert noise.family_size == 28 and len(table) == 28
    assert (table["p_value"] < ALPHA).any()  # this draw has pairs that pass uncorrected (this one has two)
    assert not (table["p_adjusted"] < ALPHA).any() and not table["distinguishable"].eq("yes").any()
    assert table["distinguishable"].str.contains("before the Holm correction").sum() == (table["p_value"] < ALPHA).sum()

    broken = compare_configs(noise_report(np.random.default_rng(13), shift={7: -10.0}), correction="holm").table
    involved = broken["b"] == "norm7"  # the lowest mean: always side b
    assert involved.sum() == 7 and (broken.loc[involved, "p_value"] < ALPHA).all()
    # 6 of its 7 pairs in this draw (one at Welch df 2.4: Holm-adjusted p 0.08); 97.5% over 200 draws, above
    passed = broken.loc[involved, "distinguishable"].eq("yes")
    assert passed.sum() == 6 and (broken.loc[involved & passed, "p_adjusted"] < ALPHA).all()
    assert (broken.loc[involved, "g"] > 5).all()  # 10 points at a spread of 0.5: a very large effect
    assert not (broken.loc[~involved, "p_adjusted"] < ALPHA).any()
