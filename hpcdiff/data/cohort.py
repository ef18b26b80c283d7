"""A synthetic, brain-like multi-subject BIDS dataset with planted effects whose ground truth is known.

Every subject is the MNI152 template (nilearn ships it; no network) put through a generator that depends only on
(seed, subject index), so the cohort is the same whatever the number of ranks that writes it:

1. effects, in template space: ventricles (the template's dark central CSF) grow with age; a left medial-temporal
   region loses intensity in patients (atrophy);
2. a global size difference by sex (males scaled up, females down about the brain's centre) and a smooth random
   deformation, applied together as one warp;
3. a smooth multiplicative bias field, Rician noise and a random scanner gain; stored as int16.

The ground truth is the noise-free generator's own finite differences, written to ``derivatives/hpcdiff-truth``:
``age_effect`` (intensity change per year), ``group_effect`` (patient minus control), ``sex_effect`` (male minus
female), the masks they come from, and ``truth.json`` describing them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, special

from hpcdiff.atomic import write_text_atomic
from hpcdiff.batch import Marker, Record, Worker, digest, plan_once, run
from hpcdiff.errors import UsageError
from hpcdiff.nifti import write_nifti

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (48, 56, 48)
TRUTH_DIR = Path("derivatives") / "hpcdiff-truth"
_AGE_RANGE = (45.0, 80.0)
SPACE = "MNI152NLin2009aSym"
"""The space of nilearn's MNI152 template (ICBM152 2009a nonlinear symmetric), which every subject is made from."""


@dataclass(frozen=True)
class Effects:
    """Sizes of the planted effects (the ground truth the statistics should recover)."""

    ventricle_growth_mm: float = 6.0  # ventricle boundary moves out this far from the youngest to the oldest age
    csf_intensity: float = 0.15  # template-scale intensity the enlarged ventricles take
    atrophy_fraction: float = 0.3  # patients' intensity loss at the centre of the atrophy region
    atrophy_centre_mm: tuple[float, float, float] = (-26.0, -22.0, -14.0)  # left medial temporal lobe (MNI)
    atrophy_radius_mm: float = 12.0
    sex_scale: float = 0.04  # males scale by 1 + s, females by 1 - s
    deformation_mm: float = 2.0  # standard deviation of the random smooth displacement
    bias_strength: float = 0.15  # standard deviation of the log bias field
    noise: float = 0.02  # Rician noise, relative to the template's maximum


@dataclass(frozen=True)
class Subject:
    """One subject's covariates, a pure function of (seed, index)."""

    participant_id: str
    age: float
    sex: str
    group: str


def subject_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, index]))


def draw_subject(seed: int, index: int) -> tuple[Subject, np.random.Generator]:
    """Covariates of subject ``index`` and the generator (already advanced past them) for its image."""
    rng = subject_rng(seed, index)
    age = round(float(rng.uniform(*_AGE_RANGE)), 1)
    sex = "M" if rng.random() < 0.5 else "F"
    group = "patient" if rng.random() < 0.5 else "control"
    return Subject(f"sub-{index + 1:04d}", age, sex, group), rng


@lru_cache(maxsize=1)
def _template() -> nib.Nifti1Image:
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=2)


