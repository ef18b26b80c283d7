"""Every ready job config in jobs/ loads, validates and builds its model configuration."""

from pathlib import Path

import pytest

from hpcdiff.models import AutoencoderConfig
from hpcdiff.networks import build_model_config, build_objective_from, check_input_size
from hpcdiff.train_config import load_job
from tests.harness import ROOT

TRAIN_JOBS = sorted(
    p for p in (ROOT / "jobs").glob("*.yaml") if "data" in p.read_text() and "stages" not in p.read_text()
)


@pytest.mark.parametrize("path", TRAIN_JOBS, ids=lambda p: p.name)
def test_job_config_is_valid(path: Path):
    job = load_job(path)
    cfg = build_model_config(job, [])
    if isinstance(cfg, AutoencoderConfig):
        assert job.data.mode == "3d" and job.data.patch_size is not None
        check_input_size(job, cfg, (160, 224, 160))  # its patches fit a 1 mm UK Biobank grid, and so any smaller
    else:
        assert cfg.dims == (3 if job.data.mode == "3d" else 2)
    assert build_objective_from(job) is not None


def test_the_ready_jobs_cover_2d_3d_demo_ukbiobank_and_latent():
    names = {p.name for p in TRAIN_JOBS}
    assert {"demo.yaml", "slices-2d.yaml", "volumes-3d.yaml", "ukbiobank-3d.yaml", "latent-demo.yaml"} <= names


PIPELINES = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if "stages:" in p.read_text())


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_config_is_valid(path: Path, tmp_path, monkeypatch):
    from hpcdiff.launch.slurm.pipeline import jobs, load_pipeline

    monkeypatch.chdir(ROOT)  # pipelines name their job configs relative to the repository
    assert jobs(load_pipeline(path, run_dir=str(tmp_path / "p")))
    assert {"pipeline.yaml", "latent-pipeline.yaml", "ukbiobank-latent-pipeline.yaml"} <= {p.name for p in PIPELINES}
