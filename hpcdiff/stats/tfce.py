"""Threshold-free cluster enhancement (Smith and Nichols 2009) of a statistic map.

TFCE(v) = sum over thresholds h <= s(v) of e(h)^E h^H, where e(h) is the size of the cluster that holds v when the
map is cut at h. As in fslmaths (and nilearn), the thresholds are 100 equal steps up to the map's maximum, and a
step's term is not multiplied by the step dh (a constant factor, which cancels in FWE p-values). Two-sided maps
enhance positive and negative clusters separately (steps up to the largest |value|) and give negative scores to
negative clusters. Defaults are FSL randomise's (-T): H = 2, E = 0.5, 26-connectivity in 3D.

Cost: a connected-component labelling per step (about 100 per sign), done many steps at a time on a 4D stack, on
the box around the voxels still above the lowest step, which shrinks as the steps rise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hpcdiff.errors import UsageError

CONNECTIVITY = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class TFCEOptions:
    """TFCE parameters."""

    height: float = 2.0
    """H: power of the threshold height."""
    extent: float = 0.5
    """E: power of the cluster extent."""
    connectivity: int = 26
    """neighbours that join a cluster: 6 (faces), 18 (edges) or 26 (corners)."""
    steps: int = 100
    """thresholds between 0 and the map's maximum."""

    def __post_init__(self) -> None:
        if self.connectivity not in CONNECTIVITY:
            raise UsageError(f"--tfce-connectivity must be 6, 18 or 26, got {self.connectivity}")
        if self.height <= 0 or self.extent <= 0 or self.steps < 1:
            raise UsageError(
                f"TFCE needs H > 0, E > 0 and steps >= 1, got H={self.height}, E={self.extent}, steps={self.steps}"
            )


def tfce(volume: np.ndarray, options: TFCEOptions = TFCEOptions(), two_sided: bool = True) -> np.ndarray:
    """TFCE scores of a 3D map, same shape; NaN counts as background.

    Args:
        volume: statistic map, shape (D, H, W).
        two_sided: also enhance negative clusters (negative scores); else only values above 0.
    """
    v = np.nan_to_num(np.asarray(volume, dtype=np.float64), nan=0.0)
    top = float(np.max(np.abs(v))) if two_sided else float(np.max(v, initial=0.0))
    out = np.zeros_like(v)
    if top <= 0:
        return out
    structure = ndimage.generate_binary_structure(3, CONNECTIVITY[options.connectivity])
    thresholds = np.linspace(0.0, top, options.steps + 1)[1:]
    for sign in (1.0, -1.0) if two_sided else (1.0,):
        signed, acc = sign * v, out
        start = 0
        while start < thresholds.size:
            above = signed >= thresholds[start]
            if not above.any():
                break  # the thresholds rise: nothing survives above either
            # Shrink to the box around what is still above: higher steps label ever smaller grids (views, so
            # ``acc`` still adds into ``out``).
            box = tuple(_span(above.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3))
            signed, acc = signed[box], acc[box]
            steps = thresholds[start : start + max(1, _STACKED_VOXELS // signed.size)]
            acc += _enhance(signed, steps, structure, options, sign)
            start += steps.size
    return out


_STACKED_VOXELS = 1 << 18
"""Boxes smaller than this many voxels x steps are labelled many steps at once (a call per step costs more than
the labelling of a small box)."""


def _enhance(signed: np.ndarray, steps: np.ndarray, structure: np.ndarray, options: TFCEOptions, sign: float):
    """Sum over ``steps`` of cluster size^E x step^H at each voxel of ``signed`` (D, H, W)."""
    if steps.size == 1:
        labels, _ = ndimage.label(signed >= steps[0], structure)
    else:
        # Steps stacked on a 4th axis that the structure does not connect: one labelling for them all.
        stacked = np.zeros((3, *structure.shape), dtype=bool)
        stacked[1] = structure
        labels, _ = ndimage.label(signed[None] >= steps[:, None, None, None], stacked)
    sizes = np.bincount(labels.ravel()).astype(np.float64) ** options.extent
    sizes[0] = 0.0
    weights = sign * steps**options.height
    if steps.size == 1:
        return sizes[labels] * weights[0]
    return np.einsum("kxyz,k->xyz", sizes[labels], weights)


def _span(hit: np.ndarray) -> slice:
    where = np.flatnonzero(hit)
    return slice(int(where[0]), int(where[-1]) + 1)
