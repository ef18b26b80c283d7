"""The autoencoder stage through ``hpcdiff train``: the loss falls on the built-in cohort, a killed run resumes bit
for bit, bad configs are refused before training, and its run cannot be sampled from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, child_env, hpcdiff, mpirun, wait_for
from tests.test_resume import _logged_step, _outcome, _rank_pids, _train_cmd

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`

AE_MODEL = {"kind": "autoencoder", "base_channels": 8, "channel_mults": [1, 2, 2], "latent_channels": 4}


def ae_job(path: Path, shards: Path, patch: list[int], **sections) -> Path:
    """A tiny autoencoder job: the training defaults of tests.datagen with the model and objective swapped."""
    job_yaml(path, shards, **sections)
    job = yaml.safe_load(path.read_text())
    job["model"], job["objective"] = dict(AE_MODEL), {"kind": "autoencoder"}
    job["data"]["patch_size"] = patch
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def cohort_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    assert_ok(hpcdiff("cohort", "--out", root / "bids", "--subjects", 8, "--shape", 16, 24, 16, "--seed", 2))
    assert_ok(hpcdiff("ingest", root / "bids", "--out", root / "shards", "--shape", 16, 24, 16))
    return root / "shards"


def test_loss_falls_on_the_cohort_and_the_run_refuses_to_sample(cohort_shards, tmp_path):
    steps = 60
    job = ae_job(
        tmp_path / "job.yaml",
        cohort_shards,
        [16, 16, 16],
        optim={"lr": 3e-3, "warmup_steps": 5},
        train={"steps": steps, "checkpoint_every": steps},
    )
    run = tmp_path / "run"
    assert_ok(hpcdiff("train", job, "--run-dir", run, "--quiet", timeout=300))
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == steps
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, f"autoencoder loss {first:.4f} -> {last:.4f}"
    proc = hpcdiff("sample", "--run-dir", run, "--out", tmp_path / "synth", "--n", 2)
    assert proc.returncode == 2, proc.stderr
    assert "model.kind 'autoencoder'" in proc.stderr and "does not generate" in proc.stderr


@pytest.mark.mpi
def test_sigkilled_autoencoder_run_resumes_bitwise_exact(tmp_path):
    shards = blob_shards(tmp_path / "shards", num_subjects=10, shape=(16, 16, 16), per_shard=4)
    steps = 20
    job = ae_job(tmp_path / "job.yaml", shards, [8, 8, 8], train={"steps": steps, "checkpoint_every": 3})
    assert_ok(mpirun(2, [*HPCDIFF, "train", job, "--run-dir", tmp_path / "straight", "--quiet"], timeout=240))
    reference = _outcome(tmp_path / "straight")

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(job, run), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        pids = wait_for(lambda: len(_rank_pids(proc.pid)) == 2 and _rank_pids(proc.pid), 60, "2 ranks")
        wait_for(lambda: _logged_step(run) >= 7 or proc.poll() is not None, 120, "step 7")
        os.kill(pids[1], signal.SIGKILL)
        killed_at = _logged_step(run)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and killed_at < steps, f"the kill did not land (step {killed_at})"
    assert_ok(mpirun(2, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet"], timeout=240))
    got = _outcome(run)
    assert got["digest"] == reference["digest"] and got["losses"] == reference["losses"]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "restart"][-1] >= 6


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective.kind=flow", "model.kind 'autoencoder' cannot train with objective.kind 'flow'"),
        ("model.kind=autoencodr", "model.kind: 'autoencodr' is not one of unet, autoencoder"),
        ("data.patch_size=[8,8,32]", "data.patch_size: [8, 8, 32] is larger than the volumes"),
        ("data.patch_size=[8,8,6]", "must be divisible by 4, the autoencoder's downsampling per axis"),
        ("model.latent_channels=16", "model.latent_channels: must be 3 to 8"),
        ("data.mode=2d", "data.patch_size: needs data.mode 3d"),
    ],
)
def test_bad_autoencoder_config_exits_2_naming_the_key(tmp_path, override, message):
    shards = blob_shards(tmp_path / "shards", num_subjects=4, shape=(16, 16, 16), per_shard=4)
    job = ae_job(tmp_path / "job.yaml", shards, [8, 8, 8])
    proc = hpcdiff("train", job, "--run-dir", tmp_path / "run", "--quiet", "--set", override)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
