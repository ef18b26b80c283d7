"""Mass-univariate general linear model from sufficient statistics, and the tests built on it.

Every voxel shares one design X (N, p), so (X'X, X'Y, Y'Y) summed over blocks of subjects are all a voxelwise
ordinary least squares fit needs: beta = (X'X)^-1 X'Y and RSS = Y'Y - beta'X'Y. The sums are additive, so
blocks can be reduced in any order on any scheduler, and one subject can be taken out again exactly
(leave-one-out for normative z-scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass
class SufficientStats:
    """Sums over subjects that determine a voxelwise least-squares fit.

    Y is shifted by a fixed per-voxel offset before the sums are taken: with an intercept in the design, the
    shift changes only the intercept, and it keeps Y'Y - beta'X'Y from cancelling digits when the mean is large.

    Attributes:
        xtx: X'X, shape (p, p).
        xty: X'Y, shape (p, V).
        yty: voxelwise sum of Y^2, shape (V,).
        n: number of subjects summed.
    """

    xtx: np.ndarray
    xty: np.ndarray
    yty: np.ndarray
    n: int

    @classmethod
    def from_block(cls, x: np.ndarray, y: np.ndarray) -> SufficientStats:
        """Sums of one block.

        Args:
            x: design rows of the block, shape (b, p).
            y: shifted values, shape (b, V).
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return cls(x.T @ x, x.T @ y, np.einsum("bv,bv->v", y, y), x.shape[0])

    def combine(self, other: SufficientStats) -> SufficientStats:
        return SufficientStats(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty, self.n + other.n)

    def without(self, x: np.ndarray, y: np.ndarray) -> SufficientStats:
        """These sums with one subject taken out (x shape (p,), y shape (V,), shifted like the rest)."""
        other = SufficientStats.from_block(x[None, :], y[None, :])
        return SufficientStats(self.xtx - other.xtx, self.xty - other.xty, self.yty - other.yty, self.n - 1)


@dataclass
class GLMFit:
    """A voxelwise least-squares fit.

    Attributes:
        beta: coefficients, shape (p, V) (the intercept row is on the shifted scale).
        rss: residual sum of squares, shape (V,).
        df: residual degrees of freedom, n - p.
        xtx_inv: (X'X)^-1, shape (p, p).
    """

    beta: np.ndarray
    rss: np.ndarray
    df: int
    xtx_inv: np.ndarray

    @property
    def sigma2(self) -> np.ndarray:
        """Residual variance per voxel, RSS / (n - p), shape (V,)."""
        return self.rss / self.df

    def t(self, contrast: np.ndarray) -> np.ndarray:
        """t statistic of c'beta per voxel: c'beta / sqrt(sigma^2 c'(X'X)^-1 c), shape (V,)."""
        c = np.asarray(contrast, dtype=np.float64)
        effect = c @ self.beta
        var_c = float(c @ self.xtx_inv @ c)
        with np.errstate(divide="ignore", invalid="ignore"):
            return effect / np.sqrt(self.sigma2 * var_c)


def fit(s: SufficientStats) -> GLMFit:
    """Solve the normal equations from the sums; fails on a rank-deficient design (assert: callers check rank)."""
    p = s.xtx.shape[0]
    assert np.linalg.matrix_rank(s.xtx) == p, "design is rank deficient"
    xtx_inv = np.linalg.inv(s.xtx)
    beta = xtx_inv @ s.xty
    rss = np.maximum(s.yty - np.einsum("pv,pv->v", beta, s.xty), 0.0)
    return GLMFit(beta, rss, s.n - p, xtx_inv)


def welch_t(m1: np.ndarray, v1: np.ndarray, n1: int, m0: np.ndarray, v0: np.ndarray, n0: int):
    """Welch's t of (group 1 - group 0) and its Welch-Satterthwaite degrees of freedom, per voxel.

    Args:
        m1, m0: group means, shape (V,).
        v1, v0: unbiased group variances, shape (V,).
        n1, n0: group sizes.

    Returns:
        (t, df), each shape (V,).
    """
    a, b = v1 / n1, v0 / n0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (m1 - m0) / np.sqrt(a + b)
        df = (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n0 - 1))
    return t, df


def two_sided_p(t: np.ndarray, df: np.ndarray | float) -> np.ndarray:
    """Two-sided p value of a t statistic; NaN where t is NaN."""
    return 2.0 * sps.t.sf(np.abs(t), df)


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p values (q), same shape as ``p``; NaNs stay NaN and are not counted."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    pv = p[ok]
    m = pv.size
    if m == 0:
        return q
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q
