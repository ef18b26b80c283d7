"""Registration of each input to a template, so that voxel (x, y, z) is the same place in every brain.

Inputs from several scanners sit in different places of their own field of view; conforming alone would leave
every voxelwise statistic blurred by it. Each input is registered to a template with ANTs (``antspyx``): rigid
first, then affine initialised from the rigid result (a plain affine from the default start does not recover a
head tilted by 15 degrees), both at ``REGISTRATION_SPACING_MM`` or the template's own spacing if coarser. The
volume is then resampled once, with trilinear interpolation, onto the template's grid at the requested spacing
and shape (centred on the template's field of view).

ITK runs on one thread (parallelism comes from ranks and array tasks) and ANTs' sampling is seeded, so a subject's
result depends only on the input, the template and the seed: identical at any number of ranks.

Inputs already in the template's space are not registered: declared by the BIDS ``space-<label>`` entity in the
file name or ``SpatialReference`` in the dataset-level ``T1w.json`` sidecar, or found from their grid (axis
aligned and spanning the template's field of view to within half a voxel). They go through plain conforming,
bytes-identical to ``--register none``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from hpcdiff.errors import DataError, UsageError

log = logging.getLogger(__name__)

Mode = Literal["auto", "affine", "rigid", "none"]
MODES: tuple[str, ...] = ("auto", "affine", "rigid", "none")
REGISTRATION_SPACING_MM = 2.0
MIN_CORRELATION = 0.7
"""Least Pearson correlation with the template (inside it: voxels above 10% of its maximum) a result may have."""
SCALE_BOUNDS = (0.67, 1.5)
"""Each singular value of the transform's linear part must lie in this range (a head 2/3 to 3/2 the template's)."""
DEFAULT_TEMPLATE = "MNI152"
_SPACE = re.compile(r"_space-([A-Za-z0-9]+)_")
_TPL = re.compile(r"tpl-([A-Za-z0-9]+)")


class RegistrationFailed(Exception):
    """A registration result outside the documented bounds; the message is the quarantine reason."""


@dataclass(frozen=True)
class Record:
    """What was done to one input: kept in the shard's subjects table."""

    method: str  # "affine", "rigid" or "none"
    why: str
    transform: np.ndarray  # (4, 4) RAS mm: a template-space point -> the same point in the input's world
    correlation: float  # with the template after registration; NaN when not registered

    def transform_json(self) -> str:
        return json.dumps([[round(float(v), 9) for v in row] for row in self.transform])


