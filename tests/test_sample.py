"""`hpcdiff sample`, `export` and `quality` end to end, on a tiny model trained on the synthetic cohort.

One module-scoped run serves every test: the cohort (48 subjects at 16x20x16, where the planted ventricle growth
with age is visible: the ventricle-weighted intensity correlates about -0.6 with age), ingested, and a 3D flow
model trained for a few hundred steps. Sampling is checked for what must hold exactly (kill -9 and rerun, ranks,
array tasks: identical shard bytes) and for what the model has learned (synthetic ventricles grow with age).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nilearn.image import resample_to_img

from hpcdiff.batch.hooks import KILL_AFTER
from hpcdiff.data.shards import ShardSet
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, hpcdiff, mpirun, require

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`

SHAPE = (16, 20, 16)
STEPS = 300
# Sampling settings shared by the exactness tests: 12 subjects in 3 shards of 4, sampled 2 at a time.
SMALL = ("--n", 12, "--subjects-per-shard", 4, "--batch-size", 2, "--steps", 8, "--seed", 7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sample")
    bids, shards, run = root / "bids", root / "shards", root / "run"
    assert_ok(hpcdiff("cohort", "--out", bids, "--subjects", 48, "--shape", *SHAPE, "--seed", 5, timeout=300))
    assert_ok(hpcdiff("ingest", bids, "--out", shards, "--shape", *SHAPE, "--subjects-per-shard", 16, timeout=300))
    job = job_yaml(
        root / "job.yaml",
        shards,
        data={"batch_size": 4},
        model={"base_channels": 16, "channel_mults": [1, 2]},
        optim={"lr": 3e-3, "warmup_steps": 20, "ema_decay": 0.99},
        train={"steps": STEPS, "checkpoint_every": STEPS, "cond_drop_prob": 0.1, "log_every": 50},
    )
    assert_ok(hpcdiff("train", job, "--run-dir", run, "--quiet", timeout=1800))
    return {"root": root, "bids": bids, "shards": shards, "run": run}


@pytest.fixture(scope="module")
def reference(trained) -> Path:
    """An uninterrupted one-process run of the SMALL cohort."""
    out = trained["root"] / "reference"
    assert_ok(hpcdiff("sample", "--run-dir", trained["run"], "--out", out, *SMALL, timeout=600))
    return out


def _digests(shards: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards.glob("*.h5"))} | {
        "manifest.json": hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    }


def test_manifest_has_the_training_grid_and_provenance(trained, reference):
    s, real = ShardSet.open(reference, verify=True), ShardSet.open(trained["shards"])
    assert s.num_subjects == 12 and len(s.files) == 3 and s.shape == real.shape
    np.testing.assert_allclose(s.affine, real.affine)
    prov = s.manifest["provenance"]
    info = json.loads((next((trained["run"] / "checkpoints").glob("step-*")) / "COMPLETE.json").read_text())
    assert prov["weights_sha256"] == info["weights_sha256"] and prov["step"] == STEPS
    assert (prov["sampler"], prov["steps"], prov["seed"], prov["guidance"]) == ("heun", 8, 7, 1.0)
    table = s.subjects()
    assert list(table["id"][:2]) == ["synth-000000", "synth-000001"]
    assert set(table["source_sha256"]) == {info["weights_sha256"]}
    assert set(table["group"]) <= {"control", "patient"} and s.covariates["sex"]["levels"] == ["F", "M"]
    # Drawn covariates are rows of the training table.
    ages = set(np.round(real.subjects()["age"], 6))
    assert set(np.round(table["age"], 6)) <= ages
    x = s.read_many(range(12))
    assert np.isfinite(x).all() and x.std() > 0.05


def test_sigkill_mid_shard_then_rerun_gives_the_same_bytes(trained, reference, tmp_path):
    out = tmp_path / "killed"
    # The core's kill hook: SIGKILL right after the first shard is written and recorded.
    proc = hpcdiff("sample", "--run-dir", trained["run"], "--out", out, *SMALL, env={KILL_AFTER: "1"}, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "manifest.json").exists() and not (out / "shard-00002.h5").exists()
    rerun = hpcdiff("sample", "--run-dir", trained["run"], "--out", out, *SMALL, timeout=600)
    assert_ok(rerun)
    assert "1 already complete" in rerun.stdout
    assert not list(out.glob(".*tmp"))
    assert _digests(out) == _digests(reference)


@pytest.mark.mpi
def test_two_ranks_and_two_array_tasks_give_the_same_bytes(trained, reference, tmp_path):
    two = tmp_path / "two_ranks"
    assert_ok(mpirun(2, [*HPCDIFF, "sample", "--run-dir", trained["run"], "--out", two, *SMALL], timeout=600))
    assert _digests(two) == _digests(reference)

    tasks = tmp_path / "tasks"
    # 2 array tasks x 2 ranks: workers 0-1 (task 0) and 2-3 (task 1) of 4 take shards 0, 1 and 2.
    argv = [*HPCDIFF, "sample", "--run-dir", trained["run"], "--out", tasks, *SMALL]
    first = mpirun(2, [*argv, "--task", 0, "--num-tasks", 2], timeout=600)
    assert_ok(first)
    assert sorted(p.name for p in tasks.glob("*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    assert not (tasks / "manifest.json").exists() and "still missing" in first.stdout
    # The second task learns its index from Slurm's array variables (an array numbered from 4).
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "2"}
    second = mpirun(2, argv, env=slurm, timeout=600)
    assert_ok(second)
    assert "manifest written" in second.stdout
    assert _digests(tasks) == _digests(reference)


def test_rerun_with_nothing_left_writes_the_manifest_and_batch_size_does_not_pick_subjects(
    trained, reference, tmp_path
):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()
    proc = hpcdiff("sample", "--run-dir", trained["run"], "--out", out, *SMALL)
    assert_ok(proc)
    assert "0 shard(s) written, 3 already complete" in proc.stdout
    assert _digests(out) == _digests(reference)

    other = tmp_path / "batch3"
    argv = [a if a != 2 else 3 for a in SMALL]  # --batch-size 3: other batches, same subjects
    assert_ok(hpcdiff("sample", "--run-dir", trained["run"], "--out", other, *argv, timeout=600))
    a, b = ShardSet.open(reference).read_many(range(12)), ShardSet.open(other).read_many(range(12))
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_another_seed_is_another_plan_refused_unless_overwrite_which_redoes_every_shard(trained, reference, tmp_path):
    out = tmp_path / "reseeded"
    shutil.copytree(reference, out)
    argv = [a if a != 7 else 8 for a in SMALL]
    proc = hpcdiff("sample", "--run-dir", trained["run"], "--out", out, *argv, timeout=600)
    assert proc.returncode == 2 and "another hpcdiff sample plan" in proc.stderr and "--overwrite" in proc.stderr
    assert _digests(out) == _digests(reference)
    proc = hpcdiff("sample", "--run-dir", trained["run"], "--out", out, *argv, "--overwrite", timeout=600)
    assert_ok(proc)
    assert "3 shard(s) written, 0 already complete" in proc.stdout
    assert ShardSet.open(out).manifest["provenance"]["seed"] == 8
    assert not np.allclose(ShardSet.open(out).read(0), ShardSet.open(reference).read(0))


def _ventricle_weight(trained, like: nib.Nifti1Image) -> np.ndarray:
    """Where intensity falls with age in the ground truth (ventricles), on the shards' grid, summing to 1."""
    truth = nib.load(str(trained["bids"] / "derivatives" / "hpcdiff-truth" / "age_effect.nii.gz"))
    effect = resample_to_img(truth, like, interpolation="continuous", force_resample=True, copy_header=True)
    w = np.clip(-effect.get_fdata(), 0, None)
    return w / w.sum()


