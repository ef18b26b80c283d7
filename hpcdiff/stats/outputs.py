"""Writing results: NIfTI maps on the shards' grid and a JSON summary, both written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from hpcdiff.atomic import write_text_atomic
from hpcdiff.nifti import write_nifti
from hpcdiff.stats.source import unflatten


def save_map(path: Path, values: np.ndarray, mask: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray) -> None:
    """Write masked voxel values (V,) as a float32 NIfTI on the grid (0 outside the mask, NaN kept)."""
    write_nifti(path, unflatten(values, mask, shape), affine, np.float32, level=1)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; null says "undefined"
    return obj


def save_json(path: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(_jsonable(summary), indent=2) + "\n")
