"""Paired statistics for init-vs-init comparisons over seeds.

Every number here is about *paired* runs: seed ``s`` picks the labelled subjects and
seeds the finetuning run, and both inits (VoCo, scratch/random) get the same ``s``,
so ``d_s = voco_s - scratch_s`` removes the subject-draw and initialisation noise
they share.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20240611  # fixed: the same results file always gives the same CI


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean; ``(nan, nan)`` below 2 values."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return mean - half, mean + half


def bootstrap_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeds resampled with replacement,
    fixed RNG); ``(nan, nan)`` below 2 values."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    means = np.asarray(values, dtype=np.float64)[draws].mean(axis=1)
    low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


def paired_difference(treated: list[float], control: list[float]) -> dict:
    """``treated - control`` per pair: mean, std, 95% t and bootstrap intervals, wins.

    ``ci_above_zero`` is True only when *both* intervals exclude 0 from below."""
    if len(treated) != len(control):
        raise ValueError(f"paired lists differ in length: {len(treated)} vs {len(control)}")
    diffs = [float(a) - float(b) for a, b in zip(treated, control, strict=True)]
    if not diffs:
        return {"n": 0}
    t_low, t_high = t_interval(diffs)
    b_low, b_high = bootstrap_interval(diffs)
    return {
        "n": len(diffs),
        "mean": _r(statistics.fmean(diffs)),
        "std": _r(statistics.stdev(diffs)) if len(diffs) > 1 else 0.0,
        "ci95_t": [_r(t_low), _r(t_high)],
        "ci95_bootstrap": [_r(b_low), _r(b_high)],
        "wins": sum(d > 0 for d in diffs),
        "ci_above_zero": bool(len(diffs) > 1 and t_low > 0 and b_low > 0),
        "diffs": [_r(d) for d in diffs],
    }


def spread(values: list[float]) -> dict:
    """Mean, std, min, max and count of one init's values over seeds."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0}
    return {"mean": _r(statistics.fmean(values)),
            "std": _r(statistics.stdev(values)) if len(values) > 1 else 0.0,
            "min": _r(min(values)), "max": _r(max(values)), "n": len(values)}


def normalised_auc(steps: list[int], dice: list[float]) -> float:
    """Area under a learning curve (trapezoids between the evaluated steps) divided by
    the step range: the mean Dice over the curve, in [0, 1]. A single point is its own
    value."""
    if len(steps) != len(dice) or not steps:
        raise ValueError("a learning curve needs as many Dice values as steps, at least one")
    if len(steps) == 1:
        return float(dice[0])
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(dice, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def _r(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)
