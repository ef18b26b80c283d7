"""Steps every statistics command shares: open the shards, stream the template, derive the mask, save maps."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import ConfigError
from hpcdiff.stats import figures
from hpcdiff.stats.analysis import brain_mask, template
from hpcdiff.stats.design import Design, build_design
from hpcdiff.stats.moments import Moments
from hpcdiff.stats.outputs import save_map
from hpcdiff.stats.source import VoxelBlocks, open_shards, unflatten, voxel_array

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StatsOptions:
    """Options every statistics command takes."""

    block: int | None = None
    """subjects read per dask task; None sizes it from the voxel count (at most 16, fewer at 1 mm)."""
    mask_threshold: float = 0.05
    """voxels whose template mean exceeds this fraction of the largest mean are analysed."""

    def __post_init__(self) -> None:
        if self.block is not None and self.block < 1:
            raise ConfigError(f"block must be >= 1 (--block), got {self.block}")
        if not 0 <= self.mask_threshold < 1:
            raise ConfigError(f"mask_threshold must be in [0, 1) (--mask-threshold), got {self.mask_threshold}")


@dataclass
class Prepared:
    """Shards opened, the template streamed over ``rows`` and the analysis mask derived from it."""

    shards: ShardSet
    rows: np.ndarray
    moments: Moments
    mask: np.ndarray
    block: int | None = None
    passes: int = 1
    started: float = field(default_factory=time.perf_counter)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.shards.shape

    @property
    def shift(self) -> np.ndarray:
        """Template mean inside the mask: the per-voxel offset GLM sums are taken around."""
        return self.moments.mean[self.mask]

    def voxels(self) -> da.Array:
        """The masked voxels of ``rows`` as a dask array (n, V); each call is one more pass over the data."""
        self.passes += 1
        return voxel_array(self.shards, self.rows, self.mask, self.block)

    def blocks(self) -> VoxelBlocks:
        """The masked voxels of ``rows`` read block by block inside the reduction's tasks; one more pass."""
        self.passes += 1
        return VoxelBlocks(self.shards, self.rows, self.mask, self.block)

    def save(self, out: Path, name: str, values: np.ndarray) -> None:
        """Save a masked map (V,) as ``out/name.nii.gz`` (``t_sex[M]`` becomes ``t_sex-M``)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
        save_map(out / f"{safe}.nii.gz", values, self.mask, self.shape, self.shards.affine)

    def save_slices(self, out: Path, name: str, values: np.ndarray, title: str, symmetric: bool = True) -> None:
        figures.orthogonal_slices(unflatten(values, self.mask, self.shape), out / f"{name}.png", title, symmetric)

    def throughput(self) -> dict[str, float]:
        """Subjects/s and GB/s (decoded float16 bytes) over all passes since opening."""
        seconds = time.perf_counter() - self.started
        subjects = self.passes * self.rows.size
        nbytes = subjects * int(np.prod(self.shape)) * 2
        return {
            "seconds": seconds,
            "passes": self.passes,
            "subjects_per_s": subjects / seconds,
            "gb_per_s": nbytes / seconds / 1e9,
        }


def load_design(root: str | Path, **kwargs: Any) -> Design:
    """The design (see ``build_design`` for the keywords) over the subjects table of the shards at ``root``."""
    shards = open_shards(root)
    return build_design(shards.subjects(), shards.covariates, source=str(root), **kwargs)


def prepare(root: str | Path, options: StatsOptions, rows: np.ndarray | None = None) -> Prepared:
    """Open ``root``, stream the template over ``rows`` (all subjects when None) and derive the mask."""
    started = time.perf_counter()
    shards = open_shards(root)
    rows = np.arange(shards.num_subjects) if rows is None else np.asarray(rows)
    moments = template(VoxelBlocks(shards, rows, None, options.block))
    mask = brain_mask(moments.mean, moments.std(), options.mask_threshold)
    log.info("%s: template over %d subjects, %d voxels in the mask", root, rows.size, int(mask.sum()))
    return Prepared(shards, rows, moments, mask, options.block, started=started)