def _welch_t(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def test_synthetic_ventricles_grow_with_the_requested_age(trained, tmp_path):
    real = ShardSet.open(trained["shards"])
    w = _ventricle_weight(trained, nib.Nifti1Image(np.zeros(real.shape, np.float32), real.affine))
    real_score = (real.read_many(range(real.num_subjects))[:, 0] * w).sum((1, 2, 3))
    assert np.corrcoef(real.subjects()["age"], real_score)[0, 1] < -0.4  # the planted effect, seen by this score

    lo, hi = real.covariates["age"]["min"], real.covariates["age"]["max"]
    rows = [f"{lo + 1 if i < 16 else hi - 1:.1f}\t{'FM'[i % 2]}\tcontrol" for i in range(32)]
    tsv = tmp_path / "cohort.tsv"
    tsv.write_text("age\tsex\tgroup\n" + "\n".join(rows) + "\n")
    out = tmp_path / "by_age"
    argv = ["--covariates", tsv, "--steps", 10, "--sampler", "euler", "--guidance", 4, "--batch-size", 16]
    assert_ok(hpcdiff("sample", "--run-dir", trained["run"], "--out", out, *argv, timeout=600))
    synth = ShardSet.open(out)
    score = (synth.read_many(range(32))[:, 0] * w).sum((1, 2, 3))
    young, old = score[:16], score[16:]
    # Larger ventricles are darker: the old half's ventricle region is darker, clearly beyond the noise.
    assert _welch_t(old, young) < -3.0, (young.mean(), old.mean())


@pytest.mark.parametrize(
    ("header", "row", "n", "message"),
    [
        ("age\tsex\tgroup\tsite", "60\tF\tcontrol\tA", None, "row 0 (header), column 'site'"),
        ("age\tsex", "60\tF", None, "column 'group' is missing"),
        ("age\tsex\tgroup", "sixty\tF\tcontrol", None, "row 2 (line 3), column 'age': 'sixty' is not a number"),
        ("age\tsex\tgroup", "130\tF\tcontrol", None, "row 2 (line 3), column 'age': 130 is outside the trained range"),
        ("sex\tage\tgroup", "X\t60\tcontrol", None, "row 2 (line 3), column 'sex': level 'X' was not seen"),
        ("age\tsex\tgroup", "60\tF\tcontrol", 5, "2 rows but --n 5"),
    ],
    ids=["unknown-column", "missing-column", "wrong-type", "out-of-range", "unknown-level", "row-count"],
)
def test_bad_covariates_tsv_exits_3_naming_row_and_column(trained, tmp_path, header, row, n, message):
    good = "\t".join({"age": "60", "sex": "M", "group": "patient", "site": "A"}[c] for c in header.split("\t"))
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(f"{header}\n{good}\n{row}\n")
    argv = ["--covariates", tsv, *(["--n", n] if n else [])]
    proc = hpcdiff("sample", "--run-dir", trained["run"], "--out", tmp_path / "out", *argv)
    assert proc.returncode == 3, proc.stderr
    assert message in proc.stderr and str(tsv) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_usage_errors_exit_2(trained, tmp_path):
    proc = hpcdiff("sample", "--run-dir", trained["run"], "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--n N" in proc.stderr
    proc = hpcdiff("sample", "--run-dir", tmp_path / "norun", "--out", tmp_path / "o", "--n", 2)
    assert proc.returncode == 2 and "no valid checkpoint" in proc.stderr
    proc = hpcdiff("sample", "--run-dir", trained["run"], "--out", tmp_path / "o", "--n", 2, "--sampler", "ddim")
    assert proc.returncode == 2 and "euler" in proc.stderr
    proc = hpcdiff("sample", "--run-dir", trained["run"], "--out", tmp_path / "o", "--n", 2, "--task", 2)
    assert proc.returncode == 2 and "--task 2 is outside" in proc.stderr


def test_export_writes_bids_derivatives_readable_by_nibabel_and_nifti_tool(reference, tmp_path):
    out = tmp_path / "nifti"
    assert_ok(hpcdiff("export", reference, "--out", out))
    s = ShardSet.open(reference)
    images = sorted(out.glob("sub-*/anat/sub-*_space-hpcdiff_T1w.nii.gz"))
    assert len(images) == 12
    first = out / "sub-synth000000" / "anat" / "sub-synth000000_space-hpcdiff_T1w.nii.gz"
    img = nib.load(str(first))
    assert img.get_data_dtype() == np.float32 and img.shape == s.shape
    np.testing.assert_allclose(img.affine, s.affine, atol=1e-5)
    np.testing.assert_allclose(img.header.get_qform(), s.affine, atol=1e-5)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), s.read(0)[0])
    participants = (out / "participants.tsv").read_text().splitlines()
    assert participants[0] == "participant_id\tage\tsex\tgroup" and len(participants) == 13
    assert participants[1].startswith("sub-synth000000\t")
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["HpcdiffProvenance"]["seed"] == 7
    again = hpcdiff("export", reference, "--out", out)
    assert_ok(again)
    assert "0 written here, 12 already there" in again.stdout

    require("nifti_tool", shutil.which("nifti_tool") is not None, "apt-get install nifti-bin")
    check = subprocess.run(
        ["nifti_tool", "-check_hdr", "-infiles", str(first)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and "header IS GOOD" in check.stdout, check.stdout + check.stderr


def test_quality_report_puts_the_mmd_beside_a_baseline(trained, reference, tmp_path):
    out = tmp_path / "quality"
    assert_ok(hpcdiff("quality", trained["shards"], reference, "--out", out, timeout=300))
    summary = json.loads((out / "summary.json").read_text())
    mmd = summary["mmd"]
    assert summary["num_real"] == 48 and summary["num_synthetic"] == 12 and summary["real_is_training_set"]
    # The voxel-independent baseline is far from real subjects; two halves of the real ones are close.
    assert mmd["mmd2_real_half_vs_half"] < mmd["mmd2_baseline_vs_real"] / 3
    assert summary["maps"]["corr_mean"] > 0.9
    for name in ("montage.png", "maps.png", "mean_real.nii.gz", "std_synth.nii.gz"):
        assert (out / name).stat().st_size > 0
    assert nib.load(str(out / "mean_synth.nii.gz")).shape == SHAPE


def test_a_2d_model_writes_one_slice_thick_volumes_at_the_middle_slice(tmp_path):
    shards = blob_shards(tmp_path / "blobs", num_subjects=8, per_shard=4)
    job = job_yaml(tmp_path / "job.yaml", shards, data={"mode": "2d", "slice_axis": 2}, train={"steps": 4})
    assert_ok(hpcdiff("train", job, "--run-dir", tmp_path / "run", "--quiet"))
    out = tmp_path / "synth"
    assert_ok(hpcdiff("sample", "--run-dir", tmp_path / "run", "--out", out, "--n", 3, "--steps", 2))
    s, real = ShardSet.open(out), ShardSet.open(shards)
    assert s.shape == (12, 12, 1) and s.manifest["provenance"]["slice_axis"] == 2
    middle = real.affine @ np.array([0, 0, 6, 1.0])
    np.testing.assert_allclose(s.affine @ np.array([0, 0, 0, 1.0]), middle)
    quality = tmp_path / "quality"
    assert_ok(hpcdiff("quality", shards, out, "--out", quality))
    assert json.loads((quality / "summary.json").read_text())["mmd"]["downsampled_shape"] == [12, 12, 1]
