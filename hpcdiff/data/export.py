"""Shards -> NIfTI in a BIDS-derivatives layout, for tools that read images rather than HDF5.

Layout (any shards, real or synthetic)::

    OUT/dataset_description.json                      DatasetType "derivative", the shards' provenance
    OUT/participants.tsv                              participant_id + covariates, one row per participant
    OUT/sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_space-hpcdiff_T1w.nii.gz   float32
    OUT/sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_space-hpcdiff_T1w.json     source and shard

``<label>`` is the subject id without a leading ``sub-`` and with characters other than letters and digits removed
(``synth-000123`` -> ``sub-synth000123``). Images carry the grid's affine as both qform and sform (hpcdiff.nifti).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcdiff import __version__
from hpcdiff.atomic import write_text_atomic
from hpcdiff.batch import Marker, Record, Worker, digest, plan_once, run
from hpcdiff.data.covariates import MISSING_LEVEL
from hpcdiff.data.shards import ShardSet
from hpcdiff.errors import DataError
from hpcdiff.nifti import write_nifti

log = logging.getLogger(__name__)

SPACE = "hpcdiff"


@dataclass
class ExportResult:
    out: Path
    num_images: int
    written: int
    skipped: int
    finished: bool


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


@dataclass
class _ExportJob:
    """Export as a batch job: output ``i`` is subject ``i``'s image and sidecar; finishing writes the two tables."""

    shards: Path
    out: Path
    table: dict[str, list]
    covariates: list[str]
    shard_files: list[str]  # which shard holds each subject
    manifest: dict
    plan_sha256: str = ""

    def __post_init__(self) -> None:
        self.num_outputs = len(self.table["id"])
        self.paths = [image_path(i, ses).as_posix() for i, ses in zip(self.table["id"], self.table["session"])]
        seen: dict[str, int] = {}
        for index, rel in enumerate(self.paths):
            if rel in seen:
                raise DataError(
                    f"{self.shards / 'manifest.json'}: subjects {seen[rel]} and {index} both map to {rel} "
                    f"(ids {self.table['id'][seen[rel]]!r}, {self.table['id'][index]!r}); give them distinct ids"
                )
            seen[rel] = index
        self.plan_sha256 = digest(
            {"command": "export", "shards": str(self.shards), "manifest": self.manifest, "space": SPACE}
        )

    finish_files = ("participants.tsv", "dataset_description.json")

    def marker(self) -> Marker:
        files = [f for p in self.paths for f in (p, _sidecar(p))]
        return Marker("export", "nifti", self.plan_sha256, (*files, *self.finish_files))

    def files(self, index: int) -> list[str]:
        return [self.paths[index], _sidecar(self.paths[index])]

    def write(self, index: int) -> dict:
        if not hasattr(self, "_set"):
            self._set = ShardSet.open(self.shards)
        write_nifti(self.out / self.paths[index], self._set.read(index)[0], self._set.affine, np.float32)
        sidecar = {
            "SpatialReference": "hpcdiff shards grid (see the affine)",
            "Sources": [str(self.table["source_path"][index])],
            "SourceSha256": str(self.table["source_sha256"][index]),
            "Shard": self.shard_files[index],
        }
        write_text_atomic(self.out / _sidecar(self.paths[index]), json.dumps(sidecar) + "\n")
        return {}

    def finish(self, records: list[Record]) -> None:
        _write_participants(self.out, self.table, self.covariates)
        _write_description(self.out, self.shards, self.manifest)


def _sidecar(image: str) -> str:
    return image.replace(".nii.gz", ".json")


def _plan(shards: Path, out: Path) -> _ExportJob:
    with ShardSet.open(shards) as s:
        s.require_images("hpcdiff export")
        if s.num_subjects == 0:
            raise DataError(f"{shards} holds no subjects (see its quarantine.tsv, if any): nothing to export")
        full = s.subjects()
        table = {name: full[name].tolist() for name in ("id", "session", "source_path", "source_sha256")}
        table |= {name: full[name].tolist() for name in s.covariates}
        holder = [s.locate(i)[0].name for i in range(s.num_subjects)]
        return _ExportJob(shards, out, table, list(s.covariates), holder, s.manifest)


def export(
    shards: str | Path, out: str | Path, *, task: int = 0, num_tasks: int = 1, overwrite: bool = False
) -> ExportResult:
    """Write every subject of ``shards`` as NIfTI under ``out``; sliced across array tasks and ranks, resumable.

    A job on the sliced-job core (hpcdiff.batch): each image and its sidecar are written atomically and recorded;
    whoever finds every subject recorded writes participants.tsv and dataset_description.json, so their presence
    means the export is whole.
    """
    from hpcdiff import dist

    shards, out = Path(shards).resolve(), Path(out)
    Worker(task, num_tasks, 0, 1)  # refuse a bad --task before bringing up the ranks
    ctx = dist.init(device="cpu")
    try:
        worker = Worker(task, num_tasks, ctx.rank, ctx.world_size)
        job = plan_once(ctx, lambda: _plan(shards, out), _ExportJob.marker, out, overwrite)
        outcome = run(job, worker)
        return ExportResult(out, job.num_outputs, outcome.written, outcome.skipped, outcome.finished)
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
        writer.writerow([pid, *(MISSING_LEVEL if _missing(v) else _fmt(v) for v in values)])
    write_text_atomic(out / "participants.tsv", text.getvalue())


def _missing(value: object) -> bool:
    """NaN for a continuous covariate, the missing level for a categorical one (as ingest stores them)."""
    return (isinstance(value, float | np.floating) and not np.isfinite(value)) or value == MISSING_LEVEL


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
