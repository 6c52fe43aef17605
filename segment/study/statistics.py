"""Intervals over seeds and paired tests over seeds and cases.

A setting's figure is the mean over seeds of each seed's mean over cases, with a 95 % t
interval over the seeds: retraining is the variation a user meets. A difference between two
skip settings is paired: the same cases and, for each seed, the same training seed (the same
model when a skip is switched off at inference). Its interval comes from a two-level bootstrap
(seeds, then cases within them), so that it holds both sources of noise; its p-value from a
Wilcoxon signed-rank test over the cases' seed-averaged differences. Two settings (two
networks, each trained with its own seeds) are set against each other by the t interval of the
seeds' mean differences instead: there every network is a retraining, and over three seeds the
bootstrap would understate that noise. A difference is called real only when its interval
excludes zero."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 4000


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


def paired_difference(differences: np.ndarray, seed: int = 0) -> Difference:
    """``differences``: (seeds, cases), setting B minus setting A per seed and case."""
    differences = np.atleast_2d(np.asarray(differences, dtype=float))
    seeds, cases = differences.shape
    mean = float(differences.mean())
    p_value = _case_p_value(differences)
    if seeds < 2:
        return Difference(mean, math.nan, math.nan, p_value, seeds, cases)
    generator = np.random.default_rng(seed)
    chosen_seeds = generator.integers(0, seeds, size=(BOOTSTRAP_SAMPLES, seeds))
    chosen_cases = generator.integers(0, cases, size=(BOOTSTRAP_SAMPLES, seeds, cases))
    resampled = differences[chosen_seeds[..., None], chosen_cases].mean(axis=(1, 2))
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return Difference(mean, float(low), float(high), p_value, seeds, cases)


def seed_paired_difference(differences: np.ndarray) -> Difference:
    """``differences``: (seeds, cases), setting B minus setting A per seed and case, where A and
    B are networks trained apart: the t interval over the seeds' mean differences."""
    differences = np.atleast_2d(np.asarray(differences, dtype=float))
    per_seed = seed_interval(differences.mean(axis=1))
    return Difference(per_seed.mean, per_seed.low, per_seed.high, _case_p_value(differences), *differences.shape)


def _case_p_value(differences: np.ndarray) -> float:
    """Wilcoxon signed-rank test over the cases' seed-averaged differences."""
    per_case = differences.mean(axis=0)
    nonzero = per_case[per_case != 0]
    return float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
