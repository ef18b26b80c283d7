"""Streaming voxelwise mean and variance: per-block moments merged with Chan et al.'s pairwise update.

Summing raw squares over thousands of subjects loses digits when the mean is large against the spread; the
pairwise merge keeps (count, mean, sum of squared deviations) per block, so memory is one block plus a few maps
whatever the number of subjects, and the result does not depend on how subjects were split into blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) of voxel values over subjects.

    Attributes:
        n: number of subjects merged so far.
        mean: voxelwise mean, shape (V,), float64.
        m2: voxelwise sum of squared deviations from ``mean``, shape (V,), float64.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def from_block(cls, y: np.ndarray) -> Moments:
        """Moments of one block of subjects.

        Args:
            y: values, shape (b, V); any float dtype, accumulated in float64.
        """
        y = np.asarray(y, dtype=np.float64)
        if y.shape[0] == 0:
            return cls(0, np.zeros(y.shape[1]), np.zeros(y.shape[1]))
        mean = y.mean(axis=0)
        y = y - mean
        return cls(y.shape[0], mean, np.einsum("bv,bv->v", y, y))

    def combine(self, other: Moments) -> Moments:
        """Merge two disjoint sets of subjects (Chan, Golub and LeVeque 1979)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return Moments(n, mean, m2)

    def variance(self, ddof: int = 1) -> np.ndarray:
        """Voxelwise variance with ``ddof`` degrees of freedom removed (1: the unbiased sample variance)."""
        if self.n <= ddof:
            return np.full_like(self.mean, np.nan)
        return self.m2 / (self.n - ddof)

    def std(self, ddof: int = 1) -> np.ndarray:
        return np.sqrt(self.variance(ddof))
