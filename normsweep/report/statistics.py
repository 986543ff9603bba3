"""The statistics of the report's pairwise comparisons: Welch's test, Hedges' g, the multiple-comparison
correction and the seeds a difference needs.

Plain numpy, scipy and statsmodels, no pandas tables: :mod:`normsweep.report.comparisons` builds the
comparisons table from these functions.

One comparison at a time (:func:`welch`, :func:`hedges_g`) is exact for that pair. A report holds many such
tests at once, and at p < 0.05 about one in twenty of the pairs that do not differ passes by chance; so the
p-values of a table are adjusted together (:func:`adjust_p_values`, Holm by default) and a pair is called
distinguishable on its adjusted p-value.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

ALPHA = 0.05  # two-sided tests at this level
POWER = 0.8  # seed counts for this power

# --correction: the name a user gives -> (statsmodels' multipletests method, the name a page shows)
CORRECTIONS = {"holm": ("holm", "Holm"), "fdr": ("fdr_bh", "Benjamini–Hochberg"), "none": (None, "none")}
DEFAULT_CORRECTION = "holm"


def welch(a, b, confidence: float = 1 - ALPHA) -> dict:
    """Welch's t-test of mean(a) - mean(b): the difference, its confidence interval, df and p-value.

    scipy's ``ttest_ind(equal_var=False)``; the interval is its ``confidence_interval()`` where the
    installed scipy has it (recent releases), else mean difference ± t(df) · standard error with the
    Welch–Satterthwaite degrees of freedom, the same formula. With no spread on either side (every
    seed gave the same value) there is nothing to test: p-value and df are NaN.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else math.nan
    diff = float(a.mean() - b.mean())
    if se == 0:  # every seed gave the same value on both sides: no spread to test against
        return {"diff": diff, "ci_low": diff, "ci_high": diff, "df": math.nan, "p_value": math.nan}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False)
        if hasattr(res, "confidence_interval"):
            ci = res.confidence_interval(confidence)
            low, high = float(ci.low), float(ci.high)
        else:
            half = float(stats.t.ppf((1 + confidence) / 2, dof)) * se
            low, high = diff - half, diff + half
    return {"diff": diff, "ci_low": low, "ci_high": high, "df": float(getattr(res, "df", dof)),
            "p_value": float(res.pvalue)}  # fmt: skip


