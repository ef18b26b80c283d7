"""Reduction of per-block statistics over subjects, in memory that does not grow with the number of subjects.

Each block of subjects becomes a small summary (Moments, SufficientStats, or a tuple of them) inside the task that
read it, so a block of images never leaves its task. Summaries are folded into a few *lanes*, one per worker
thread: each lane is a chain of tasks that read a block, summarise it and merge it into the lane's running
summary, and the lanes are merged at the end, ``SPLIT_EVERY`` at a time. At 1 mm a summary is as large as the
block it summarises (GLM sums are p + 1 maps), so a tree of summaries held them by the dozen as subjects grew; a
lane holds one. With ``VoxelBlocks`` the read happens inside the fold too, so no scheduler can read blocks ahead
of their fold. The merge order changes the result only by rounding.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

from hpcdiff.stats.source import VoxelBlocks

SPLIT_EVERY = 8
"""Lane summaries merged per task at the end: what one merge holds in memory at once (plus its result)."""


def _merge(*parts: Any) -> Any:
    out = parts[0]
    for part in parts[1:]:
        out = tuple(a.combine(b) for a, b in zip(out, part)) if isinstance(out, tuple) else out.combine(part)
    return out


def _fold(acc: Any, summarise: Callable[..., Any], block: Any, index: int | None, *args: Any) -> Any:
    y = block.read(index) if index is not None else block
    part = summarise(y, *args)
    del y  # the block goes before the merge allocates the new running summary
    return part if acc is None else _merge(acc, part)


def parallelism() -> int:
    """Tasks the active dask scheduler runs at once: a distributed client's threads, else the local pool's."""
    if "distributed" in sys.modules:  # no client can be active without it; importing it costs a second
        from distributed import default_client

        try:
            return max(1, sum(default_client().nthreads().values()))
        except ValueError:
            pass
    if dask.config.get("scheduler", None) in ("sync", "synchronous", "single-threaded"):
        return 1
    return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


def reduce_blocks(
    y: da.Array | VoxelBlocks,
    summarise: Callable[..., Any],
    side: Sequence[np.ndarray] = (),
    shared: Sequence[Any] = (),
    lanes: int | None = None,
) -> Any:
    """Summarise every block of rows and merge the summaries; computed on the active dask scheduler.

    Args:
        y: subjects by voxels, shape (n, V): shards read block by block (``VoxelBlocks``), or a dask array
            chunked along subjects only (its blocks are computed by the scheduler ahead of the folds).
        summarise: ``summarise(y_block, *side_blocks, *shared)`` -> summary with a ``combine`` method (or a
            tuple of such).
        side: per-subject arrays (first axis n), sliced to each block's rows (e.g. design rows).
        shared: objects every block needs (e.g. a per-voxel shift), wrapped once as graph keys.
        lanes: running summaries folded in parallel; None: as many as the scheduler runs tasks at once.
    """
    if isinstance(y, VoxelBlocks):
        bounds = y.bounds
        source = dask.delayed(y, pure=True)
        blocks: list[tuple[Any, int | None]] = [(source, i) for i in range(len(y))]
    else:
        assert len(y.chunks[1]) == 1, "voxels must be one chunk"
        bounds = np.cumsum((0, *y.chunks[0]))
        blocks = [(b, None) for b in y.to_delayed().ravel()]
    shared_d = [dask.delayed(s, pure=True) for s in shared]
    acc: list[Any] = [None] * max(1, min(len(blocks), lanes or parallelism()))
    for k, ((block, index), lo, hi) in enumerate(zip(blocks, bounds[:-1], bounds[1:])):
        lane = k % len(acc)
        acc[lane] = dask.delayed(_fold, pure=True)(
            acc[lane], summarise, block, index, *(s[lo:hi] for s in side), *shared_d
        )
    while len(acc) > 1:  # many workers' lanes: a tree, so no merge holds more than SPLIT_EVERY of them
        acc = [dask.delayed(_merge, pure=True)(*acc[i : i + SPLIT_EVERY]) for i in range(0, len(acc), SPLIT_EVERY)]
    (result,) = dask.compute(acc[0])
    return result
