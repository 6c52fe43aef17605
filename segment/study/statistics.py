"""Intervals over seeds and paired tests over seeds and cases.

A setting's figure is the mean over seeds of each seed's mean over cases, with a 95 % t
interval over the seeds: retraining is the variation a user meets. A difference between two
skip settings is paired: the same cases and, for each seed, the same training seed (the same
model when a skip is switched off at inference; the same seed's reference when a network is
trained otherwise). Its interval must hold for another seed and for other cases, so its
variance is the seeds' (the variance of the seeds' mean differences over the seeds) plus the
cases' (the variance of the cases' seed-averaged differences over the cases), with
Welch-Satterthwaite degrees of freedom. With three seeds the seeds' part has two degrees of
freedom and often dominates: a bootstrap over three seeds would understate it. The p-value
comes from a Wilcoxon signed-rank test over the cases' seed-averaged differences, which sees
the case noise only. A difference is called real only when its interval excludes zero."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    seeds: int

    def text(self, digits: int = 4) -> str:
        if self.seeds < 2:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class Difference:
    mean: float
    low: float
    high: float
    p_value: float
    seeds: int
    cases: int

    @property
    def real(self) -> bool:
        """The interval excludes zero (needs two seeds at least)."""
        return self.seeds >= 2 and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 4) -> str:
        interval = f"[{self.low:+.{digits}f}, {self.high:+.{digits}f}]" if self.seeds >= 2 else "(1 seed)"
        return f"{self.mean:+.{digits}f} {interval}"


def seed_interval(per_seed: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """Mean of the seeds' figures with its 95 % t interval. Over a few seeds a t interval can
    pass a bound the figure cannot (a Dice above 1, a negative norm): it is cut at ``bounds``."""
    values = np.asarray(per_seed, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, len(values))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return Interval(mean, max(mean - half, bounds[0]), min(mean + half, bounds[1]), len(values))


def geometric_interval(per_seed: Sequence[float]) -> Interval:
    """The geometric mean of positive figures that span decades (gradient norms, their ratios),
    with the t interval of their logarithms taken back: never below zero, and a ratio's interval
    is the same either way round."""
    logs = seed_interval(np.log(np.asarray(per_seed, dtype=float)))
    return Interval(math.exp(logs.mean), math.exp(logs.low), math.exp(logs.high), logs.seeds)


def paired_difference(differences: np.ndarray) -> Difference:
    """``differences``: (seeds, cases), setting B minus setting A per seed and case."""
    differences = np.atleast_2d(np.asarray(differences, dtype=float))
    seeds, cases = differences.shape
    mean = float(differences.mean())
    p_value = _case_p_value(differences)
    if seeds < 2:
        return Difference(mean, math.nan, math.nan, p_value, seeds, cases)
    parts = [differences.mean(axis=1).var(ddof=1) / seeds]  # the seeds' part
    freedom = [seeds - 1]
    if cases >= 2:
        parts.append(differences.mean(axis=0).var(ddof=1) / cases)  # the cases' part
        freedom.append(cases - 1)
    variance = sum(parts)
    if variance == 0:
        return Difference(mean, mean, mean, p_value, seeds, cases)
    degrees = variance**2 / sum(part**2 / df for part, df in zip(parts, freedom, strict=True))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, degrees) * math.sqrt(variance)
    return Difference(mean, mean - half, mean + half, p_value, seeds, cases)


def _case_p_value(differences: np.ndarray) -> float:
    """Wilcoxon signed-rank test over the cases' seed-averaged differences."""
    per_case = differences.mean(axis=0)
    nonzero = per_case[per_case != 0]
    return float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
