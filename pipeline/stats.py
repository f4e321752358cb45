"""Intervals and tests for aggregate metrics (METHODS.md, "Intervals").

A metric's state carries its count, sum and sum of squared deviations (`Moments`); states from
blocks and workers merge exactly (Chan et al.'s parallel update), so the interval of a run of
10M images costs the same three numbers as one of ten. Means get mean +- z s / sqrt(n); 0/1
metrics (a proportion) get Wilson score intervals, which stay inside [0, 1] and behave at
p = 0 or 1 and small n. Two runs compare with a paired t-test on per-image differences when they
scored the same images, else Welch's t-test on their moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

LEVEL = 0.95


def z_for(level: float = LEVEL) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


@dataclass(frozen=True)
class Moments:
    """n values' count, mean and M2 (the sum of squared deviations from the mean)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values) -> Moments:
        vals = [float(v) for v in values]
        if not vals:
            return cls()
        mean = math.fsum(vals) / len(vals)
        return cls(len(vals), mean, math.fsum((v - mean) ** 2 for v in vals))

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of values together (exact, in any order)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * other.n / n
        m2 = self.m2 + other.m2 + delta * delta * self.n * other.n / n
        return Moments(n, mean, m2)

    @property
    def variance(self) -> float | None:
        """The sample variance (n - 1 in the denominator); None below two values."""
        return self.m2 / (self.n - 1) if self.n > 1 else None

    @property
    def sd(self) -> float | None:
        v = self.variance
        return None if v is None else math.sqrt(max(v, 0.0))


def mean_interval(m: Moments, level: float = LEVEL) -> tuple[float, float] | None:
    """mean +- z s / sqrt(n); None below two values (no spread to estimate)."""
    if m.sd is None:
        return None
    half = z_for(level) * m.sd / math.sqrt(m.n)
    return (m.mean - half, m.mean + half)


def wilson_interval(successes: float, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Wilson's score interval of a proportion successes / n."""
    if n <= 0:
        return None
    z = z_for(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Difference:
    """current - baseline, with its interval, a two-sided p-value and a standardised effect
    (the difference over the values' standard deviation: Cohen's d, or d_z when paired)."""

    test: str  # "paired t" | "welch t"
    n: int  # pairs, or the smaller of the two samples
    delta: float
    interval: tuple[float, float]
    p_value: float
    effect: float | None


def paired_test(diffs: Moments, level: float = LEVEL) -> Difference | None:
    """Paired t-test from the moments of per-image differences (current - baseline)."""
    from scipy import stats

    if diffs.n < 2:
        return None
    sd = diffs.sd or 0.0
    if sd == 0.0:  # every image moved by the same amount: no noise to weigh it against
        p = 1.0 if diffs.mean == 0 else 0.0
        return Difference("paired t", diffs.n, diffs.mean, (diffs.mean, diffs.mean), p, None)
    se = sd / math.sqrt(diffs.n)
    dof = diffs.n - 1
    t = diffs.mean / se
    q = stats.t.ppf(0.5 + level / 2, dof)
    p = float(2 * stats.t.sf(abs(t), dof))
    return Difference(
        "paired t", diffs.n, diffs.mean, (diffs.mean - q * se, diffs.mean + q * se), p,
        diffs.mean / sd,
    )  # fmt: skip


def welch_test(current: Moments, baseline: Moments, level: float = LEVEL) -> Difference | None:
    """Welch's t-test of two independent samples from their moments."""
    from scipy import stats

    if current.variance is None or baseline.variance is None:
        return None
    va, vb = current.variance / current.n, baseline.variance / baseline.n
    delta = current.mean - baseline.mean
    se = math.sqrt(va + vb)
    pooled = math.sqrt((current.variance + baseline.variance) / 2)
    effect = delta / pooled if pooled > 0 else None
    n = min(current.n, baseline.n)
    if se == 0.0:
        return Difference("welch t", n, delta, (delta, delta), 1.0 if delta == 0 else 0.0, effect)
    dof = (va + vb) ** 2 / (
        va**2 / (current.n - 1) + vb**2 / (baseline.n - 1)
    )  # Welch-Satterthwaite
    q = stats.t.ppf(0.5 + level / 2, dof)
    p = float(2 * stats.t.sf(abs(delta / se), dof))
    return Difference("welch t", n, delta, (delta - q * se, delta + q * se), p, effect)
