"""Random 3D training patches whose positions are a function of (seed, stream position).

Training on patches makes memory independent of the volume size. Like the 2D slice choice, a patch's corner depends
only on the seed and the sample's position in the data stream, so a resumed run, on any number of ranks, reads the
same patches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_PATCH_STREAM = 0x3D  # separates the patch-corner random stream from the permutation and slice streams


def patch_corners(shape: Sequence[int], patch: Sequence[int], seed: int, positions: np.ndarray) -> np.ndarray:
    """Low corner of the patch of each stream position, uniform over the valid corners; shape (n, 3), int64.

    Args:
        shape: the volume's (D, H, W).
        patch: the patch's (d, h, w), each at most the volume's.
        seed: the run's data seed.
        positions: stream positions, shape (n,).
    """
    high = np.array(shape, dtype=np.int64) - np.array(patch, dtype=np.int64) + 1
    if (high < 1).any():
        raise ValueError(f"patch {tuple(patch)} does not fit volumes of shape {tuple(shape)}")
    out = np.empty((len(positions), 3), dtype=np.int64)
    for i, p in enumerate(positions):
        out[i] = np.random.Generator(np.random.PCG64([seed, _PATCH_STREAM, int(p)])).integers(0, high)
    return out


def patch_selection(corner: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    """The (D, H, W) index of one patch, for ``ShardSet.read_into``."""
    return tuple(slice(int(c), int(c) + int(p)) for c, p in zip(corner, patch))
