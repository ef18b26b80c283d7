"""BIDS/NIfTI T1w images -> conformed, normalised volumes in HDF5 shards; sliced across ranks and resumable.

The plan is decided before any volume is read: every T1w image with its participants.tsv row, minus those that
cannot be placed (no row, a duplicate id), sorted, cut into shards of K subjects. It is a function of the inputs
alone, so every array task computes the same plan (on its rank 0, broadcast to its ranks) with the same digest.
The job runs on the sliced-job core (hpcdiff.batch): worker ``task * W + rank`` of ``T * W`` writes shards
``worker, worker + T*W, ...``; a shard's content depends only on its planned inputs, so the result is
byte-identical at any number of ranks and tasks. Each shard is recorded as it is written (checksum, subject rows,
inputs that failed to load), so a rerun skips it and the worker that finds every record in writes quarantine.tsv,
subjects.json and manifest.json from the records, without reading a shard.

Conforming: reorient to RAS (nibabel's closest canonical), resample with trilinear interpolation onto an isotropic
grid of ``spacing`` mm and ``shape`` voxels centred on the centre of the input's field of view. Normalising: the
0.5th and 99.5th percentiles of the nonzero voxels map to 0 and 1, values outside are clipped; stored as float16.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from hpcdiff import __version__
from hpcdiff.atomic import file_sha256, write_text_atomic
from hpcdiff.batch import Marker, Record, Worker, digest, plan_once
from hpcdiff.batch import run as run_job
from hpcdiff.data.covariate_kinds import column_kinds
from hpcdiff.data.covariates import MISSING_LEVEL, TsvTable, is_missing, read_bids_tsv, schema_of
from hpcdiff.data.register import Placement, RegisterOptions, RegistrationFailed, Space, decide, record_columns
from hpcdiff.data.selection import select_images
from hpcdiff.data.shards import MANIFEST, QUARANTINE, SUBJECTS_TABLE, ShardInfo, shard_name, write_manifest, write_shard
from hpcdiff.errors import DataError, UsageError
from hpcdiff.memory import require_memory

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (48, 56, 48)
# The MNI152 field of view (mm); the default spacing is the smallest isotropic one whose grid spans it.
_DEFAULT_FOV_MM = (198.0, 234.0, 190.0)
_PERCENTILES = (0.5, 99.5)
NORMALISATION = "nonzero percentiles 0.5/99.5 -> [0, 1], clipped"
RESAMPLING = "RAS, trilinear, isotropic spacing, grid centred on each input's field-of-view centre"
_RESERVED = ("id", "session", "source_path", "source_sha256", "registration", "registration_r", "transform")
_MEMORY_FIX = "use a smaller --shape (or a larger --spacing for the same field of view) or --subjects-per-shard"
_T1W = re.compile(r"^sub-[^_]+(_.+)?_T1w\.nii(\.gz)?$")


@dataclass(frozen=True, order=True)
class Candidate:
    """One T1w image placed in the plan."""

    subject: str  # participant_id, e.g. "sub-0001"
    session: str  # "" when the dataset has no sessions
    source_path: str  # relative to the BIDS root
    size: int


@dataclass
class Plan:
    """What was decided before anything was read: the same in every task, broadcast to every rank of one."""

    shards: list[list[Candidate]]
    quarantine: list[tuple[str, str, str]]  # (source_path, subject, reason)
    covariates: dict[str, dict[str, list]]  # participant_id -> typed row, and the kinds
    kinds: dict[str, str] = field(default_factory=dict)
    register: RegisterOptions | None = None  # None: conform only, as before registration existed


@dataclass
class IngestResult:
    """What one task did; the totals (subjects, quarantine) are known to the task that wrote the manifest."""

    out: Path
    num_subjects: int  # in every shard when the manifest was written, else in this task's shards
    num_shards: int
    shards_written: int
    shards_skipped: int
    quarantined: list[tuple[str, str, str]]  # all inputs when the manifest was written here, else this worker's
    manifest_written: bool = True  # by this worker
    finished: bool = True  # by this worker or another


def default_spacing(shape: Sequence[int]) -> float:
    return max(f / s for f, s in zip(_DEFAULT_FOV_MM, shape))


# ---------------------------------------------------------------- plan (rank 0)
def _read_participants(root: Path) -> tuple[list[str], TsvTable]:
    path = root / "participants.tsv"
    if not path.is_file():
        raise DataError(
            f"{path} is missing: a BIDS dataset needs a participants.tsv with a participant_id column and one "
            "column per covariate (age, sex, ...)"
        )
    table = read_bids_tsv(path)
    columns = table.columns
    if "participant_id" not in columns:
        raise DataError(f"{path}: no participant_id column (found {columns}); add it as the first column")
    clash = [c for c in columns if c in _RESERVED]
    if clash:
        raise DataError(f"{path}: columns {clash} clash with the shard table's own names {_RESERVED}; rename them")
    if not table.rows:
        raise DataError(f"{path}: no participants; add one line per subject under the header")
    return [c for c in columns if c != "participant_id"], table


def _find_images(root: Path) -> list[Path]:
    found = [*root.glob("sub-*/anat/*_T1w.nii*"), *root.glob("sub-*/ses-*/anat/*_T1w.nii*")]
    images = sorted(p for p in found if _T1W.match(p.name))
    if not images:
        raise DataError(
            f"{root}: no T1w images found; a BIDS dataset holds them as sub-<label>/[ses-<label>/]anat/"
            "sub-<label>[_ses-<label>]_T1w.nii[.gz]: check the folder is the dataset's root"
        )
    return images


def _size(path: Path) -> int:
    """Bytes in the file; -1 for a dangling symlink or a loop, which ``conform`` then quarantines."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def make_plan(
    root: Path,
    subjects_per_shard: int,
    *,
    categorical: Sequence[str] = (),
    continuous: Sequence[str] = (),
    session: str = "all",
    run: str = "last",
) -> Plan:
    """Decide which image goes into which shard, and which images cannot be placed at all (and why).

    Covariate kinds: see ``covariate_kinds.column_kinds``; sessions and runs: ``selection.select_images``.
    """
    columns, table = _read_participants(root)
    rows = table.rows
    counts = Counter(r["participant_id"] for r in rows)
    kinds = column_kinds(table, columns, categorical, continuous)
    typed: dict[str, dict[str, object]] = {}
    for r in rows:
        typed[r["participant_id"]] = {
            c: (float("nan") if is_missing(r.get(c)) else float(r[c]))
            if kinds[c] == "continuous"
            else (MISSING_LEVEL if is_missing(r.get(c)) else r[c].strip())
            for c in columns
        }
    quarantine: list[tuple[str, str, str]] = []
    images = []
    for path in _find_images(root):
        rel = path.relative_to(root)
        ses = rel.parts[1] if rel.parts[1].startswith("ses-") else ""
        images.append(Candidate(rel.parts[0], ses, rel.as_posix(), _size(path)))
    good: list[Candidate] = []
    for cands in select_images(images, session, run).groups:
        subject, session = cands[0].subject, cands[0].session
        if len(cands) > 1:
            names = ", ".join(c.source_path for c in cands)
            key = f"{subject} {session}".strip()
            quarantine += [
                (c.source_path, subject, f"duplicate id {key}: {len(cands)} T1w images ({names})") for c in cands
            ]
        elif counts[subject] == 0:
            quarantine.append((cands[0].source_path, subject, "no row in participants.tsv"))
        elif counts[subject] > 1:
            quarantine.append(
                (cands[0].source_path, subject, f"duplicate id: {counts[subject]} rows in participants.tsv")
            )
        else:
            good.append(cands[0])
    k = subjects_per_shard
    shards = [good[i : i + k] for i in range(0, len(good), k)]
    return Plan(shards, quarantine, {c.subject: typed[c.subject] for c in good}, kinds)  # type: ignore[misc]


