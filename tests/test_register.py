"""Registration in ingest: one brain stored in different spaces comes out in one place; inputs already in the
template's space are left as conform makes them; results are the same at any number of ranks and after a kill.

The template is MNI152 at 3 mm (CI time); the brain is nilearn's MNI152 at 1 mm, moved by known transforms, so the
truth is known: a template point p lies at V @ p in a moved input's world. Tests of mechanics (bytes across ranks,
kill and rerun) register three of the inputs to a 6 mm template: still a real rigid-then-affine registration (each
result passes the correlation and scale bounds), at a fraction of the cost.
"""

import csv
import json
import logging
import random
import shutil
import signal

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to, resample_to_output

from hpcdiff.batch.hooks import KILL_AFTER
from hpcdiff.data.cohort import make_cohort
from hpcdiff.data.ingest import ingest
from hpcdiff.data.register import RegisterOptions
from hpcdiff.data.shards import MANIFEST, QUARANTINE, ShardSet
from hpcdiff.errors import UsageError
from tests.harness import HPCDIFF, assert_ok, hpcdiff, mpirun, require_mpi

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`

SHAPE = (50, 58, 48)
SPACING = 4.0
ARGS = ["--shape", *SHAPE, "--spacing", SPACING, "--subjects-per-shard", 3]


def _rotation(deg_x: float, deg_z: float, shift: tuple[float, float, float]) -> np.ndarray:
    a, b = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx
    m[:3, 3] = shift
    return m


def _save(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _moved(brain: nib.Nifti1Image, v: np.ndarray, zooms=None) -> nib.Nifti1Image:
    """The brain put at V @ p in world space (as a head placed otherwise in a scanner), on a grid of ``zooms``."""
    img = nib.Nifti1Image(np.asarray(brain.dataobj, dtype=np.float32) * 800.0, v @ brain.affine)
    if zooms is None:
        return img
    return resample_to_output(img, voxel_sizes=zooms, order=1)


def _lps(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same image stored left-posterior-superior: first two axes flipped, the affine compensating."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(img.shape[:2]) - 1
    return nib.Nifti1Image(np.asarray(img.dataobj)[::-1, ::-1].copy(), img.affine @ flip)


VARIANTS = {
    "sub-shift": (_rotation(0, 0, (14.0, -9.0, 11.0)), None, False),
    "sub-rotx": (_rotation(15.0, 0, (4.0, 6.0, -5.0)), None, False),
    "sub-rotxz": (_rotation(-12.0, 18.0, (-7.0, 3.0, 8.0)), None, False),
    "sub-lps": (_rotation(0, 10.0, (6.0, 5.0, 0.0)), None, True),
    "sub-2mm": (_rotation(10.0, 0, (0.0, -8.0, 9.0)), (2.0, 2.0, 2.0), False),
    "sub-aniso": (_rotation(0, -14.0, (-5.0, 7.0, 3.0)), (1.2, 1.0, 3.0), False),
}


@pytest.fixture(scope="module")
def moved_bids(tmp_path_factory):
    """One brain in six spaces, one input that is not a brain, and a 3 mm template."""
    from nilearn.datasets import load_mni152_template

    root = tmp_path_factory.mktemp("reg") / "bids"
    brain = load_mni152_template(resolution=1)
    for sid, (v, zooms, lps) in VARIANTS.items():
        img = _moved(brain, v, zooms)
        _save(root / sid / "anat" / f"{sid}_T1w.nii.gz", _lps(img) if lps else img)
    rng = np.random.default_rng(0)
    noise = rng.gamma(2.0, 100.0, size=(60, 70, 60)).astype(np.float32)
    _save(root / "sub-noise" / "anat" / "sub-noise_T1w.nii.gz", nib.Nifti1Image(noise, np.diag([3.0, 3, 3, 1])))
    ids = [*VARIANTS, "sub-noise"]
    (root / "participants.tsv").write_text(
        "participant_id\tage\n" + "".join(f"{s}\t{50 + i}\n" for i, s in enumerate(ids))
    )
    template = resample_to_output(load_mni152_template(resolution=2), voxel_sizes=(3.0, 3.0, 3.0), order=1)
    _save(root.parent / "tpl-Test3mm_T1w.nii.gz", template)
    return root


@pytest.fixture(scope="module")
def registered(moved_bids, tmp_path_factory):
    out = tmp_path_factory.mktemp("registered") / "one"
    proc = hpcdiff(
        "ingest",
        moved_bids,
        "--out",
        out,
        *ARGS,
        "--template",
        moved_bids.parent / "tpl-Test3mm_T1w.nii.gz",
        timeout=900,
    )
    assert_ok(proc)
    return out, proc


def test_one_brain_in_six_spaces_registers_to_one_place(registered):
    out, proc = registered
    shards = ShardSet.open(out, verify=True)
    table = shards.subjects()
    assert sorted(table["id"]) == sorted(VARIANTS)
    assert set(table["registration"]) == {"affine"}
    r = dict(zip(table["id"], table["registration_r"]))
    print("correlation with the template after registration:", {k: round(float(v), 4) for k, v in r.items()})
    assert min(r.values()) >= 0.9
    # Every subject's registered template point p must be the brain's own point p: V^-1 T p = p.
    grid = np.asarray(shards.manifest["affine"])
    ijk = np.stack(np.meshgrid(*[np.arange(0, n, 2) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    p = grid @ np.c_[ijk, np.ones(len(ijk))].T
    inside = np.linalg.norm(p[:3] - np.array([[0.0], [-18.0], [8.0]]), axis=0) < 60  # the brain, roughly
    found = {}
    for sid, text in zip(table["id"], table["transform"]):
        t = np.asarray(json.loads(text))
        found[sid] = (np.linalg.inv(VARIANTS[sid][0]) @ t @ p[:, inside])[:3]
    errors = {sid: float(np.linalg.norm(q - p[:3, inside], axis=0).max()) for sid, q in found.items()}
    print("largest displacement from the truth (mm):", {k: round(v, 2) for k, v in errors.items()})
    assert max(errors.values()) < SPACING / 4  # so any two subjects are well within one voxel of each other
    vols = shards.read_many(range(len(table["id"])))[:, 0]
    flat = vols.reshape(len(vols), -1)
    assert np.corrcoef(flat).min() > 0.95
    # The manifest's affine is the template grid's, and says how.
    reg = shards.manifest["provenance"]["registration"]
    assert reg["space"] == "Test3mm" and reg["mode"] == "auto"
    assert "registered to Test3mm" in proc.stderr


def test_a_failed_registration_is_quarantined_with_its_reason(registered):
    out, _ = registered
    with open(out / QUARANTINE, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["subject"] for r in rows] == ["sub-noise"]
    assert rows[0]["reason"].startswith("registration failed")


def test_a_rerun_keeps_registered_shards(moved_bids, registered):
    out, _ = registered
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    template = moved_bids.parent / "tpl-Test3mm_T1w.nii.gz"
    proc = hpcdiff("ingest", moved_bids, "--out", out, *ARGS, "--template", template, timeout=300)
    assert_ok(proc)
    assert "0 written, 3 already complete" in proc.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------- mechanics, on a coarse registration
FEW = ("sub-lps", "sub-rotxz", "sub-shift")
FEW_ARGS = ["--shape", 33, 39, 32, "--spacing", 6.0, "--subjects-per-shard", 1, "--register", "affine"]


@pytest.fixture(scope="module")
def few(moved_bids):
    """Three of the moved inputs and a 6 mm template: the BIDS root, and the ingest arguments."""
    from nilearn.datasets import load_mni152_template

    root = moved_bids.parent / "few"
    for sid in FEW:
        shutil.copytree(moved_bids / sid, root / sid)
    rows = (moved_bids / "participants.tsv").read_text().splitlines()
    (root / "participants.tsv").write_text("\n".join([rows[0], *(r for r in rows if r.split("\t")[0] in FEW)]) + "\n")
    template = root.parent / "tpl-Test6mm_T1w.nii.gz"
    _save(template, resample_to_output(load_mni152_template(resolution=2), voxel_sizes=(6.0, 6.0, 6.0), order=1))
    return root, [*FEW_ARGS, "--template", template]


def _files(root):
    """Every file ingest wrote (not the sliced-job core's own records under .hpcdiff/), with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".hpcdiff" not in p.relative_to(root).parts
    }


@pytest.fixture(scope="module")
def few_undisturbed(few, tmp_path_factory):
    """One process, never stopped: the bytes the other layouts must give."""
    bids, args = few
    out = tmp_path_factory.mktemp("few") / "one"
    assert_ok(hpcdiff("ingest", bids, "--out", out, *args, timeout=900))
    table = ShardSet.open(out, verify=True).subjects()
    assert list(table["id"]) == list(FEW) and set(table["registration"]) == {"affine"}
    assert not any(np.array_equal(json.loads(t), np.eye(4)) for t in table["transform"])
    return _files(out)


@pytest.mark.mpi
def test_registration_at_two_ranks_gives_the_bytes_of_one(few, few_undisturbed, tmp_path):
    require_mpi()
    bids, args = few
    assert_ok(mpirun(2, [*HPCDIFF, "ingest", bids, "--out", tmp_path, *args], timeout=900))
    assert _files(tmp_path) == few_undisturbed


def test_registration_killed_after_n_shards_then_rerun_gives_the_undisturbed_bytes(few, few_undisturbed, tmp_path):
    bids, args = few
    after = random.Random("kill-register").randint(1, len(FEW) - 1)
    killed = hpcdiff("ingest", bids, "--out", tmp_path, *args, env={KILL_AFTER: str(after)}, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list((tmp_path / ".hpcdiff" / "records").iterdir())) == after and not (tmp_path / MANIFEST).exists()
    rerun = hpcdiff("ingest", bids, "--out", tmp_path, *args, timeout=900)
    assert_ok(rerun)
    assert f"{len(FEW) - after} written, {after} already complete" in rerun.stdout
    assert _files(tmp_path) == few_undisturbed, f"killed after {after} shards"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort") / "bids"
    make_cohort(root, 3, (24, 28, 24), seed=2)
    return root


def _images(out):
    s = ShardSet.open(out, verify=True)
    return s.read_many(range(len(s))), s.subjects()


def _ingest_cohort(bids, out, **register):
    """Ingest in this process: these inputs need no ANTs, so no child pays the start-up (the CLI is tested above)."""
    ingest(bids, out, (24, 28, 24), subjects_per_shard=2, register=RegisterOptions(**register))


def test_inputs_in_the_template_space_are_not_registered(cohort, tmp_path, caplog):
    _ingest_cohort(cohort, tmp_path / "none", mode="none")
    with caplog.at_level(logging.INFO):
        _ingest_cohort(cohort, tmp_path / "auto")
    assert "declare MNI152's space (T1w.json SpatialReference): not registered" in caplog.text
    for name in ("shard-00000.h5", "shard-00001.h5"):
        assert (tmp_path / "none" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes()
    # Without the declaration, the grid gives it away: same volumes, and the shard says why.
    plain = tmp_path / "plain"
    shutil.copytree(cohort, plain)
    (plain / "T1w.json").unlink()
    _ingest_cohort(plain, tmp_path / "grid")
    (a, _), (b, table) = _images(tmp_path / "none"), _images(tmp_path / "grid")
    assert np.array_equal(a, b)
    assert list(table["registration"]) == ["none"] * 3 and np.isnan(table["registration_r"]).all()
    assert all(np.array_equal(json.loads(t), np.eye(4)) for t in table["transform"])


def test_a_mask_zeroes_outside_and_normalises_inside(cohort, tmp_path):
    from nilearn.datasets import load_mni152_template

    tpl = load_mni152_template(resolution=2)
    mask = (np.asarray(tpl.dataobj) > 0.3).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, tpl.affine), tmp_path / "mask.nii.gz")
    _ingest_cohort(cohort, tmp_path / "m", mask=tmp_path / "mask.nii.gz")
    vols, _ = _images(tmp_path / "m")
    shards = ShardSet.open(tmp_path / "m")
    on_grid = resample_from_to(
        nib.Nifti1Image(mask.astype(np.float32), tpl.affine),
        ((24, 28, 24), np.asarray(shards.manifest["affine"])),
        order=1,
    )
    outside = on_grid.get_fdata() < 0.5
    assert (vols[:, 0][:, outside] == 0).all() and vols.max() == 1.0
    with pytest.raises(UsageError, match="--mask is in template space and needs registration: drop --register none"):
        _ingest_cohort(cohort, tmp_path / "bad", mask=tmp_path / "mask.nii.gz", mode="none")
    assert not (tmp_path / "bad" / MANIFEST).exists()
