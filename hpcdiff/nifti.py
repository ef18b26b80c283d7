"""The one NIfTI writer: every image hpcdiff writes (cohort, export, statistics maps, quality maps) comes from here.

Header: the affine is set as both qform and sform with code 1 ("scanner": world coordinates in mm, RAS+), units
mm; readers that prefer either form find the same grid. Compressed files (``.nii.gz``) are gzipped with mtime 0,
so equal images give byte-equal files whichever process or day writes them.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np

from hpcdiff.atomic import atomic_write

XFORM_CODE = 1
"""qform_code and sform_code: NIFTI_XFORM_SCANNER_ANAT."""


def nifti_image(volume: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | None = None) -> nib.Nifti1Image:
    """A NIfTI-1 image of ``volume`` (kept in its dtype unless ``dtype`` says otherwise) on ``affine``."""
    data = np.asarray(volume) if dtype is None else np.asarray(volume, dtype=dtype)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=XFORM_CODE)
    img.set_sform(affine, code=XFORM_CODE)
    return img


def nifti_bytes(img: nib.Nifti1Image, compress: bool = True, level: int = 6) -> bytes:
    """The file's bytes: gzip with mtime 0 when ``compress``."""
    raw = img.to_bytes()
    if not compress:
        return raw
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=level, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


def write_nifti(
    path: Path, volume: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | None = None, level: int = 6
) -> None:
    """Write ``volume`` on ``affine`` to ``path`` atomically; gzipped when the name ends in ``.gz``."""
    path = Path(path)
    img = nifti_image(volume, affine, dtype)
    atomic_write(path, nifti_bytes(img, compress=path.name.endswith(".gz"), level=level))