# ---------------------------------------------------------------- one volume
class Rejected(Exception):
    """An input that cannot be used; the message is the quarantine reason."""


def target_affine(spacing: float, shape: Sequence[int], centre: np.ndarray) -> np.ndarray:
    """RAS grid of isotropic ``spacing`` whose centre voxel sits at world point ``centre``."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(centre) - spacing * (np.asarray(shape) - 1) / 2.0
    return affine


def fov_centre(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    corner = (np.asarray(img.shape[:3]) - 1) / 2.0
    return img.affine[:3, :3] @ corner + img.affine[:3, 3]


def conform(path: Path, shape: Sequence[int], spacing: float) -> np.ndarray:
    """Load, check, reorient, resample and normalise one volume; shape ``shape``, float32 in [0, 1].

    Raises:
        Rejected: the input cannot be used; the message says why.
    """
    return _own_grid(*load_checked(path), shape, spacing)


def load_checked(path: Path) -> tuple[nib.Nifti1Image, float, float]:
    """The input reoriented to RAS (float32), and the intensities that map to 0 and 1.

    Raises:
        Rejected: the input cannot be used; the message says why.
    """
    try:
        path.stat()
    except OSError as e:  # nibabel says "no such file or no access" for all of these
        kind = "a symbolic link to nothing" if path.is_symlink() else "no such file"
        raise Rejected(f"unreadable: {e.strerror} ({kind}; a dangling link or a loop?)") from e
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many kinds (ImageFileError, EOFError, zlib errors, OSError...)
        raise Rejected(f"unreadable: {type(e).__name__}: {e}") from e
    if not np.isfinite(img.affine).all():
        raise Rejected("the affine (voxel-to-world matrix) holds NaN or Inf: fix the header's sform/qform")
    if abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise Rejected("the affine (voxel-to-world matrix) is singular (a zero voxel size): fix the sform/qform")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise Rejected(f"not 3D: shape {data.shape}")
    if not np.isfinite(data).all():
        raise Rejected(f"contains NaN/Inf ({int((~np.isfinite(data)).sum())} voxels)")
    nonzero = data[data != 0]
    if nonzero.size == 0:
        raise Rejected("empty: every voxel is zero")
    lo, hi = np.percentile(nonzero, _PERCENTILES)
    if hi <= lo:
        raise Rejected(f"empty: constant intensity {lo}")
    # lo, hi stay float64: with NumPy's scalar promotion that keeps the arithmetic below as it always was.
    return nib.as_closest_canonical(nib.Nifti1Image(data, img.affine)), lo, hi


def _own_grid(canonical: nib.Nifti1Image, lo: float, hi: float, shape: Sequence[int], spacing: float) -> np.ndarray:
    target = (tuple(shape), target_affine(spacing, shape, fov_centre(canonical)))
    resampled = resample_from_to(canonical, target, order=1, mode="constant", cval=0.0).get_fdata(dtype=np.float32)
    return np.clip((resampled - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- the job (on the sliced-job core)
@dataclass
class _IngestJob:
    """Ingest as a batch job: output ``i`` is shard ``i``; finishing writes quarantine.tsv and the manifest."""

    bids_root: Path
    out: Path
    plan: Plan
    shape: tuple[int, int, int]
    spacing: float
    subjects_per_shard: int
    strict: bool
    plan_sha256: str = ""

    def __post_init__(self) -> None:
        self.num_outputs = len(self.plan.shards)
        space = self.space()
        self.plan_sha256 = digest(
            {
                "command": "ingest",
                "bids_root": str(self.bids_root),
                "shards": [[c.__dict__ for c in cands] for cands in self.plan.shards],
                "quarantine": self.plan.quarantine,
                "covariates": self.plan.covariates,
                "kinds": self.plan.kinds,
                "shape": list(self.shape),
                "spacing": self.spacing,
                "subjects_per_shard": self.subjects_per_shard,
                "normalisation": NORMALISATION,
                "resampling": RESAMPLING,
                **({} if space is None else {"registration": space.digest}),
            }
        )

    def space(self) -> Space | None:
        """The template space inputs are registered to; None when they are only conformed."""
        return None if self.plan.register is None else Space(self.plan.register, self.shape, self.spacing)

    @cached_property
    def placement(self) -> Placement | None:
        # Built where shards are written (after the plan is broadcast): the template is loaded once per process.
        space = self.space()
        return None if space is None else Placement(space, self.bids_root)

    finish_files = (QUARANTINE, SUBJECTS_TABLE, MANIFEST)

    def marker(self) -> Marker:
        names = [shard_name(i) for i in range(self.num_outputs)]
        return Marker("ingest", "shards", self.plan_sha256, (*names, *self.finish_files))

    def files(self, index: int) -> list[str]:
        return [shard_name(index)]

    def write(self, index: int) -> dict[str, object]:
        cands = self.plan.shards[index]
        images, kept, records, quarantine = [], [], [], []
        for c in cands:
            try:
                if self.placement is None:
                    images.append(conform(self.bids_root / c.source_path, self.shape, self.spacing))
                else:
                    img, lo, hi = load_checked(self.bids_root / c.source_path)
                    own = partial(_own_grid, img, lo, hi, self.shape, self.spacing)
                    volume, record = self.placement.place(img, lo, hi, c.source_path, _PERCENTILES, own)
                    log.info("ingest: %s: %s (%s)", c.source_path, record.method, record.why)
                    images.append(volume)
                    records.append(record)
                kept.append(c)
            except (Rejected, RegistrationFailed) as e:
                quarantine.append((c.source_path, c.subject, str(e)))
        table: dict[str, list] = {
            "id": [c.subject for c in kept],
            "session": [c.session for c in kept],
            "source_path": [c.source_path for c in kept],
            "source_sha256": [file_sha256(self.bids_root / c.source_path) for c in kept],
        }
        if self.placement is not None:
            table.update(record_columns(records))
        for name in self.plan.kinds:
            table[name] = [self.plan.covariates[c.subject][name] for c in kept]
        shape = self.shape
        stack = np.stack(images)[:, None] if images else np.zeros((0, 1, *shape), dtype=np.float32)
        info = write_shard(self.out / shard_name(index), stack, table, attrs={"plan_sha256": self.plan_sha256})
        # The grid is placed by the first ingested volume's field of view: recorded here so that the finisher
        # reads no input either.
        centre = fov_centre(nib.load(self.bids_root / kept[0].source_path)).tolist() if kept else None
        return {"info": info.to_json(), "quarantine": quarantine, "subjects": table, "centre": centre}

    def finish(self, records: list[Record]) -> tuple[list[ShardInfo], list[tuple[str, str, str]]]:
        """quarantine.tsv, then (unless --strict refuses) subjects.json and the manifest, from the records alone."""
        infos = [ShardInfo(**r.data["info"]) for r in records]
        quarantine = sorted([*self.plan.quarantine, *(tuple(q) for r in records for q in r.data["quarantine"])])
        _write_quarantine(self.out, quarantine)  # type: ignore[arg-type]
        if self.strict and quarantine:
            raise DataError(_strict_message(self.bids_root, quarantine))  # type: ignore[arg-type]
        table: dict[str, list] = {}
        for shard, r in enumerate(records):
            rows = r.data["subjects"]
            for name, values in rows.items():
                table.setdefault(name, []).extend(values)
            count = len(rows["id"])
            table.setdefault("shard", []).extend([shard] * count)
            table.setdefault("row", []).extend(range(count))
        if not table.get("id"):
            raise DataError(
                f"no subject of {self.bids_root} could be ingested: all {len(quarantine)} input(s) were refused, "
                f"with the reasons in {self.out / QUARANTINE}; fix them and run again"
            )
        space = self.space()
        # Without registration volumes are centred on their own field of view; the grid is placed where the first
        # one's centre is (exact when inputs share a field of view, as one protocol or one template space does).
        centre = np.asarray(next(r.data["centre"] for r in records if r.data["centre"] is not None))
        write_manifest(
            self.out,
            shape=self.shape,
            spacing=(self.spacing,) * 3,
            affine=target_affine(self.spacing, self.shape, centre) if space is None else space.grid,
            covariates=covariate_schema(self.plan, table.get("id", [])),
            shards=infos,
            subjects=table,
            provenance={
                "tool": "hpcdiff ingest",
                "version": __version__,
                "bids_root": str(self.bids_root),
                "subjects_per_shard": self.subjects_per_shard,
                "resampling": RESAMPLING,
                "normalisation": NORMALISATION,
                **({} if space is None else {"registration": space.provenance()}),
            },
        )
        log.info("ingest: all %d shards done; wrote %s", len(infos), self.out / MANIFEST)
        return infos, quarantine  # type: ignore[return-value]


def covariate_schema(plan: Plan, subjects: Sequence[str]) -> dict[str, dict]:
    """The manifest's covariate schema over the ingested subjects (see ``covariates.schema_of``)."""
    columns = {name: [plan.covariates[s][name] for s in subjects] for name in plan.kinds}
    return schema_of(columns, plan.kinds)


