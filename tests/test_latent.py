"""The latent road end to end on tiny volumes: encode (sliced, resumable, rank-independent bytes), latent shards
refused where images are needed, diffusion on latents, and sampling that decodes onto the input grid through the
pinned autoencoder (a changed one refused).

One module-scoped autoencoder (a few steps on 16^3 blobs: the mechanics, not the quality, are under test) and one
reference encode serve every test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from hpcdiff.batch.hooks import KILL_AFTER
from hpcdiff.data.shards import ShardSet
from hpcdiff.latent import combine, latent_grid, moments
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, hpcdiff, mpirun
from tests.test_autoencoder_train import ae_job

pytestmark = pytest.mark.slow  # trains models and runs mpirun: left out of `make test-quick`

SHAPE = (16, 16, 16)
ENCODE = ("--subjects-per-shard", 3)  # 10 subjects: 4 shards, the last one short


@pytest.fixture(scope="module")
def road(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latent")
    shards = blob_shards(root / "shards", num_subjects=10, shape=SHAPE, per_shard=4)
    job = ae_job(root / "ae.yaml", shards, [8, 8, 8], train={"steps": 4, "checkpoint_every": 4})
    assert_ok(hpcdiff("train", job, "--run-dir", root / "ae", "--quiet", timeout=300))
    assert_ok(hpcdiff("encode", shards, "--run-dir", root / "ae", "--out", root / "latents", *ENCODE, timeout=300))
    return {"root": root, "shards": shards, "ae": root / "ae", "ae_job": job, "latents": root / "latents"}


def _digests(folder: Path) -> dict[str, str]:
    names = [*sorted(p.name for p in folder.glob("*.h5")), "manifest.json", "subjects.json"]
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def _encode(road, out: Path, *extra: object, env=None):
    return hpcdiff("encode", road["shards"], "--run-dir", road["ae"], "--out", out, *ENCODE, *extra, env=env)


def test_scale_factor_is_the_combined_moments_of_every_slice():
    rng = np.random.default_rng(0)
    parts = [rng.normal(0.3, 2.0, (k, 4, 2, 3, 2)).astype(np.float16) for k in (3, 1, 2)]
    whole = np.concatenate(parts).astype(np.float64)
    got = combine([moments(p) for p in parts])
    assert got["scale_factor"] == pytest.approx(1 / whole.std(), rel=1e-9)
    np.testing.assert_allclose(got["channel_mean"], whole.mean(axis=(0, 2, 3, 4)), rtol=1e-9)
    assert got["count"] == whole.size


def test_latent_grid_centres_each_latent_voxel_on_the_image_voxels_it_covers():
    affine = np.array([[2.0, 0, 0, -10], [0, 2, 0, -20], [0, 0, 2, -5], [0, 0, 0, 1]])
    grid = latent_grid({"shape": [8, 12, 4], "spacing": [2, 2, 2], "affine": affine.tolist()}, 4)
    assert grid["shape"] == [2, 3, 1] and grid["spacing"] == [8.0, 8.0, 8.0]
    # Latent voxel (1, 0, 0) covers image voxels 4..7 along the first axis: its centre is image voxel 5.5.
    np.testing.assert_allclose(np.asarray(grid["affine"]) @ [1, 0, 0, 1], affine @ [5.5, 1.5, 1.5, 1])


def test_encode_writes_latent_shards_with_the_subjects_and_the_scale_factor(road):
    lat, img = ShardSet.open(road["latents"], verify=True), ShardSet.open(road["shards"])
    assert lat.is_latent and lat.channels == 4 and lat.shape == (4, 4, 4) and len(lat.files) == 4
    assert lat.manifest["format_version"] == 2 and img.manifest["format_version"] == 1
    z = lat.read_many(range(10), dtype=np.float64)
    assert z.shape == (10, 4, 4, 4, 4) and np.isfinite(z).all()
    block = lat.latent
    assert block["scale_factor"] == pytest.approx(1 / z.std(), rel=1e-9)
    assert block["source"] == img.grid and block["source_data_sha256"] == img.data_sha256
    ckpt = json.loads((road["ae"] / "checkpoints" / "step-000000004" / "COMPLETE.json").read_text())
    assert block["autoencoder"]["weights_sha256"] == ckpt["weights_sha256"] and block["autoencoder"]["step"] == 4
    for name in ("id", "age", "sex", "group"):
        assert list(lat.subjects()[name]) == list(img.subjects()[name])
    assert lat.covariates == img.covariates


@pytest.mark.mpi
def test_two_ranks_and_two_array_tasks_encode_the_same_bytes(road, tmp_path):
    reference = _digests(road["latents"])
    two = tmp_path / "two_ranks"
    argv = [*HPCDIFF, "encode", road["shards"], "--run-dir", road["ae"], "--out", two, *ENCODE]
    assert_ok(mpirun(2, argv, timeout=300))
    assert _digests(two) == reference

    tasks = tmp_path / "tasks"
    first = _encode(road, tasks, "--task", 0, "--num-tasks", 2)
    assert_ok(first)
    assert sorted(p.name for p in tasks.glob("*.h5")) == ["shard-00000.h5", "shard-00002.h5"]
    assert not (tasks / "manifest.json").exists() and "still missing" in first.stdout
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    second = _encode(road, tasks, env=slurm)
    assert_ok(second)
    assert "manifest written" in second.stdout
    assert _digests(tasks) == reference


def test_encode_killed_mid_way_resumes_to_the_same_bytes(road, tmp_path):
    out = tmp_path / "killed"
    proc = _encode(road, out, env={KILL_AFTER: "2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "manifest.json").exists() and not (out / "shard-00003.h5").exists()
    rerun = _encode(road, out)
    assert_ok(rerun)
    assert "2 already complete" in rerun.stdout
    assert _digests(out) == _digests(road["latents"])


def test_stats_export_and_quality_refuse_latent_shards_naming_the_folder(road, tmp_path):
    for argv in (
        ("export", road["latents"], "--out", tmp_path / "nifti"),
        ("stats", "template", road["latents"], "--out", tmp_path / "template"),
        ("quality", road["shards"], road["latents"], "--out", tmp_path / "quality"),
    ):
        proc = hpcdiff(*argv)
        assert proc.returncode == 2, proc.stderr
        assert str(road["latents"]) in proc.stderr and "latent shards" in proc.stderr
        assert "image shard folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nifti").exists()


def test_a_latent_run_samples_images_on_the_input_grid_and_refuses_a_changed_autoencoder(road, tmp_path):
    job = job_yaml(tmp_path / "ldm.yaml", road["latents"], train={"steps": 4, "checkpoint_every": 4})
    run = tmp_path / "ldm"
    assert_ok(hpcdiff("train", job, "--run-dir", run, "--quiet", timeout=300))
    synth = tmp_path / "synth"
    assert_ok(hpcdiff("sample", "--run-dir", run, "--out", synth, "--n", 3, "--steps", 3, timeout=300))
    out, real = ShardSet.open(synth, verify=True), ShardSet.open(road["shards"])
    assert not out.is_latent and out.channels == 1 and out.shape == real.shape == SHAPE
    np.testing.assert_array_equal(out.affine, real.affine)
    assert out.manifest["spacing"] == real.manifest["spacing"]
    x = out.read_many(range(3))
    assert x.shape == (3, 1, *SHAPE) and np.isfinite(x).all()
    assert out.manifest["provenance"]["latent"]["autoencoder"]["run_dir"] == str(road["ae"])
    assert_ok(hpcdiff("export", synth, "--out", tmp_path / "nifti"))

    # Another autoencoder (another seed) in the recorded run directory, at the same step: refused by its digest.
    other = tmp_path / "other_ae"
    assert_ok(hpcdiff("train", road["ae_job"], "--run-dir", other, "--quiet", "--set", "train.seed=9", timeout=300))
    kept = tmp_path / "kept_ae"
    road["ae"].rename(kept)
    try:
        shutil.copytree(other, road["ae"])
        proc = hpcdiff("sample", "--run-dir", run, "--out", tmp_path / "refused", "--n", 3, "--steps", 3)
    finally:
        shutil.rmtree(road["ae"], ignore_errors=True)
        kept.rename(road["ae"])
    assert proc.returncode == 2, proc.stderr
    assert f"the autoencoder in {road['ae']} (step 4) has changed" in proc.stderr
    assert "encode again" in proc.stderr and not (tmp_path / "refused").exists()


def test_training_on_latents_refuses_patches_and_a_wrong_channel_count(road, tmp_path):
    for case, section, message in (
        ("patch", {"data": {"patch_size": [4, 4, 4]}}, "data.mode/data.patch_size"),
        ("channels", {"model": {"in_channels": 1}}, "model.in_channels is 1, but the shards"),
    ):
        job = job_yaml(tmp_path / f"{case}.yaml", road["latents"], **section)
        proc = hpcdiff("train", job, "--run-dir", tmp_path / case, "--quiet")
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_latent_demo_chains_each_stage_into_the_next(tmp_path):
    from hpcdiff.demo import _resource, latent_stages

    ae, ldm = _resource("latent-demo.yaml"), _resource("latent-demo-diffusion.yaml")
    stages = {s.name: s.args for s in latent_stages(tmp_path, ae, ldm)}
    assert list(stages) == ["cohort", "ingest", "autoencoder", "encode", "diffusion", "sample", "export", "quality"]
    out = {name: str(tmp_path / name) for name in ("shards", "autoencoder", "latents", "run", "synthetic")}
    assert stages["autoencoder"][:2] == ("train", str(ae)) and f"data.shards={out['shards']}" in stages["autoencoder"]
    assert stages["encode"][:4] == ("encode", out["shards"], "--run-dir", out["autoencoder"])
    assert stages["diffusion"][:2] == ("train", str(ldm)) and f"data.shards={out['latents']}" in stages["diffusion"]
    assert stages["sample"][:5] == ("sample", "--run-dir", out["run"], "--out", out["synthetic"])
    assert stages["export"][1] == stages["quality"][2] == out["synthetic"]
