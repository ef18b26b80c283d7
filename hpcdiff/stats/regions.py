"""Regions for per-region summaries: octants of the grid by default, or a label image on the same grid.

The default atlas is deliberately crude (no anatomical template ships with hpcdiff): the grid is cut in half
along each axis and each octant named by its RAS direction (e.g. ``L-A-S``), read from the shards' affine, so
names stay right whatever the voxel orientation. A NIfTI label image (integers, 0 = background) gives real
anatomical regions when one exists, e.g. the ground-truth masks of the synthetic cohort.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from hpcdiff.errors import DataError

_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def octant_atlas(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Label each voxel with its octant (1..8), named by RAS direction.

    Returns:
        (labels (D, H, W) int32, {label: name}).
    """
    codes = nib.aff2axcodes(affine)
    halves = [np.arange(n) >= n / 2 for n in shape]  # True: the half towards the axis code's direction
    ii, jj, kk = np.meshgrid(*halves, indexing="ij")
    labels = (1 + ii * 4 + jj * 2 + kk).astype(np.int32)
    names = {}
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                parts = [code if bit else _OPPOSITE[code] for code, bit in zip(codes, (a, b, c))]
                names[1 + a * 4 + b * 2 + c] = "-".join(parts)
    return labels, names


def load_atlas(path: str | Path, shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Read an integer label image that must lie on the shards' grid; regions are named ``label-N``."""
    img = nib.load(str(path))
    if tuple(img.shape[:3]) != tuple(shape) or not np.allclose(img.affine, affine, atol=1e-4):
        raise DataError(
            f"atlas {path} has shape {img.shape} and another affine than the shards' grid {tuple(shape)}: "
            "resample it onto the shards' grid first"
        )
    labels = np.asarray(img.dataobj).reshape(shape).astype(np.int32)
    return labels, {int(v): f"label-{int(v)}" for v in np.unique(labels) if v != 0}