def pooled_std(a, b) -> float:
    """The pooled within-configuration standard deviation: sqrt(((n_a−1)·s_a² + (n_b−1)·s_b²) / (n_a+n_b−2))."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))


def hedges_g(a, b, confidence: float = 1 - ALPHA) -> dict:
    """Hedges' g of mean(a) − mean(b) with its approximate confidence interval: the difference in units of the
    pooled seed-to-seed standard deviation, so that "real but tiny" reads as such.

    Borenstein, Hedges, Higgins & Rothstein (2009), *Introduction to Meta-Analysis*, ch. 4 (eqs. 4.18–4.24):
    d = (mean_a − mean_b) / s_pooled, J = 1 − 3 / (4·(n_a + n_b) − 9) (the small-sample bias correction),
    g = J·d, Var(d) = (n_a + n_b) / (n_a·n_b) + d² / (2·(n_a + n_b)), SE(g) = J·sqrt(Var(d)); the interval is
    g ± z_{1−α/2}·SE(g), a normal approximation (with 3 seeds a side it is rough; read its width, not its
    third digit). With no spread on either side g is undefined: NaN.
    """
    from scipy.stats import norm

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n_a, n_b, s = len(a), len(b), pooled_std(a, b)
    if s == 0 or not math.isfinite(s):
        return {"g": math.nan, "g_low": math.nan, "g_high": math.nan}
    d = (a.mean() - b.mean()) / s
    j = 1 - 3 / (4 * (n_a + n_b) - 9)
    se = j * math.sqrt((n_a + n_b) / (n_a * n_b) + d**2 / (2 * (n_a + n_b)))
    half = float(norm.ppf((1 + confidence) / 2)) * se
    return {"g": float(j * d), "g_low": float(j * d - half), "g_high": float(j * d + half)}


def adjust_p_values(p_values, correction: str = DEFAULT_CORRECTION) -> np.ndarray:
    """The p-values of one family of tests adjusted for their number, in their order; NaN (no test) stays NaN
    and does not count as a test.

    ``holm``: Holm's step-down method (Holm 1979), the family-wise error rate: the chance that *any* pair
    that does not differ is called distinguishable stays at most α. Sorted ascending, the i-th of m p-values
    becomes max over j ≤ i of min(1, (m − j + 1)·p_(j)). ``fdr``: Benjamini & Hochberg (1995), the false
    discovery rate: of the pairs called distinguishable, at most a fraction α is expected to be wrong (more
    power in a large table, a weaker promise); the i-th becomes min over j ≥ i of min(1, m·p_(j) / j).
    ``none``: the p-values as they are. Both corrections through statsmodels' ``multipletests`` (methods
    ``holm`` and ``fdr_bh``); a pair is distinguishable where its adjusted p-value is below α.
    """
    method = _method(correction)
    p = np.asarray(p_values, dtype=float)
    out = p.copy()
    tested = ~np.isnan(p)
    if method is None or not tested.any():
        return out
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError as e:  # a dependency of normsweep since the corrections came in
        raise ImportError("the report's --correction needs statsmodels: pip install 'statsmodels>=0.14'") from e
    out[tested] = multipletests(p[tested], alpha=ALPHA, method=method)[1]
    return out


def per_test_alpha(family_size: int, correction: str = DEFAULT_CORRECTION, alpha: float = ALPHA) -> float:
    """The level one pair's raw p-value must reach to be distinguishable whatever the others' p-values: α/m.

    With Holm and with Benjamini–Hochberg a p-value below α/m (m tests in the family) always passes. Holm: every
    p-value at or below it is below α/m too, so each passes its step (the k-th smallest is tested at
    α/(m − k + 1) ≥ α/m) and the procedure reaches it. Benjamini–Hochberg: its threshold at rank k is
    k·α/m ≥ α/m. α/m is Holm's level for the smallest p-value and conservative for the rest; it keeps the
    seed count (:func:`seeds_needed`) independent of the other pairs' results. Without a correction: α.
    """
    if _method(correction) is None or family_size <= 1:
        return alpha
    return alpha / family_size


def t_test_power(n: int, effect: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided two-sample t-test with ``n`` seeds a side at level ``alpha`` against a true difference
    of ``effect`` pooled standard deviations: P(|T| > t_{1−α/2, 2n−2}) with T noncentral t, 2n − 2 degrees of
    freedom, noncentrality effect·sqrt(n/2). The lower tail P(T < −c) is taken as P(T' > c) with the
    noncentrality negated (scipy's ``nct.cdf`` far in the lower tail returns NaN for a large noncentrality)."""
    from scipy import stats

    dof, ncp = 2 * n - 2, effect * math.sqrt(n / 2)
    crit = stats.t.isf(alpha / 2, dof)
    upper, lower = stats.nct.sf(crit, dof, ncp), stats.nct.sf(crit, dof, -ncp)
    return float(np.nan_to_num(upper) + np.nan_to_num(lower))


def seeds_needed(diff: float, std: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Seeds per configuration for a two-sided t-test at ``alpha`` to detect ``diff`` with ``power``.

    The smallest n (at least 2) whose :func:`t_test_power` at effect |diff|/std reaches ``power``: the t-test of
    two equal groups with standard deviation ``std``. The search starts at the normal approximation
    n = 2·((z_{1−α/2} + z_power)·std/diff)², which a t-test with few seeds needs more than, and far more at the
    small levels of a corrected test (α/m). inf when diff is 0; 2 when std is 0.
    The report passes :func:`per_test_alpha` as ``alpha``, so that the count is the one the corrected test needs.
    """
    from scipy.stats import norm

    if diff == 0 or not math.isfinite(diff) or not math.isfinite(std):
        return math.inf
    if std == 0:
        return 2
    effect = abs(diff) / std
    n = max(2, math.ceil(2 * ((norm.ppf(1 - alpha / 2) + norm.ppf(power)) / effect) ** 2))
    while n > 2 and t_test_power(n - 1, effect, alpha) >= power:
        n -= 1
    for _ in range(10_000):  # from the normal approximation, a few steps; the bound only guards against a NaN
        if t_test_power(n, effect, alpha) >= power:
            break
        n += 1
    return n


def correction_name(correction: str) -> str:
    """The correction as a page names it: ``Holm``, ``Benjamini–Hochberg`` or ``none``."""
    _method(correction)
    return CORRECTIONS[correction][1]


def _method(correction: str) -> str | None:
    if correction not in CORRECTIONS:
        raise ValueError(f"correction={correction!r}: choose one of {', '.join(CORRECTIONS)}")
    return CORRECTIONS[correction][0]
