"""``hpcdiff plan``: its estimate matches the measured peak memory of a real CPU step, it says when a model does not
fit, and it refuses bad configs with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hpcdiff.memplan import measure_step
from hpcdiff.train_config import load_job
from tests.harness import PYTHON, ROOT, assert_ok, hpcdiff, run

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`

MODELS = {
    "unet": ({"base_channels": 8, "channel_mults": [1, 2]}, {"kind": "flow"}),
    "autoencoder": (
        {"kind": "autoencoder", "base_channels": 8, "channel_mults": [1, 2, 2], "latent_channels": 4},
        {"kind": "autoencoder"},
    ),
}


def _job(path: Path, kind: str, checkpointing: bool = False, shards: str = "/nonexistent/shards") -> Path:
    model, objective = MODELS[kind]
    job = {
        "data": {"shards": shards, "batch_size": 2},
        "model": {**model, "checkpointing": checkpointing},
        "objective": objective,
        "train": {"steps": 1},
    }
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("kind", ["unet", "autoencoder"])
def test_plan_matches_the_peak_rss_of_a_real_cpu_step(tmp_path, kind, checkpointing):
    job = _job(tmp_path / "job.yaml", kind, checkpointing)
    planned = measure_step(load_job(job), (48, 48, 48), []).peak_bytes
    # A fixed mmap threshold returns every freed tensor to the system, so RSS follows the live tensors rather
    # than glibc's heap growth.
    proc = run(
        [PYTHON, ROOT / "tests" / "workers" / "step_rss.py", job, 48, 48, 48],
        timeout=300,
        env={"MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    assert_ok(proc)
    measured = json.loads(proc.stdout)["peak"]
    assert measured > 50 * 2**20, "the step is too small to measure against the process baseline"
    assert abs(planned - measured) <= 0.25 * measured, (
        f"planned {planned / 2**20:.0f} MiB, measured {measured / 2**20:.0f}"
    )


def test_plan_reports_fit_and_the_checkpointing_saving(tmp_path):
    job = _job(tmp_path / "job.yaml", "unet")
    small = hpcdiff("plan", job, "--shape", 32, 32, 32, "--gpu-memory", 2, "--json", timeout=300)
    assert_ok(small)
    report = json.loads(small.stdout)
    assert report["fits"] is True and report["parameters"] > 0 and report["checkpointing"] is False
    assert report["other_peak_bytes"] < report["peak_bytes"], "checkpointing must lower the peak"
    assert report["checkpoint_bytes"] == 4 * 4 * report["parameters"]  # fp32 weights, EMA, two AdamW moments
    big = hpcdiff("plan", job, "--shape", 128, 128, 128, "--gpu-memory", 2, timeout=300)
    assert_ok(big)
    assert "does not fit in 2.00 GiB per GPU" in big.stdout
    assert "per sample" in big.stdout and "checkpointing    true:" in big.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.channel_mults=oops"], "model.channel_mults"),
        (["--set", "model.kind=gan"], "model.kind: 'gan' is not one of unet, autoencoder"),
        ([], "give the volume size with --shape D H W"),
        (["--shape", 48, 48, 48, "--gpu-memory", "-1"], "--gpu-memory must be positive"),
    ],
)
def test_plan_exits_2_on_a_bad_config(tmp_path, args, message):
    job = _job(tmp_path / "job.yaml", "unet")
    proc = hpcdiff("plan", job, *args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
