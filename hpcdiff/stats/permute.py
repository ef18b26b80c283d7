"""Freedman-Lane permutation statistics as batched matrix products, on arrays (no files, no slicing).

Freedman and Lane (1983): fit the nuisance columns Z alone, keep the residuals e = R_z Y, permute them, refit the
full model X = [tested, Z]. Z's fitted part lies in X's column space, so it changes no t or F and is never added
back. Permuting the rows of e by P is the same as permuting the rows of X by P^-1, and a statistic of the full
model needs only M = X_P' e (p x V) and e'e (which no permutation changes): with G = (X'X)^-1 (also unchanged),
beta = G M and RSS = e'e - sum(M * beta); the intercept's row of M is always 0 and is never computed. Stacking B
permuted designs gives one (B p, n) @ (n, V) product per block of subjects, so a batch of B permutations reads the
data once and memory does not grow with subjects.

Permutation k is a pure function of (seed, k): its generator is seeded by the pair, so any process computes any
k without drawing the ones before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hpcdiff.errors import DataError

Statistic = Literal["t", "F"]


def permutation(seed: int, k: int, num_rows: int, blocks: np.ndarray | None = None) -> np.ndarray:
    """Design-row order of permutation k: row i of the permuted design is row ``result[i]`` of the design.

    Args:
        seed: the run's seed.
        k: permutation index, 0-based.
        num_rows: subjects n.
        blocks: exchangeability block label per row, shape (n,); rows are only shuffled within their block.
    """
    rng = np.random.default_rng([seed, k])
    if blocks is None:
        return rng.permutation(num_rows)
    order = np.arange(num_rows)
    for label in np.unique(blocks):
        rows = np.flatnonzero(blocks == label)
        order[rows] = rows[rng.permutation(rows.size)]
    return order


def check_blocks(blocks: np.ndarray, column: str) -> None:
    """Refuse exchangeability blocks that leave nothing to permute (every block one subject)."""
    _, counts = np.unique(blocks, return_counts=True)
    if counts.max() < 2:
        raise DataError(
            f"exchangeability column '{column}' has one subject per block ({counts.size} blocks): nothing can be "
            "permuted; give a column that groups subjects (e.g. site or family), or leave it out"
        )


@dataclass
class FreedmanLane:
    """A design, the tested columns and the statistic; turns nuisance residuals into permuted statistics.

    Attributes:
        x: design, shape (n, p).
        tested: indices of the tested columns (one: t; several: F).
        two_sided: with t, rank |t| (nilearn's default) rather than t (FSL's).
    """

    x: np.ndarray
    tested: Sequence[int]
    two_sided: bool = True

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, dtype=np.float64)
        n, p = self.x.shape
        self.tested = list(self.tested)
        self.nuisance = [i for i in range(p) if i not in self.tested]
        if n <= p:
            raise DataError(f"{n} subjects for {p} model columns: a permutation test needs more subjects than columns")
        self.g = np.linalg.inv(self.x.T @ self.x)
        self.df = n - p
        assert self.nuisance, "the intercept is always nuisance"
        self._z_pinv = np.linalg.pinv(self.x[:, self.nuisance])
        self._w = np.linalg.inv(self.g[np.ix_(self.tested, self.tested)])
        # A constant nuisance column (the intercept) is the same in every permuted design, and e sums to 0 against
        # it (e is a residual of Z): its row of M is 0, so M keeps only the other ("moving") columns' rows, and G
        # only their rows and columns.
        self._moving = [i for i in range(p) if i in self.tested or np.ptp(self.x[:, i]) > 0]
        self._g_moving = self.g[np.ix_(self._moving, self._moving)]
        self._tested_moving = [self._moving.index(j) for j in self.tested]
        self._work: dict[str, np.ndarray] = {}

    @property
    def statistic(self) -> Statistic:
        return "t" if len(self.tested) == 1 else "F"

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]

    def nuisance_fit(self, y_blocks: Iterable[tuple[slice, np.ndarray]]) -> np.ndarray:
        """Nuisance coefficients (Z'Z)^-1 Z'Y, summed over (rows, y) blocks covering every subject: (q, V)."""
        parts = (self._z_pinv[:, rows] @ np.asarray(y, dtype=np.float64) for rows, y in y_blocks)
        return sum(parts)  # type: ignore[return-value]

    def residuals(self, y: np.ndarray, rows: slice, gamma: np.ndarray) -> np.ndarray:
        """e = Y - Z gamma for the subjects in ``rows`` (y shape (len(rows), V))."""
        return np.asarray(y, dtype=np.float64) - self.x[rows][:, self.nuisance] @ gamma

    def products(self, e_blocks: Iterable[tuple[slice, np.ndarray]], orders: np.ndarray) -> np.ndarray:
        """M = X_P' e for each permutation (moving columns only), summed over blocks of subjects: (B, k, V).

        The result lives in a buffer the next call overwrites: fresh arrays of this size each batch cost more in
        page faults than the products themselves.

        Args:
            e_blocks: (rows, e) pairs covering every subject once, in a fixed order, e shape (len(rows), V).
            orders: design-row orders, shape (B, n) (see ``permutation``).
        """
        b, k = orders.shape[0], len(self._moving)
        # (B, n, k) -> (B k, n): every permuted design as rows of one matrix.
        x = self.x[:, self._moving]
        stacked = np.ascontiguousarray(x[orders].transpose(0, 2, 1).reshape(b * k, -1))
        total = part = None
        for rows, e in e_blocks:
            if total is None:
                total, part = self._buffer("total", (b * k, e.shape[1])), self._buffer("part", (b * k, e.shape[1]))
                np.matmul(stacked[:, rows], e, out=total)
            else:
                np.matmul(stacked[:, rows], e, out=part)
                total += part
        assert total is not None, "no subjects"
        return total.reshape(b, k, -1)

    def _buffer(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        size = shape[0] * shape[1]
        if name not in self._work or self._work[name].size < size:
            self._work[name] = np.empty(size)
        return self._work[name][:size].reshape(shape)

    def statistics(self, m: np.ndarray, ee: np.ndarray) -> np.ndarray:
        """Signed t (one tested column) or F (several) per permutation and voxel, shape (B, V).

        Args:
            m: X_P' e of the moving columns, shape (B, k, V) (``products``).
            ee: e'e per voxel, shape (V,).
        """
        beta = np.matmul(self._g_moving, m)
        rss = np.maximum(ee - np.einsum("bpv,bpv->bv", m, beta), 0.0)
        sigma2 = rss / self.df
        c = beta[:, self._tested_moving]
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.statistic == "t":
                j = self.tested[0]
                return c[:, 0] / np.sqrt(sigma2 * self.g[j, j])
            num = np.einsum("brv,rs,bsv->bv", c, self._w, c) / len(self.tested)
            return num / sigma2

    def ranked(self, stat: np.ndarray) -> np.ndarray:
        """What is ranked against the null: |t| when two-sided, else t or F as they are."""
        return np.abs(stat) if self.two_sided and self.statistic == "t" else stat


@dataclass
class NullResult:
    """Observed statistic and what the permutations give, for in-memory data.

    Attributes:
        stat: observed t or F, shape (V,).
        max_null: max over voxels of the ranked statistic per permutation, shape (N,).
        exceed: per voxel, permutations whose ranked statistic reached the observed one, shape (V,).
    """

    stat: np.ndarray
    max_null: np.ndarray
    exceed: np.ndarray

    def p_fwe(self, ranked: np.ndarray) -> np.ndarray:
        """FWE p by the max statistic: (1 + #{max >= s}) / (N + 1) per voxel."""
        return fwe_p(ranked, self.max_null)


def fwe_p(ranked: np.ndarray, max_null: np.ndarray) -> np.ndarray:
    """(1 + #{null maxima >= value}) / (N + 1) for each value; NaN stays NaN."""
    null = np.sort(np.asarray(max_null, dtype=np.float64))
    below = np.searchsorted(null, ranked, side="left")
    p = (1.0 + null.size - below) / (null.size + 1.0)
    return np.where(np.isnan(ranked), np.nan, p)


def permuted_statistics(
    y: np.ndarray, model: FreedmanLane, orders: np.ndarray, block: int = 16, batch: int = 64
) -> NullResult:
    """The whole permutation test of in-memory data with explicit permutations (for tests and benchmarks).

    Args:
        y: data, shape (n, V).
        orders: design-row orders, shape (N, n); row k is permutation k.
        block: subjects per product (as the streaming path reads them).
        batch: permutations per product.
    """
    y_blocks = [(slice(s, s + block), y[s : s + block]) for s in range(0, y.shape[0], block)]
    gamma = model.nuisance_fit(y_blocks)
    e_blocks = [(rows, model.residuals(part, rows, gamma)) for rows, part in y_blocks]
    ee = sum(np.einsum("bv,bv->v", e, e) for _, e in e_blocks)
    identity = np.arange(model.num_rows)[None]
    stat = model.statistics(model.products(e_blocks, identity), ee)[0]
    observed = model.ranked(stat)
    maxima, exceed = [], np.zeros(stat.size, dtype=np.int64)
    for start in range(0, orders.shape[0], batch):
        ranked = model.ranked(model.statistics(model.products(e_blocks, orders[start : start + batch]), ee))
        maxima.append(np.nanmax(ranked, axis=1))
        exceed += (ranked >= observed).sum(axis=0)
    return NullResult(stat, np.concatenate(maxima), exceed)
