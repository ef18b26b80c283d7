"""The statistics themselves, on a dask array of subjects by voxels: no files, no command line.

Each function streams the array once through ``reduce_blocks``; everything after the reduction is arithmetic on
a few voxel maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from hpcdiff.stats.design import Design
from hpcdiff.stats.glm import SufficientStats, fdr_bh, fit, two_sided_p, welch_t
from hpcdiff.stats.moments import Moments
from hpcdiff.stats.reduce import reduce_blocks
from hpcdiff.stats.source import VoxelBlocks


def template(y: da.Array | VoxelBlocks) -> Moments:
    """Voxelwise moments over all rows of ``y`` (n, V)."""
    return reduce_blocks(y, Moments.from_block)


def brain_mask(mean: np.ndarray, std: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """Voxels whose template mean exceeds ``threshold`` times the largest mean and that vary at all, shape (V,)."""
    return (mean > threshold * np.nanmax(mean)) & (std > 0)


@dataclass
class GroupStats:
    """What one pass gathers for a group model: GLM sums and per-group moments (Welch, Cohen's d)."""

    sums: SufficientStats
    group0: Moments
    group1: Moments


def _summarise(y: np.ndarray, x: np.ndarray, g: np.ndarray, shift: np.ndarray) -> tuple:
    y = np.asarray(y, dtype=np.float64) - shift
    return (SufficientStats.from_block(x, y), Moments.from_block(y[g == 0]), Moments.from_block(y[g == 1]))


def _summarise_glm(y: np.ndarray, x: np.ndarray, shift: np.ndarray) -> SufficientStats:
    return SufficientStats.from_block(x, np.asarray(y, dtype=np.float64) - shift)


def glm_sums(y: da.Array | VoxelBlocks, design: Design, shift: np.ndarray) -> SufficientStats:
    """Sufficient statistics of ``design`` over rows of ``y`` (n, V) (rows already those of the design)."""
    return reduce_blocks(y, _summarise_glm, side=[design.x], shared=[shift])


def group_stats(y: da.Array | VoxelBlocks, design: Design, shift: np.ndarray) -> GroupStats:
    """GLM sums plus per-group moments of (y - shift) in one pass; ``design`` must model a group."""
    sums, m0, m1 = reduce_blocks(y, _summarise, side=[design.x, design.group_of_row], shared=[shift])
    return GroupStats(sums, m0, m1)


def group_maps(stats: GroupStats, design: Design, pooled: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """Group effect maps (each (V,)): effect, t, df, p, q (BH-FDR), d, and a t map per covariate column.

    Without covariates the test is Welch's t (Welch-Satterthwaite df) unless ``pooled``; with covariates it is the
    GLM t (pooled residual variance, df = n - p). Cohen's d is the effect over the residual standard deviation,
    which without covariates is the classic (m1 - m0) / pooled sd.

    Returns:
        (maps, test) where test is "welch", "pooled" or "glm".
    """
    assert design.group_column is not None
    glm = fit(stats.sums)
    c = design.contrast(design.group_column)
    effect = c @ glm.beta
    maps: dict[str, np.ndarray] = {"effect": effect}
    covariate_columns = [i for i, name in enumerate(design.columns) if i not in (0, design.group_column)]
    if not covariate_columns and not pooled:
        g0, g1 = stats.group0, stats.group1
        t, df = welch_t(g1.mean, g1.variance(), g1.n, g0.mean, g0.variance(), g0.n)
        test = "welch"
    else:
        t, df = glm.t(c), np.full_like(effect, float(glm.df))
        test = "glm" if covariate_columns else "pooled"
    p = two_sided_p(t, df)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = effect / np.sqrt(glm.sigma2)
    maps.update(t=t, df=df, p=p, q=fdr_bh(p), d=d)
    for i in covariate_columns:
        maps[f"t_{design.columns[i]}"] = glm.t(design.contrast(i))
    return maps, test


def residual_variance(y: da.Array | VoxelBlocks, design: Design, shift: np.ndarray) -> tuple[np.ndarray, int]:
    """Residual variance RSS / (n - p) per voxel after fitting ``design``, and its degrees of freedom."""
    glm = fit(glm_sums(y, design, shift))
    return glm.sigma2, glm.df
