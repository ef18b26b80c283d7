"""p-values below 1/N from a fitted permutation null (PALM's accelerations, Winkler et al. 2016).

- ``gamma``: a gamma with location (Pearson type III) matched to the null's mean, variance and skewness; it
  covers the whole range, and p for a value far past the largest null value comes from its tail.
- ``tail``: a generalised Pareto fitted by maximum likelihood (location 0) to the exceedances over the null's
  upper ``1 - tail_fraction`` quantile; above that threshold p = (exceedances / N) * GPD survival, below it the
  plain permutation p.

Both report a Kolmogorov-Smirnov distance and p between the fitted law and the null values it was fitted to (for
``tail``, the exceedances): a small p (say < 0.05) says the approximation should not be trusted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy import stats as sps

from hpcdiff.errors import UsageError

Accel = Literal["none", "gamma", "tail"]
ACCELS: tuple[str, ...] = ("none", "gamma", "tail")
MIN_NULL = 20
"""Fewest null values a fit is attempted on."""
MIN_EXCEEDANCES = 10
"""Fewest null values above the tail threshold a Pareto is fitted to."""


def min_permutations(method: str, tail_fraction: float = 0.1) -> int:
    """Permutations ``method`` needs: checked before a run starts rather than when its null is complete."""
    return MIN_NULL if method != "tail" else max(MIN_NULL, math.ceil(MIN_EXCEEDANCES / tail_fraction))


P_FLOOR = float(np.finfo(np.float64).eps)


@dataclass
class TailFit:
    """A fitted null and how well it fits.

    Attributes:
        method: "gamma" or "tail".
        params: the law's parameters (gamma: mean, std, skew; tail: threshold, shape, scale, exceedances).
        ks_statistic, ks_pvalue: Kolmogorov-Smirnov distance and p of the fitted values against the law.
        num_null: null values fitted (N).
    """

    method: str
    params: dict[str, float]
    ks_statistic: float
    ks_pvalue: float
    num_null: int
    _null: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    def sf(self, values: np.ndarray) -> np.ndarray:
        """Approximate P(null >= value), same shape as ``values``; NaN stays NaN."""
        v = np.asarray(values, dtype=np.float64)
        p = self.params
        if self.method == "gamma":
            fitted = sps.pearson3.sf(v, p["skew"], loc=p["mean"], scale=p["std"])
        else:
            n = self._null.size
            plain = (1.0 + n - np.searchsorted(self._null, v, side="left")) / (n + 1.0)
            over = p["exceedances"] / n * sps.genpareto.sf(v - p["threshold"], p["shape"], scale=p["scale"])
            fitted = np.where(v > p["threshold"], over, plain)
        # A fitted law may end below a value (a Pareto with negative shape is bounded): p floors at machine epsilon.
        return np.where(np.isnan(v), np.nan, np.clip(fitted, P_FLOOR, 1.0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_null")
        return d


def fit_tail(null: np.ndarray, method: str, tail_fraction: float = 0.1) -> TailFit:
    """Fit ``method`` ("gamma" or "tail") to null values, shape (N,)."""
    x = np.asarray(null, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < MIN_NULL:
        raise UsageError(f"--accel {method} needs at least {MIN_NULL} permutations to fit a null, got {x.size}")
    if method == "gamma":
        mean, std, skew = float(x.mean()), float(x.std(ddof=1)), float(sps.skew(x, bias=False))
        ks = sps.kstest(x, sps.pearson3(skew, loc=mean, scale=std).cdf)
        params = {"mean": mean, "std": std, "skew": skew}
    elif method == "tail":
        threshold = float(np.quantile(x, 1.0 - tail_fraction))
        exceed = x[x > threshold] - threshold
        if exceed.size < MIN_EXCEEDANCES:
            raise UsageError(
                f"--accel tail needs at least {MIN_EXCEEDANCES} null values above the threshold, got {exceed.size}"
            )
        shape, _, scale = sps.genpareto.fit(exceed, floc=0.0)
        ks = sps.kstest(exceed, sps.genpareto(shape, scale=scale).cdf)
        params = {"threshold": threshold, "shape": float(shape), "scale": float(scale), "exceedances": exceed.size}
    else:
        raise UsageError(f"unknown --accel '{method}': choose one of {', '.join(ACCELS)}")
    return TailFit(method, params, float(ks.statistic), float(ks.pvalue), int(x.size), np.sort(x))