class Anatomy:
    """The template and the effect regions on the output grid, computed once per shape."""

    def __init__(self, shape: tuple[int, int, int], effects: Effects) -> None:
        template = _template()
        data = np.asarray(template.get_fdata(), dtype=np.float32)
        self.shape = shape
        self.effects = effects
        zoom = np.array(data.shape) / np.array(shape)
        # Voxel centres of the output grid map onto the template's field of view exactly.
        self.affine = template.affine @ _scale_affine(zoom)
        self.spacing = np.abs(np.diag(self.affine)[:3])
        self.base = _resample(data, shape)
        self.brain = self.base > 0.2
        # Ventricles: dark connected regions near the centre of the template, as a signed distance in mm.
        self.ventricle_distance = _resample(_ventricle_signed_distance(data, template.affine), shape)
        world = _world_grid(self.affine, shape)
        dist = np.linalg.norm(world - np.array(effects.atrophy_centre_mm)[:, None, None, None], axis=0)
        self.atrophy = np.exp(-0.5 * (dist / (effects.atrophy_radius_mm / 2.0)) ** 2).astype(np.float32)
        self.atrophy *= self.brain
        self.centre = np.array(ndimage.center_of_mass(self.brain), dtype=np.float64)

    def render(self, age: float, group: str) -> np.ndarray:
        """Noise-free template-space image of a subject of this age and group; shape (D, H, W)."""
        e = self.effects
        growth = e.ventricle_growth_mm * (age - _AGE_RANGE[0]) / (_AGE_RANGE[1] - _AGE_RANGE[0])
        softness = max(float(self.spacing.min()) / 2.0, 0.5)
        v = special.expit((growth - self.ventricle_distance) / softness)
        v = v * self.brain
        img = self.base * (1.0 - v) + e.csf_intensity * v
        if group == "patient":
            img = img * (1.0 - e.atrophy_fraction * self.atrophy)
        return img.astype(np.float32)

    def warp(self, img: np.ndarray, sex: str, displacement: np.ndarray | None) -> np.ndarray:
        """Scale about the brain centre by sex and add a displacement field (voxels, shape (3, D, H, W))."""
        scale = 1.0 + self.effects.sex_scale * (1.0 if sex == "M" else -1.0)
        grid = np.indices(self.shape, dtype=np.float32)
        coords = self.centre[:, None, None, None] + (grid - self.centre[:, None, None, None]) / scale
        if displacement is not None:
            coords = coords + displacement
        return ndimage.map_coordinates(img, coords, order=1, mode="constant", cval=0.0).astype(np.float32)

    def subject_image(self, subject: Subject, rng: np.random.Generator) -> np.ndarray:
        """The subject's T1w volume as int16 scanner units; shape (D, H, W)."""
        e = self.effects
        disp = _smooth_field(rng, (3, 4, 4, 4), self.shape) * (e.deformation_mm / self.spacing)[:, None, None, None]
        img = self.warp(self.render(subject.age, subject.group), subject.sex, disp)
        img *= np.exp(e.bias_strength * _smooth_field(rng, (1, 3, 3, 3), self.shape)[0])
        sigma = e.noise * float(self.base.max())
        real = img + sigma * rng.standard_normal(self.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(self.shape, dtype=np.float32)
        img = np.sqrt(real**2 + imag**2)
        gain = rng.uniform(600.0, 1400.0)
        return np.clip(np.round(img * gain), 0, np.iinfo(np.int16).max).astype(np.int16)

    def truth_maps(self) -> dict[str, np.ndarray]:
        """Noise-free finite differences of the generator: what a perfect group statistic would find."""
        lo, hi = _AGE_RANGE
        mid = (lo + hi) / 2.0
        return {
            "age_effect": (self.render(hi, "control") - self.render(lo, "control")) / (hi - lo),
            "group_effect": self.render(mid, "patient") - self.render(mid, "control"),
            "sex_effect": self.warp(self.base, "M", None) - self.warp(self.base, "F", None),
            "ventricle_mask": (self.ventricle_distance <= 0).astype(np.float32),
            "atrophy_weight": self.atrophy,
            "brain_mask": self.brain.astype(np.float32),
            "template": self.base,
        }


def _scale_affine(zoom: np.ndarray) -> np.ndarray:
    """Affine from a grid with voxels ``zoom`` times larger onto the original grid, same field of view."""
    a = np.eye(4)
    a[:3, :3] = np.diag(zoom)
    a[:3, 3] = (zoom - 1.0) / 2.0
    return a


def _resample(data: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    zoom = np.array(data.shape) / np.array(shape)
    coords = np.indices(shape, dtype=np.float32) * zoom[:, None, None, None].astype(np.float32)
    coords += ((zoom - 1.0) / 2.0)[:, None, None, None].astype(np.float32)
    # A blur matched to the zoom keeps a downsampled template free of aliasing.
    src = ndimage.gaussian_filter(data, sigma=np.maximum(zoom - 1.0, 0.0) / 2.0) if zoom.max() > 1 else data
    return ndimage.map_coordinates(src, coords, order=1, mode="nearest").astype(np.float32)


def _world_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape)


def _ventricle_signed_distance(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Signed distance (mm; negative inside) to the lateral ventricles: the two largest dark central components."""
    x, y, z = _world_grid(affine, data.shape)
    box = (np.abs(x) < 30) & (np.abs(y + 5) < 35) & (z > -5) & (z < 35)
    labels, n = ndimage.label(box & (data < 0.35) & (data > 0.05))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    keep = np.argsort(sizes)[::-1][:2] + 1
    mask = np.isin(labels, keep)
    spacing = np.abs(np.diag(affine)[:3])
    return (
        ndimage.distance_transform_edt(~mask, sampling=spacing) - ndimage.distance_transform_edt(mask, sampling=spacing)
    ).astype(np.float32)


def _smooth_field(rng: np.random.Generator, coarse: tuple[int, ...], shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth random field of unit-ish standard deviation, shape (coarse[0], D, H, W).

    Coarse normal noise weighted by a separable basis of Gaussian bumps: a tensor product, so it costs one einsum
    rather than a spline evaluation per voxel.
    """
    noise = rng.standard_normal(coarse).astype(np.float32)
    bases = []
    for n, c in zip(shape, coarse[1:]):
        x = (np.arange(n, dtype=np.float32) + 0.5) / n
        mu = (np.arange(c, dtype=np.float32) + 0.5) / c
        b = np.exp(-0.5 * ((x[:, None] - mu[None, :]) * c) ** 2)
        bases.append(b / np.sqrt((b**2).sum(axis=1, keepdims=True)))
    return np.einsum("fabc,ia,jb,kc->fijk", noise, *bases, optimize=True).astype(np.float32)


def _write_json(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _subject_file(subject: Subject) -> str:
    return f"{subject.participant_id}/anat/{subject.participant_id}_T1w.nii.gz"


_TOP_FILES = ("participants.tsv", "participants.json", "T1w.json", "dataset_description.json")
_TRUTH_MAPS = (
    "age_effect",
    "group_effect",
    "sex_effect",
    "ventricle_mask",
    "atrophy_weight",
    "brain_mask",
    "template",
)


@dataclass
class _CohortJob:
    """The cohort as a batch job: output ``i`` is subject ``i``'s image; finishing writes truth and tables."""

    out: Path
    num_subjects: int
    shape: tuple[int, int, int]
    seed: int
    effects: Effects
    plan_sha256: str = ""

    def __post_init__(self) -> None:
        self.num_outputs = self.num_subjects
        self.plan_sha256 = digest(self.params())

    def params(self) -> dict:
        return {
            "command": "cohort",
            "subjects": self.num_subjects,
            "shape": list(self.shape),
            "seed": self.seed,
            "effects": asdict(self.effects),
        }

    @property
    def finish_files(self) -> tuple[str, ...]:
        truth = [f"{TRUTH_DIR.as_posix()}/{name}.nii.gz" for name in _TRUTH_MAPS]
        truth += [f"{TRUTH_DIR.as_posix()}/truth.json", f"{TRUTH_DIR.as_posix()}/dataset_description.json"]
        return (*truth, *_TOP_FILES)

    def marker(self) -> Marker:
        subjects = [_subject_file(draw_subject(self.seed, i)[0]) for i in range(self.num_subjects)]
        return Marker("cohort", "bids", self.plan_sha256, (*subjects, *self.finish_files))

    @cached_property
    def anatomy(self) -> Anatomy:
        return Anatomy(self.shape, self.effects)

    def files(self, index: int) -> list[str]:
        return [_subject_file(draw_subject(self.seed, index)[0])]

    def write(self, index: int) -> dict:
        subject, rng = draw_subject(self.seed, index)
        write_nifti(self.out / _subject_file(subject), self.anatomy.subject_image(subject, rng), self.anatomy.affine)
        return {}

    def finish(self, records: list[Record]) -> None:
        """Ground truth, then participants.tsv and dataset_description.json: their presence means "whole"."""
        _write_truth(self.out / TRUTH_DIR, self.anatomy, json.loads(json.dumps(self.params())))
        _write_participants(self.out, [draw_subject(self.seed, i)[0] for i in range(self.num_subjects)])


def make_cohort(
    out: Path,
    num_subjects: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    seed: int = 0,
    effects: Effects | None = None,
    *,
    task: int = 0,
    num_tasks: int = 1,
    overwrite: bool = False,
) -> list[Subject]:
    """Write the cohort to ``out`` (BIDS), sliced across array tasks and the ranks of each; resumable.

    A job on the sliced-job core (hpcdiff.batch): worker ``task * W + rank`` writes subjects ``worker, worker + T*W,
    ...``, each file written atomically and recorded; a rerun skips recorded subjects. Whoever finds every subject
    recorded writes the ground truth, ``participants.tsv`` and ``dataset_description.json``, so their presence
    means the dataset is whole.

    Args:
        out: the BIDS root to create.
        num_subjects: subjects sub-0001 ... sub-N.
        shape: voxel grid (D, H, W) spanning the MNI152 field of view.
        seed: with the subject index, fixes everything about a subject.
        task: this process's array task, 0..num_tasks-1.
        num_tasks: array tasks sharing the cohort.
        overwrite: replace a cohort made with other parameters in ``out`` (only the files it wrote).
    """
    from hpcdiff import dist

    if num_subjects <= 0:
        raise UsageError(f"--subjects must be positive, got {num_subjects}")
    if min(shape) < 8:
        raise UsageError(f"--shape {shape} is too small to hold a brain: use at least 8 voxels per axis")
    Worker(task, num_tasks, 0, 1)  # refuse a bad --task before bringing up the ranks
    effects = effects or Effects()
    out = Path(out)
    ctx = dist.init(device="cpu")
    try:
        worker = Worker(task, num_tasks, ctx.rank, ctx.world_size)

        def make() -> _CohortJob:
            return _CohortJob(out, num_subjects, (int(shape[0]), int(shape[1]), int(shape[2])), seed, effects)

        job = plan_once(ctx, make, _CohortJob.marker, out, overwrite)
        outcome = run(job, worker)
        log.info(
            "cohort: worker %d wrote %d subject(s), %d already there%s",
            worker.index,
            outcome.written,
            outcome.skipped,
            "; dataset complete" if outcome.finished else "",
        )
        return [draw_subject(seed, i)[0] for i in range(num_subjects)]
    finally:
        ctx.close()


def _write_participants(out: Path, subjects: list[Subject]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow(["participant_id", "age", "sex", "group"])
    for s in subjects:
        writer.writerow([s.participant_id, f"{s.age:.1f}", s.sex, s.group])
    write_text_atomic(out / "participants.tsv", text.getvalue())
    _write_json(
        out / "participants.json",
        {
            "age": {"Description": "age at scan", "Units": "years"},
            "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
            "group": {"Description": "diagnostic group", "Levels": {"control": "control", "patient": "patient"}},
        },
    )
    # Every image is on a grid of the template's field of view: declared (BIDS inheritance: one sidecar for all
    # T1w images), so ingest does not register them.
    _write_json(out / "T1w.json", {"SpatialReference": SPACE})
    _write_json(
        out / "dataset_description.json",
        {
            "Name": "hpcdiff synthetic cohort",
            "BIDSVersion": "1.8.0",
            "DatasetType": "raw",
            "GeneratedBy": [{"Name": "hpcdiff cohort"}],
        },
    )


def _write_truth(root: Path, anatomy: Anatomy, params: dict) -> None:
    maps = anatomy.truth_maps()
    assert tuple(maps) == _TRUTH_MAPS, "the marker lists the truth maps: keep _TRUTH_MAPS in step"
    for name, data in maps.items():
        write_nifti(root / f"{name}.nii.gz", data, anatomy.affine, np.float32)
    e = anatomy.effects
    _write_json(
        root / "truth.json",
        {
            "description": "Ground truth of the planted effects, on the grid of every subject image (same affine). "
            "Maps are noise-free finite differences of the generator in template space, before each subject's "
            "random deformation and bias field, on the template intensity scale (0..1, before the scanner gain).",
            "parameters": params,
            "maps": {
                "age_effect": "intensity change per year of age (control, template space): ventricles enlarge with "
                f"age, their boundary moving out {e.ventricle_growth_mm} mm between ages {_AGE_RANGE[0]:g} and "
                f"{_AGE_RANGE[1]:g}",
                "group_effect": "patient minus control at the mid age: intensity loss of up to "
                f"{e.atrophy_fraction:.0%} in a Gaussian region centred at {list(e.atrophy_centre_mm)} mm (MNI)",
                "sex_effect": f"male minus female template: males scaled by {1 + e.sex_scale}, females by "
                f"{1 - e.sex_scale} about the brain's centre",
                "ventricle_mask": "lateral ventricles of the template (1 inside)",
                "atrophy_weight": "weight of the patients' atrophy (0..1)",
                "brain_mask": "template brain (1 inside)",
                "template": "the template resampled to this grid",
            },
            "covariates": {
                "age": f"uniform on [{_AGE_RANGE[0]:g}, {_AGE_RANGE[1]:g}] years",
                "sex": "F or M, probability 1/2",
                "group": "control or patient, probability 1/2",
            },
            "affine": anatomy.affine.tolist(),
            "shape": list(anatomy.shape),
        },
    )
    _write_json(
        root / "dataset_description.json",
        {
            "Name": "hpcdiff synthetic cohort: ground truth",
            "BIDSVersion": "1.8.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "hpcdiff cohort"}],
        },
    )
