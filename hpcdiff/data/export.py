"""Shards -> NIfTI in a BIDS-derivatives layout, for tools that read images rather than HDF5.

Layout (any shards, real or synthetic)::

    OUT/dataset_description.json                      DatasetType "derivative", the shards' provenance
    OUT/participants.tsv                              participant_id + covariates, one row per participant
    OUT/sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_space-hpcdiff_T1w.nii.gz   float32
    OUT/sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_space-hpcdiff_T1w.json     source and shard

``<label>`` is the subject id without a leading ``sub-`` and with characters other than letters and digits removed
(``synth-000123`` -> ``sub-synth000123``). Images carry the grid's affine as both qform and sform. Every file is
written atomically, so a rerun skips the images already there; the two top-level files are written last, by
rank 0 once every rank is done, so their presence means the export is whole.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from hpcdiff import __version__
from hpcdiff.atomic import atomic_path, write_text_atomic
from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import DataError

log = logging.getLogger(__name__)

SPACE = "hpcdiff"


@dataclass
class ExportResult:
    out: Path
    num_images: int
    written: int
    skipped: int


def bids_label(text: str, prefix: str) -> str:
    """A BIDS label (letters and digits) from an id such as ``sub-0001`` or ``synth-000123``."""
    text = str(text)
    if text.startswith(f"{prefix}-"):
        text = text[len(prefix) + 1 :]
    label = re.sub(r"[^A-Za-z0-9]", "", text)
    if not label:
        raise DataError(f"id {text!r} has no letters or digits to make a BIDS {prefix}- label from")
    return label


def image_path(subject: str, session: str) -> Path:
    """Path of one image relative to the export root."""
    sub = f"sub-{bids_label(subject, 'sub')}"
    parts = [sub]
    folder = Path(sub)
    if session:
        ses = f"ses-{bids_label(session, 'ses')}"
        parts.append(ses)
        folder = folder / ses
    return folder / "anat" / f"{'_'.join(parts)}_space-{SPACE}_T1w.nii.gz"


def nifti(volume: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A float32 NIfTI-1 image whose qform and sform are both ``affine`` (scanner space, mm)."""
    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _write_image(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        nib.save(nifti(volume, affine), tmp.with_suffix(".nii.gz"))
        tmp.with_suffix(".nii.gz").replace(tmp)  # nibabel picks the format from the name


def export(shards: str | Path, out: str | Path) -> ExportResult:
    """Write every subject of ``shards`` as NIfTI under ``out``; sliced across this launcher's ranks, resumable."""
    from hpcdiff import dist

    out = Path(out)
    ctx = dist.init(device="cpu")
    try:
        with ShardSet.open(shards) as s:
            if s.num_subjects == 0:
                raise DataError(f"{shards} holds no subjects (see its quarantine.tsv, if any): nothing to export")
            table = s.subjects()
            ids, sessions = table["id"], table["session"]
            paths = [image_path(i, ses) for i, ses in zip(ids, sessions)]
            seen: dict[Path, int] = {}
            for index, rel in enumerate(paths):
                if rel in seen:
                    raise DataError(
                        f"{Path(shards) / 'manifest.json'}: subjects {seen[rel]} and {index} both map to {rel} "
                        f"(ids {ids[seen[rel]]!r}, {ids[index]!r}); give them distinct ids"
                    )
                seen[rel] = index
            written = skipped = 0
            for index in range(ctx.rank, s.num_subjects, ctx.world_size):
                path = out / paths[index]
                if path.is_file():
                    skipped += 1
                    continue
                _write_image(path, s.read(index)[0], s.affine)
                sidecar = {
                    "SpatialReference": "hpcdiff shards grid (see the affine)",
                    "Sources": [str(table["source_path"][index])],
                    "SourceSha256": str(table["source_sha256"][index]),
                    "Shard": str(s.locate(index)[0].name),
                }
                write_text_atomic(path.with_name(path.name.replace(".nii.gz", ".json")), json.dumps(sidecar) + "\n")
                written += 1
            ctx.barrier()
            if ctx.is_main:
                _write_participants(out, table, list(s.covariates))
                _write_description(out, Path(shards), s.manifest)
            return ExportResult(out, s.num_subjects, written, skipped)
    finally:
        ctx.close()


def _write_participants(out: Path, table: dict[str, np.ndarray], covariates: list[str]) -> None:
    """One row per participant (the first session's covariates when a participant has several)."""
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow(["participant_id", *covariates])
    done = set()
    for i, subject in enumerate(table["id"]):
        pid = f"sub-{bids_label(subject, 'sub')}"
        if pid in done:
            continue
        done.add(pid)
        values = [table[c][i] for c in covariates]
        writer.writerow([pid, *("n/a" if _missing(v) else _fmt(v) for v in values)])
    write_text_atomic(out / "participants.tsv", text.getvalue())


def _missing(value: object) -> bool:
    return (isinstance(value, float | np.floating) and not np.isfinite(value)) or value == "n/a"


def _fmt(value: object) -> str:
    return f"{float(value):.6g}" if isinstance(value, float | np.floating) else str(value)


def _write_description(out: Path, shards: Path, manifest: dict) -> None:
    description = {
        "Name": f"hpcdiff export of {shards.resolve()}",
        "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "hpcdiff export", "Version": __version__}],
        "SourceDatasets": [{"URL": f"file://{shards.resolve()}"}],
        "HpcdiffProvenance": manifest.get("provenance", {}),
    }
    write_text_atomic(out / "dataset_description.json", json.dumps(description, indent=2) + "\n")