@dataclass(frozen=True, kw_only=True)
class RegisterOptions:
    """How ingest places inputs in a common space."""

    mode: Mode = "auto"
    """auto: affine unless already in the template's space; affine|rigid: register every input; none: conform only."""
    template: Path | None = None
    """Study template (NIfTI); None: nilearn's MNI152 (2 mm)."""
    mask: Path | None = None
    """Brain mask in template space, applied after registration; intensities are normalised inside it."""
    seed: int = 0
    """ANTs' sampling seed."""

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise UsageError(f"--seed must be 0 or more, got {self.seed}")
        if self.mode not in MODES:
            raise UsageError(f"--register {self.mode!r}: use one of {', '.join(MODES)}")
        for flag, path in (("--template", self.template), ("--mask", self.mask)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{flag} {path}: no such file; give a NIfTI image in the template's space")


class Space:
    """The template and the output grid on it, loaded once per process."""

    def __init__(self, options: RegisterOptions, shape: Sequence[int], spacing: float) -> None:
        self.options = options
        self.shape = tuple(int(s) for s in shape)
        self.spacing = float(spacing)

    @cached_property
    def template(self) -> nib.Nifti1Image:
        if self.options.template is None:
            from nilearn.datasets import load_mni152_template

            img = load_mni152_template(resolution=2)
        else:
            try:
                img = nib.load(self.options.template)
            except Exception as e:  # nibabel raises many kinds
                raise DataError(f"--template {self.options.template}: unreadable ({type(e).__name__}: {e})") from e
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim != 3 or not np.isfinite(data).all() or data.max() <= 0:
            raise DataError(f"--template {self.options.template}: need a 3D finite image with positive values")
        return nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))

    @property
    def label(self) -> str:
        """The space's name, matched against inputs' ``space-`` entity (TemplateFlow's ``tpl-`` in a file name)."""
        if self.options.template is None:
            return DEFAULT_TEMPLATE
        m = _TPL.search(Path(self.options.template).name)
        return m.group(1) if m else Path(self.options.template).name

    def names(self, label: str) -> bool:
        """Whether a declared space ``label`` is this template's (any MNI152 variant for the default)."""
        if self.options.template is None:
            return label.startswith(DEFAULT_TEMPLATE)
        return label == self.label

    @cached_property
    def grid(self) -> np.ndarray:
        """The output grid (the manifest's affine): ``shape`` voxels of ``spacing`` mm on the template's centre."""
        t = self.template
        centre = t.affine[:3, :3] @ ((np.asarray(t.shape) - 1) / 2.0) + t.affine[:3, 3]
        affine = np.diag([self.spacing, self.spacing, self.spacing, 1.0])
        affine[:3, 3] = centre - self.spacing * (np.asarray(self.shape) - 1) / 2.0
        return affine

    @cached_property
    def mask(self) -> np.ndarray | None:
        """The brain mask on the output grid, or None."""
        if self.options.mask is None:
            return None
        try:
            img = nib.load(self.options.mask)
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as e:
            raise DataError(f"--mask {self.options.mask}: unreadable ({type(e).__name__}: {e})") from e
        if data.ndim != 3:
            raise DataError(f"--mask {self.options.mask}: need a 3D image, got shape {data.shape}")
        mask = nib.Nifti1Image((data > 0).astype(np.float32), img.affine)
        on_grid = resample_from_to(mask, (self.shape, self.grid), order=1, mode="constant", cval=0.0)
        out = on_grid.get_fdata(dtype=np.float32) >= 0.5
        if not out.any():
            raise DataError(
                f"--mask {self.options.mask}: no voxel of it falls on the output grid; is it in the template's space?"
            )
        return out

    @cached_property
    def digest(self) -> str:
        """What a shard's content depends on, beyond its inputs, shape and spacing."""
        h = hashlib.sha256(json.dumps([self.options.mode, self.options.seed, MIN_CORRELATION, SCALE_BOUNDS]).encode())
        t = self.template  # its voxels and affine, so a new nilearn MNI152 is a new plan too
        h.update(np.ascontiguousarray(t.dataobj, dtype=np.float32).tobytes() + t.affine.tobytes())
        h.update(b"-" if self.options.mask is None else Path(self.options.mask).read_bytes())
        return h.hexdigest()

    def provenance(self) -> dict[str, Any]:
        """The manifest's record of how inputs were placed."""
        o = self.options
        return {
            "mode": o.mode,
            "method": "ANTs (antspyx): rigid, then affine from it (mattes MI), single ITK thread",
            "template": str(o.template) if o.template else "nilearn MNI152 (2 mm)",
            "space": self.label,
            "mask": None if o.mask is None else str(o.mask),
            "seed": o.seed,
            "min_correlation": MIN_CORRELATION,
            "scale_bounds": list(SCALE_BOUNDS),
        }

    def in_space(self, img: nib.Nifti1Image) -> bool:
        """Whether a canonical (RAS) image's grid is axis aligned and spans the template's field of view."""
        a, t = img.affine, self.template.affine
        zooms = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
        if np.abs(a[:3, :3] - np.diag(zooms)).max() > 1e-3 * zooms.min():
            return False
        tol = max(zooms.max(), np.abs(np.diag(t)[:3]).max()) / 2.0
        return all(np.abs(_box(a, img.shape[:3]) - _box(t, self.template.shape)).ravel() <= tol)


