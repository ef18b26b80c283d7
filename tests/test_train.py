"""The training loop end to end through ``hpcdiff train``: on the synthetic cohort, under mpirun, with bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpcdiff import checkpoint
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, hpcdiff, mpirun

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`


@pytest.fixture(scope="module")
def cohort_shards(tmp_path_factory) -> Path:
    """The built-in synthetic cohort, ingested: what the loss must fall on."""
    root = tmp_path_factory.mktemp("cohort")
    assert_ok(hpcdiff("cohort", "--out", root / "bids", "--subjects", 12, "--shape", 16, 20, 16, "--seed", 2))
    assert_ok(hpcdiff("ingest", root / "bids", "--out", root / "shards", "--shape", 16, 20, 16))
    return root / "shards"


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return blob_shards(tmp_path_factory.mktemp("blobs") / "shards", num_subjects=8, per_shard=4)


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("kind", "mode"), [("flow", "3d"), ("flow", "2d"), ("ddpm", "3d"), ("ddpm", "2d")], ids=lambda v: str(v)
)
def test_loss_falls_on_the_synthetic_cohort(cohort_shards, tmp_path, kind, mode):
    steps = 80
    objective = {"kind": kind} if kind == "flow" else {"kind": "ddpm", "prediction": "v", "num_timesteps": 200}
    job = job_yaml(
        tmp_path / "job.yaml",
        cohort_shards,
        data={"mode": mode, "batch_size": 4 if mode == "2d" else 2, "slice_axis": 2},
        objective=objective,
        optim={"lr": 3e-3, "warmup_steps": 10},
        train={"steps": steps, "checkpoint_every": steps, "cond_drop_prob": 0.1},
    )
    assert_ok(hpcdiff("train", job, "--run-dir", tmp_path / "run", "--quiet", timeout=300))
    losses = _losses(tmp_path / "run")
    assert len(losses) == steps
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, f"{kind}/{mode}: loss {first:.4f} -> {last:.4f}"


@pytest.mark.mpi
def test_two_ranks_stay_identical_and_match_one_rank_with_twice_the_batch(blobs, tmp_path):
    one = job_yaml(tmp_path / "one.yaml", blobs, data={"batch_size": 4}, train={"steps": 1, "checkpoint_every": 1})
    two = job_yaml(tmp_path / "two.yaml", blobs, data={"batch_size": 2}, train={"steps": 1, "checkpoint_every": 1})
    assert_ok(hpcdiff("train", one, "--run-dir", tmp_path / "r1", "--quiet"))
    # Rank 0 refuses to checkpoint unless every rank's weights digest is equal (hpcdiff.train._save).
    assert_ok(mpirun(2, [*HPCDIFF, "train", two, "--run-dir", tmp_path / "r2", "--quiet"]))
    a = checkpoint.load(checkpoint.latest_valid(tmp_path / "r1" / "checkpoints"))
    b = checkpoint.load(checkpoint.latest_valid(tmp_path / "r2" / "checkpoints"))
    assert _losses(tmp_path / "r1")[0] == pytest.approx(_losses(tmp_path / "r2")[0], rel=1e-5)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert a["position"] == b["position"] == 4


@pytest.mark.parametrize(
    ("override", "code", "message"),
    [
        ("optim.warmup_step=3", 2, "unknown key 'optim.warmup_step' in 'optim': did you mean 'warmup_steps'"),
        ("train.stepz=3", 2, "did you mean 'steps'"),
        ("train.steps=many", 2, "train.steps: expected an integer"),
        ("data.batch_size=0", 2, "data.batch_size: must be at least 1"),
        ("objective.kind=gan", 2, "objective.kind"),
        ("model.channel_mults=oops", 2, "model.channel_mults"),
        ("data.covariates=[agee]", 2, "did you mean 'age'"),
        ("data.shards=/nonexistent/shards", 3, "/nonexistent/shards"),
    ],
)
def test_bad_config_exits_with_a_message_naming_the_problem(blobs, tmp_path, override, code, message):
    job = job_yaml(tmp_path / "job.yaml", blobs)
    proc = hpcdiff("train", job, "--run-dir", tmp_path / "run", "--quiet", "--set", override)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_top_level_section_and_bad_yaml(tmp_path, blobs):
    job = job_yaml(tmp_path / "job.yaml", blobs)
    job.write_text(job.read_text() + "\ntrian: {}\n")
    proc = hpcdiff("train", job, "--run-dir", tmp_path / "run")
    assert proc.returncode == 2 and "did you mean 'train'" in proc.stderr
    job.write_text("data: [unclosed\n")
    proc = hpcdiff("train", job, "--run-dir", tmp_path / "run")
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and str(job) in proc.stderr


def test_deterministic_flag_trains_and_repeats_bitwise_on_cpu(blobs, tmp_path):
    job = job_yaml(tmp_path / "job.yaml", blobs, train={"steps": 2, "checkpoint_every": 2, "deterministic": True})
    for run in ("a", "b"):
        assert_ok(hpcdiff("train", job, "--run-dir", tmp_path / run, "--quiet"))
    a, b = (checkpoint.latest_valid(tmp_path / run / "checkpoints") for run in "ab")
    assert a.weights_sha256 == b.weights_sha256 is not None
