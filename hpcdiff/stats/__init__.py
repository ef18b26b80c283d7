"""Group statistics over shards with dask: template, group differences, gamma residual model, normative z-scores,
real versus synthetic comparison, permutation inference. See docs/statistics.md for the commands and the maths."""

from hpcdiff.stats.analysis import (
    GroupStats,
    brain_mask,
    glm_sums,
    group_maps,
    group_stats,
    residual_variance,
    template,
)
from hpcdiff.stats.backend import BACKENDS, BackendOptions, backend
from hpcdiff.stats.commands import run_gamma, run_groupdiff, run_template
from hpcdiff.stats.compare import compare_maps, run_compare
from hpcdiff.stats.design import Design, build_design
from hpcdiff.stats.gammafit import GammaFit, fit_gamma
from hpcdiff.stats.glm import GLMFit, SufficientStats, fdr_bh, fit, two_sided_p, welch_t
from hpcdiff.stats.moments import Moments
from hpcdiff.stats.permtail import TailFit, fit_tail
from hpcdiff.stats.permute import FreedmanLane, permutation, permuted_statistics
from hpcdiff.stats.prepare import StatsOptions
from hpcdiff.stats.randomise import RandomiseOptions, run_randomise
from hpcdiff.stats.source import VoxelBlocks, voxel_array
from hpcdiff.stats.tfce import TFCEOptions, tfce
from hpcdiff.stats.zscore import normative_z, run_zscore

__all__ = [
    "BACKENDS",
    "BackendOptions",
    "Design",
    "FreedmanLane",
    "GLMFit",
    "GammaFit",
    "GroupStats",
    "Moments",
    "RandomiseOptions",
    "StatsOptions",
    "SufficientStats",
    "TFCEOptions",
    "TailFit",
    "backend",
    "brain_mask",
    "build_design",
    "compare_maps",
    "fdr_bh",
    "fit",
    "fit_gamma",
    "fit_tail",
    "glm_sums",
    "group_maps",
    "group_stats",
    "normative_z",
    "permutation",
    "permuted_statistics",
    "residual_variance",
    "run_compare",
    "run_gamma",
    "run_groupdiff",
    "run_randomise",
    "run_template",
    "run_zscore",
    "template",
    "tfce",
    "two_sided_p",
    "VoxelBlocks",
    "voxel_array",
    "welch_t",
]
