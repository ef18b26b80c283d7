"""Tree reduction of per-block statistics over a dask array of subjects.

Each block of subjects becomes a small summary (Moments, SufficientStats, or a tuple of them) inside the task that
read it, so a block of images never leaves its task; summaries are merged ``split_every`` at a time. Memory is a
few summaries per worker whatever the number of subjects, and the merge order does not change the result beyond
rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

SPLIT_EVERY = 8
"""Summaries merged per reduction task: what one merge holds in memory at once (plus its result)."""


def _merge(*parts: Any) -> Any:
    out = parts[0]
    for part in parts[1:]:
        out = tuple(a.combine(b) for a, b in zip(out, part)) if isinstance(out, tuple) else out.combine(part)
    return out


def reduce_blocks(
    y: da.Array,
    summarise: Callable[..., Any],
    side: Sequence[np.ndarray] = (),
    shared: Sequence[Any] = (),
    split_every: int = SPLIT_EVERY,
) -> Any:
    """Summarise every block of rows and merge the summaries; computed on the active dask scheduler.

    Args:
        y: subjects by voxels, shape (n, V), chunked along subjects only.
        summarise: ``summarise(y_block, *side_blocks, *shared)`` -> summary with a ``combine`` method (or a
            tuple of such).
        side: per-subject arrays (first axis n), sliced to each block's rows (e.g. design rows).
        shared: objects every block needs (e.g. a per-voxel shift), wrapped once as graph keys.
        split_every: summaries merged per reduction task.
    """
    assert len(y.chunks[1]) == 1, "voxels must be one chunk"
    bounds = np.cumsum((0, *y.chunks[0]))
    shared_d = [dask.delayed(s, pure=True) for s in shared]
    blocks = y.to_delayed().ravel()
    level = [
        dask.delayed(summarise, pure=True)(b, *(s[lo:hi] for s in side), *shared_d)
        for b, lo, hi in zip(blocks, bounds[:-1], bounds[1:])
    ]
    while len(level) > 1:
        level = [
            dask.delayed(_merge, pure=True)(*level[i : i + split_every]) for i in range(0, len(level), split_every)
        ]
    (result,) = dask.compute(level[0])
    return result
