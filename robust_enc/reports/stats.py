"""The report's statistics over image counts: exact (Clopper-Pearson) intervals of an accuracy, ranks that are shared
where those intervals overlap, and the rule for when a correlation gets a p-value.

An accuracy measured on n images is k/n for an integer k; its uncertainty is binomial, and on the small subsets a
CPU affords for AutoAttack (40 images: +-15 points) it is larger than most differences between regularizers. A
leaderboard that ranks 75.00% above 75.00%, or 77.5% above 75.0% on 40 images, claims an order the data do not show.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_P_VALUE_MODELS = 5  # below this a correlation's p-value says little (3 points: r = 0.997 is p = 0.05)
NO_P_VALUE = f"n < {MIN_P_VALUE_MODELS}: no p-value"


def successes(fraction: float, n: int) -> int:
    """The count k behind an accuracy measured on ``n`` images (the fraction was written as k/n)."""
    return int(round(float(fraction) * int(n)))


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided binomial interval of k successes in n trials (Clopper & Pearson 1934), from the beta
    distribution's quantiles; (NaN, NaN) without trials. 3 of 10 -> (0.0667, 0.6525)."""
    if n <= 0 or not 0 <= k <= n:
        return math.nan, math.nan
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def accuracy_interval(fraction: float, n: float) -> tuple[float, float]:
    """``clopper_pearson`` of an accuracy (a fraction) on ``n`` images; NaN when either is missing."""
    if fraction is None or n is None or math.isnan(float(fraction)) or math.isnan(float(n)) or n <= 0:
        return math.nan, math.nan
    return clopper_pearson(successes(fraction, int(n)), int(n))


def shared_ranks(values: Sequence[float], lows: Sequence[float],
                 highs: Sequence[float]) -> tuple[list[int], list[bool]]:
    """Per model, its rank and whether it is tied. A model's rank is 1 + the number of models that are clearly better:
    whose interval lies wholly above its own. Models whose intervals overlap therefore share a rank, and a rank only
    moves down when the data separate two models. ``tied``: another model has the same rank."""
    def better(other: float, low: float, value: float, high: float) -> bool:
        if math.isnan(low) or math.isnan(high):  # no image count: the plain order
            return other > value
        return other > value and low > high

    ranks = [1 + sum(better(o, lo, v, hi) for o, lo in zip(values, lows)) for v, hi in zip(values, highs)]
    tied = [ranks.count(r) > 1 for r in ranks]
    return ranks, tied


def correlate(x: np.ndarray, y: np.ndarray, min_models: int) -> tuple[float, float, float, float, str]:
    """Pearson r, its p, Spearman rho, its p and a note. Fewer than ``min_models`` points or a constant side: NaN and
    why. Fewer than ``MIN_P_VALUE_MODELS`` points: the coefficients without p-values (``NO_P_VALUE``)."""
    if len(x) < min_models:
        return (math.nan,) * 4 + (f"needs at least {min_models} models with both values, has {len(x)}",)
    if any(np.ptp(v) <= 1e-12 * max(1.0, float(np.abs(v).max())) for v in (x, y)):  # float noise is not spread
        return (math.nan,) * 4 + ("constant values: correlation undefined",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # ties in ranks are fine for Spearman
        pearson = stats.pearsonr(x, y)
        spearman = stats.spearmanr(x, y)
    if len(x) < MIN_P_VALUE_MODELS:
        return float(pearson.statistic), math.nan, float(spearman.statistic), math.nan, NO_P_VALUE
    return float(pearson.statistic), float(pearson.pvalue), float(spearman.statistic), float(spearman.pvalue), ""


def multiple_comparisons_note(tested: int) -> str:
    """What the reader of ``tested`` p-values should know: some come out below 0.05 by chance alone."""
    if tested == 0:
        return f"no p-values: every correlation has fewer than {MIN_P_VALUE_MODELS} models"
    return (f"{tested} correlations tested (Pearson and Spearman each count), none corrected for multiple comparisons: "
            f"at p < 0.05 about {tested * 0.05:.1f} would pass by chance alone; the Bonferroni threshold is "
            f"p < {0.05 / tested:.2g}")
