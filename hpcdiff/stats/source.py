"""Shards as a dask array of voxels: one task per block of subjects, files opened inside the task.

One chunk per volume made dask ~5x slower than numpy streaming and 16 volumes per chunk ~2x, so a task reads
up to 16 subjects; at 1 mm (5.7 million voxels, ~46 MB per volume in float64) fewer, so that one task's block
stays near ``BLOCK_BYTES`` whatever the cohort: memory per thread is set by the grid, not by the subjects.
The ShardSet travels to workers without file handles (it pickles lazily) and opens its files in whichever
process runs the task; importing it imports hdf5plugin there, so LZ4 decodes on workers that never imported
it themselves. Voxels are flattened and, once a mask exists, reduced to the mask so per-block statistics stay
light.
"""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import numpy as np

from hpcdiff.data.shards import ShardSet

MAX_BLOCK = 16
"""Most subjects per task: enough to amortise dask's per-task cost on small grids."""
BLOCK_BYTES = 128 << 20
"""Float64 bytes of one task's block of volumes (the summaries convert the stored float16 once, to float64)."""


def block_for(num_voxels: int) -> int:
    """Subjects per task for volumes of ``num_voxels`` voxels: at most MAX_BLOCK, about BLOCK_BYTES of float64."""
    return max(1, min(MAX_BLOCK, BLOCK_BYTES // (8 * max(num_voxels, 1))))


def open_shards(root: str | Path) -> ShardSet:
    """Open an image shard directory (ShardError naming the file when it is not one; latent shards refused)."""
    shards = ShardSet.open(root)
    shards.require_images("hpcdiff stats")
    return shards


def _read_block(shards: ShardSet, rows: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    import hdf5plugin  # noqa: F401  # a worker process may not have registered the LZ4 filter yet

    volumes = shards.read_many(rows, dtype=np.float16).reshape(len(rows), -1)
    # Kept float16 (as stored): the summaries convert once, straight to float64.
    return volumes if mask is None else volumes[:, mask]


class VoxelBlocks:
    """The masked voxels of ``rows`` as blocks of subjects, each read by whichever task needs it.

    A reduction that holds this (one graph key: the ShardSet travels without handles) reads a block inside the
    task that summarises it, so no scheduler can read blocks ahead of the tasks that consume them: memory is set
    by the number of tasks running, never by the number of subjects.

    Args:
        shards: the shard set to read.
        rows: global subject indices, shape (n,); all subjects when None.
        mask: boolean mask over the flattened grid, shape (D*H*W,); every voxel when None.
        block: subjects per block; None sizes it from the grid (``block_for``).
    """

    def __init__(
        self, shards: ShardSet, rows: np.ndarray | None = None, mask: np.ndarray | None = None, block: int | None = None
    ) -> None:
        self.shards = shards
        self.rows = np.arange(shards.num_subjects) if rows is None else np.asarray(rows, dtype=np.int64)
        self.mask = mask
        self.block = block or block_for(int(np.prod(shards.shape)))
        self.num_voxels = int(np.prod(shards.shape)) if mask is None else int(mask.sum())
        self.bounds = np.array([*range(0, self.rows.size, self.block), self.rows.size], dtype=np.int64)

    def __len__(self) -> int:
        """Number of blocks."""
        return len(self.bounds) - 1

    def read(self, i: int) -> np.ndarray:
        """Block ``i`` as stored: float16, shape (rows in the block, num_voxels)."""
        return _read_block(self.shards, self.rows[self.bounds[i] : self.bounds[i + 1]], self.mask)

    def array(self) -> da.Array:
        """The blocks as a lazy (n, V) float16 dask array, one chunk per block."""
        # Wrapping once makes the ShardSet and the mask single graph keys, shipped to each worker once, not per task.
        shards_d = dask.delayed(self.shards, pure=True)
        mask_d = None if self.mask is None else dask.delayed(self.mask, pure=True)
        parts = []
        for lo, hi in zip(self.bounds[:-1], self.bounds[1:]):
            part = dask.delayed(_read_block, pure=True)(shards_d, self.rows[lo:hi], mask_d)
            parts.append(da.from_delayed(part, shape=(int(hi - lo), self.num_voxels), dtype=np.float16))
        return da.concatenate(parts, axis=0)


def voxel_array(
    shards: ShardSet, rows: np.ndarray | None = None, mask: np.ndarray | None = None, block: int | None = None
) -> da.Array:
    """The volumes of ``rows`` as a lazy (n, V) float16 dask array (the stored values) chunked by ``block`` subjects
    (arguments as ``VoxelBlocks``)."""
    return VoxelBlocks(shards, rows, mask, block).array()


def unflatten(values: np.ndarray, mask: np.ndarray, shape: tuple[int, int, int], fill: float = 0.0) -> np.ndarray:
    """Put masked voxel values (V,) back on the grid (D, H, W), ``fill`` outside the mask."""
    out = np.full(int(np.prod(shape)), fill, dtype=np.float32)
    out[mask] = values
    return out.reshape(shape)