def _box(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World corners (RAS mm) of a grid's outer voxel faces, shape (2, 3)."""
    lo = affine[:3, :3] @ np.full(3, -0.5) + affine[:3, 3]
    hi = affine[:3, :3] @ (np.asarray(shape, dtype=np.float64) - 0.5) + affine[:3, 3]
    return np.stack([np.minimum(lo, hi), np.maximum(lo, hi)])


def declared_space(root: Path, source_path: str) -> tuple[str, str] | None:
    """(label, where) of a space an input declares: its ``space-`` entity, else the dataset's ``T1w.json``."""
    m = _SPACE.search("_" + Path(source_path).name)
    if m:
        return m.group(1), "space- entity"
    return dataset_space(root)


@lru_cache(maxsize=8)
def dataset_space(root: Path) -> tuple[str, str] | None:
    """``SpatialReference`` of the dataset-level ``T1w.json`` sidecar (inherited by every T1w image)."""
    path = root / "T1w.json"
    if not path.is_file():
        return None
    try:
        label = json.loads(path.read_text(encoding="utf-8")).get("SpatialReference")
    except (ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a JSON object ({e}); fix or remove it") from e
    return (str(label), "T1w.json SpatialReference") if label else None


# ---------------------------------------------------------------- ANTs
def _ants() -> Any:
    # ITK reads its thread count once, when first used: set before import so results do not depend on the cores.
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    try:
        import ants
    except ImportError as e:
        raise UsageError(
            "registration needs ANTsPy: pip install 'hpcdiff[register]' (or antspyx); "
            "or pass --register none for inputs already in one space"
        ) from e
    return ants


_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (ITK's physical space)


def _to_ants(data: np.ndarray, affine: np.ndarray, spacing: float) -> Any:
    """An ANTs image of a RAS volume, resampled to ``spacing`` mm isotropic (linear)."""
    ants = _ants()
    lps = _FLIP @ affine
    zooms = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image = ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(v) for v in lps[:3, 3]),
        spacing=tuple(float(v) for v in zooms),
        direction=lps[:3, :3] / zooms,
    )
    return ants.resample_image(image, (spacing,) * 3, use_voxels=False, interp_type=0)


def _read_affine(path: str) -> np.ndarray:
    """An ITK affine transform file as a 4x4 RAS matrix from fixed (template) to moving (input) points."""
    tx = _ants().read_transform(path)
    p, c = np.asarray(tx.parameters, dtype=np.float64), np.asarray(tx.fixed_parameters, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = p[:9].reshape(3, 3)
    m[:3, 3] = p[9:12] + c - m[:3, :3] @ c
    return _FLIP @ m @ _FLIP


class Registrar:
    """Registers RAS volumes to one template; holds the template at the registration spacing."""

    def __init__(self, space: Space) -> None:
        self.space = space
        t = space.template
        self.spacing = max(REGISTRATION_SPACING_MM, float(np.sqrt((t.affine[:3, :3] ** 2).sum(axis=0)).min()))
        data = np.asarray(t.dataobj, dtype=np.float32)
        self.fixed = _to_ants(data, t.affine, self.spacing)
        values = self.fixed.numpy()
        self.inside = values > 0.1 * values.max()

    def register(self, img: nib.Nifti1Image, method: str) -> tuple[np.ndarray, float]:
        """(transform, correlation): rigid, then affine from it when ``method`` is "affine".

        Raises:
            RegistrationFailed: the correlation or a scale is outside ``MIN_CORRELATION``/``SCALE_BOUNDS``.
        """
        ants = _ants()
        # antspyx 0.6 reads its seed (passed on as antsRegistration --random-seed) from ants.config at each call and
        # ignores a random_seed keyword; set_ants_deterministic would also reseed numpy's global generator. ANTs
        # seeds from the clock when given 0, hence the + 1.
        ants.config._random_seed = self.space.options.seed + 1
        moving = _to_ants(np.asarray(img.dataobj, dtype=np.float32), img.affine, self.spacing)
        result = ants.registration(self.fixed, moving, type_of_transform="Rigid")
        files = list(result["fwdtransforms"]) + list(result["invtransforms"])
        if method == "affine":
            start = result["fwdtransforms"][0]
            result = ants.registration(self.fixed, moving, type_of_transform="Affine", initial_transform=start)
            files += list(result["fwdtransforms"]) + list(result["invtransforms"])
        try:
            transform = _read_affine(result["fwdtransforms"][0])
        finally:
            for f in set(files):
                Path(f).unlink(missing_ok=True)
        warped = result["warpedmovout"].numpy()[self.inside]
        r = float(np.corrcoef(warped, self.fixed.numpy()[self.inside])[0, 1])
        scales = np.linalg.svd(transform[:3, :3], compute_uv=False)
        if not math.isfinite(r) or r < MIN_CORRELATION:
            raise RegistrationFailed(
                f"registration failed: correlation with the template {r:.3f} < {MIN_CORRELATION} after {method}; "
                "check the image (orientation in its header, field of view) or the template"
            )
        lo, hi = SCALE_BOUNDS
        if scales.min() < lo or scales.max() > hi:
            raise RegistrationFailed(
                f"registration failed: scales {np.round(scales, 3).tolist()} outside [{lo}, {hi}] after {method}"
            )
        return transform, r


def normalise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_grid(img: nib.Nifti1Image, transform: np.ndarray, space: Space) -> np.ndarray:
    """The input's intensities on the output grid, through ``transform`` (template -> input world), trilinear."""
    moved = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), np.linalg.inv(transform) @ img.affine)
    out = resample_from_to(moved, (space.shape, space.grid), order=1, mode="constant", cval=0.0)
    return out.get_fdata(dtype=np.float32)