def _write_quarantine(out: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["source_path\tsubject\treason"]
    lines += ["\t".join(field.replace("\t", " ").replace("\n", " ") for field in row) for row in sorted(rows)]
    write_text_atomic(out / QUARANTINE, "\n".join(lines) + "\n")


def ingest(
    bids_root: Path,
    out: Path,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: float | None = None,
    subjects_per_shard: int = 64,
    strict: bool = False,
    *,
    task: int = 0,
    num_tasks: int = 1,
    register: RegisterOptions | None = None,
    categorical: Sequence[str] = (),
    continuous: Sequence[str] = (),
    session: str = "all",
    run: str = "last",
    overwrite: bool = False,
) -> IngestResult:
    """Conform a BIDS dataset's T1w images into shards in ``out``; sliced across array tasks and ranks.

    Args:
        bids_root: BIDS root with participants.tsv and sub-*/[ses-*/]anat/*_T1w.nii[.gz].
        out: shard directory (created); manifest.json appears last, once every shard is done.
        shape: voxel grid (D, H, W).
        spacing: isotropic voxel size in mm; default: the smallest that spans the MNI152 field of view.
        subjects_per_shard: K, planned subjects per shard (a shard holds fewer when inputs fail to load).
        strict: any quarantined input makes the job fail with DataError (exit 3), without a manifest.
        task: this process's array task, 0..num_tasks-1 (its ranks come from the launcher).
        num_tasks: array tasks sharing the shards.
        register: registration to a template (hpcdiff.data.register); default: affine unless the inputs declare
            the template's space.
        categorical, continuous: covariate kinds where participants.json does not declare them.
        session: "all", "first" or a session label; run: "first", "last" or "all" (hpcdiff.data.selection).
        overwrite: replace the files of another ingest plan in ``out`` (only those its marker lists).
    """
    from hpcdiff import dist

    bids_root, out = Path(bids_root).resolve(), Path(out)
    if len(shape) != 3 or min(shape) <= 0:
        raise UsageError(f"--shape needs three positive sizes, got {list(shape)}")
    if subjects_per_shard <= 0:
        raise UsageError(f"--subjects-per-shard must be positive, got {subjects_per_shard}")
    if spacing is not None and not (np.isfinite(spacing) and spacing > 0):
        raise UsageError(f"--spacing must be a positive number of mm, got {spacing}")
    # A shard's conformed volumes (float32) plus a few working copies of one volume stay in memory at once.
    volume = 4 * int(np.prod(shape, dtype=np.float64))
    require_memory(volume * (subjects_per_shard + 4), f"--shape {' '.join(map(str, shape))}", _MEMORY_FIX)
    Worker(task, num_tasks, 0, 1)  # refuse a bad --task before bringing up the ranks
    if not bids_root.is_dir():
        raise DataError(f"{bids_root} is not a directory: give the root of a BIDS dataset")
    grid = (int(shape[0]), int(shape[1]), int(shape[2]))
    spacing = float(spacing) if spacing is not None else default_spacing(grid)
    ctx = dist.init(device="cpu")
    try:
        worker = Worker(task, num_tasks, ctx.rank, ctx.world_size)

        def make() -> _IngestJob:
            plan = make_plan(
                bids_root, subjects_per_shard, categorical=categorical, continuous=continuous, session=session, run=run
            )
            plan.register, why = decide(
                register or RegisterOptions(), bids_root, [c.source_path for s in plan.shards for c in s]
            )
            log.info("ingest: %s", why)
            if strict and plan.quarantine:
                raise DataError(_strict_message(bids_root, plan.quarantine))
            log.info(
                "ingest: %d images in %d shards of up to %d, %d quarantined before reading; task %d of %d, %d rank(s)",
                sum(map(len, plan.shards)),
                len(plan.shards),
                subjects_per_shard,
                len(plan.quarantine),
                task,
                num_tasks,
                ctx.world_size,
            )
            return _IngestJob(bids_root, out, plan, grid, spacing, subjects_per_shard, strict)

        job = plan_once(ctx, make, _IngestJob.marker, out, overwrite)
        outcome = run_job(job, worker)
        if outcome.finished_here:
            infos, quarantine = outcome.summary
            num_subjects = sum(i.num_subjects for i in infos)
        else:
            quarantine = sorted(tuple(q) for r in outcome.mine.values() for q in r.data["quarantine"])
            num_subjects = sum(r.data["info"]["num_subjects"] for r in outcome.mine.values())
            if strict and quarantine:
                raise DataError(_strict_message(bids_root, quarantine))
        return IngestResult(
            out,
            num_subjects,
            job.num_outputs,
            outcome.written,
            outcome.skipped,
            quarantine,
            manifest_written=outcome.finished_here,
            finished=outcome.finished,
        )
    finally:
        ctx.close()


def _strict_message(root: Path, quarantine: list[tuple[str, str, str]]) -> str:
    first = "; ".join(f"{p}: {r}" for p, _, r in quarantine[:3]) + (" ..." if len(quarantine) > 3 else "")
    return (
        f"--strict: {len(quarantine)} input(s) in {root} cannot be used ({first}); "
        "fix or remove them, or drop --strict to quarantine them"
    )