def apply_mask(values: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Normalise by percentiles of the nonzero voxels inside ``mask``; zero outside it."""
    inside = values[mask & (values != 0)]
    if inside.size == 0:
        raise RegistrationFailed("empty inside --mask after registration")
    lo, hi = np.percentile(inside, percentiles)
    if hi <= lo:
        raise RegistrationFailed(f"constant intensity {lo} inside --mask")
    return normalise(values, lo, hi) * mask


class Placement:
    """Puts each input on the common grid: registered, or taken as it is when already in the template's space."""

    def __init__(self, space: Space, root: Path) -> None:
        self.space = space
        self.root = root
        self._registrar: Registrar | None = None

    def place(
        self,
        img: nib.Nifti1Image,
        lo: float,
        hi: float,
        source_path: str,
        percentiles: tuple[float, float],
        own_grid: Callable[[], np.ndarray],
    ) -> tuple[np.ndarray, Record]:
        """The normalised volume on the output grid and what was done to get it.

        Args:
            img: the checked input, reoriented to RAS.
            lo, hi: its intensities that map to 0 and 1 (percentiles of its nonzero voxels).
            source_path: relative to the BIDS root (its ``space-`` entity is read).
            own_grid: called with no argument, conforms the input as ``--register none`` does: used for inputs
                whose grid already is the template's, so they come out bytes-identical to it.

        Raises:
            RegistrationFailed: the result is outside the documented bounds.
        """
        space, mode = self.space, self.space.options.mode
        identity = np.eye(4)
        declared = declared_space(self.root, source_path)
        named = declared is not None and space.names(declared[0])
        if mode == "auto" and (named or space.in_space(img)):
            why = f"in {declared[0]} ({declared[1]})" if named and declared else f"grid spans {space.label}'s"
            if space.in_space(img) and space.mask is None:
                return own_grid(), Record("none", why, identity, math.nan)
            values, record = to_grid(img, identity, space), Record("none", why, identity, math.nan)
        else:
            method = "rigid" if mode == "rigid" else "affine"
            if self._registrar is None:
                self._registrar = Registrar(space)
            transform, r = self._registrar.register(img, method)
            values, record = (
                to_grid(img, transform, space),
                Record(method, f"registered to {space.label}", transform, r),
            )
        if space.mask is not None:
            return apply_mask(values, space.mask, percentiles), record
        return normalise(values, lo, hi), record


def record_columns(records: Sequence[Record]) -> dict[str, list]:
    """The shard's per-subject registration columns (docs/data-format.md)."""
    return {
        "registration": [r.method for r in records],
        "registration_r": [r.correlation for r in records],
        "transform": [r.transform_json() for r in records],
    }


def decide(options: RegisterOptions, root: Path, source_paths: Sequence[str]) -> tuple[RegisterOptions | None, str]:
    """The options a plan registers with (None: conform only, as before registration existed), and why.

    Only declarations are read here (file names and one sidecar), so the plan opens O(1) files; an undeclared
    input whose grid turns out to be the template's is found (and not registered) by the worker that reads it.
    """
    space = Space(options, (1, 1, 1), 1.0)
    if options.mode == "none":
        if options.mask is not None:
            raise UsageError("--mask is in template space and needs registration: drop --register none")
        return None, "--register none: inputs are conformed on their own field of view, not registered"
    declared = [declared_space(root, p) for p in source_paths]
    named = sum(1 for d in declared if d is not None and space.names(d[0]))
    if options.mode == "auto" and named == len(source_paths) and options.mask is None:
        where = sorted({d[1] for d in declared if d is not None})
        return None, (
            f"--register auto: all {named} inputs declare {space.label}'s space ({', '.join(where)}): not registered"
        )
    space.template  # noqa: B018  (a bad --template fails here, once, before any rank starts work)
    if options.mask is not None:
        Space(options, space.template.shape, 1.0).mask  # noqa: B018  (likewise a bad --mask)
    if importlib.util.find_spec("ants") is None:
        raise UsageError(
            f"{len(source_paths) - named} input(s) in {root} need registration, which needs ANTsPy: "
            "pip install 'hpcdiff[register]' (or antspyx); or declare their space (docs/registration.md), "
            "or pass --register none"
        )
    if options.mode == "auto":
        return options, (
            f"--register auto: inputs registered to {space.label} (rigid, then affine), except the {named} that "
            "declare its space and any whose grid already is its grid"
        )
    return options, f"--register {options.mode}: every input registered to {space.label}"
