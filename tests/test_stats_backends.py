"""The dask backends give the same maps: threads, synchronous, a LocalCluster, dask-mpi under mpirun, Slurm."""

import nibabel as nib
import numpy as np
import pytest

from hpcdiff.errors import UsageError
from hpcdiff.stats import BackendOptions, backend, run_groupdiff, run_template
from hpcdiff.stats.backend import WORKER_BASE_BYTES, _log_directives, _scheduler_host, worker_memory
from tests.harness import PYTHON, assert_ok, hpcdiff, mpirun, run
from tests.stats_data import write_cohort_shards

pytestmark = pytest.mark.slow  # starts dask clusters and mpirun ranks: left out of `make test-quick`

GROUPDIFF = ["--group", "group", "--covariates", "age,sex", "--block", "5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats backends") / "shards"
    write_cohort_shards(root, num_subjects=24, per_shard=10)
    return root


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """groupdiff on the default (threaded) backend."""
    out = tmp_path_factory.mktemp("reference")
    with backend("local"):
        run_groupdiff(shards, out, "group", ["age", "sex"])
    return out


def _same_maps(out, reference, names=("t", "p", "d", "t_age", "mask")):
    for name in names:
        ours = nib.load(str(out / f"{name}.nii.gz")).get_fdata()
        ref = nib.load(str(reference / f"{name}.nii.gz")).get_fdata()
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9, err_msg=name)
        assert np.any(ref != 0)


@pytest.mark.parametrize("name", ["synchronous", "distributed"])
def test_in_process_backends_give_the_same_maps(shards, reference, tmp_path, name):
    with backend(name, BackendOptions(workers=2)):
        run_groupdiff(shards, tmp_path, "group", ["age", "sex"])
        run_template(shards, tmp_path / "template")
    _same_maps(tmp_path, reference)


def test_distributed_workers_read_lz4_without_importing_hdf5plugin(shards, tmp_path):
    """Worker processes that never import hdf5plugin themselves still decode the LZ4 shards."""
    code = (
        "import sys; from distributed import LocalCluster, Client\n"
        "from hpcdiff.stats import backend, run_template\n"
        "with backend('distributed'):\n"
        "    from distributed import get_client\n"
        "    mods = get_client().run(lambda: 'hdf5plugin' in sys.modules)\n"
        "    print('before', sorted(mods.values()))\n"
        f"    run_template({str(shards)!r}, {str(tmp_path)!r})\n"
    )
    proc = run([PYTHON, "-c", code], timeout=300)
    assert_ok(proc)
    assert "before [False, False]" in proc.stdout  # fresh worker processes...
    assert (tmp_path / "mean.nii.gz").exists()  # ...and still the template was read


@pytest.mark.mpi
def test_dask_mpi_under_mpirun_gives_the_same_maps(shards, reference, tmp_path):
    out = tmp_path / "mpi out"
    proc = mpirun(
        4,
        [PYTHON, "-m", "hpcdiff", "stats", "groupdiff", shards, *GROUPDIFF, "--backend", "mpi", "--out", out],
        timeout=400,
    )
    assert_ok(proc)
    _same_maps(out, reference)


def test_mpi_backend_refuses_too_few_ranks(shards, tmp_path):
    proc = mpirun(
        2, [PYTHON, "-m", "hpcdiff", "stats", "template", shards, "--backend", "mpi", "--out", tmp_path], timeout=200
    )
    assert proc.returncode == 2, proc.stderr
    assert "at least 3 ranks" in proc.stderr


@pytest.mark.slurm
def test_slurm_cluster_backend_gives_the_same_maps(slurm_cluster, shards, reference, tmp_path):
    out = tmp_path / "slurm out"
    proc = hpcdiff(
        "stats",
        "groupdiff",
        shards,
        *GROUPDIFF,
        "--backend",
        "slurm",
        "--workers",
        "2",
        "--out",
        out,
        "--json",
        timeout=400,
        env=slurm_cluster.env,
    )
    assert_ok(proc)
    _same_maps(out, reference)


def test_slurm_worker_memory_follows_the_grid_and_the_block():
    small = worker_memory(12 * 14 * 12, block=5)
    assert WORKER_BASE_BYTES < small < WORKER_BASE_BYTES + (4 << 20)
    voxels = 96 * 112 * 96
    # Above the peaks measured for groupdiff at this grid (0.66-0.72 GB, docs/benchmarks.md), growing with the block.
    assert 0.72e9 < worker_memory(voxels, block=2) < worker_memory(voxels) < 2.5e9
    assert worker_memory(2 * voxels) > worker_memory(voxels)


def test_slurm_worker_logs_are_quoted_for_sbatch(tmp_path):
    folder = tmp_path / "logs with space %x"
    assert _log_directives(str(folder)) == [
        f'--output="{tmp_path}/logs with space %%x/%j.out"',
        f'--error="{tmp_path}/logs with space %%x/%j.err"',
    ]
    assert folder.is_dir()
    with pytest.raises(UsageError, match="double quotes"):
        _log_directives(str(tmp_path / 'a"b'))


def test_slurm_scheduler_address(tmp_path, monkeypatch):
    # A fake sinfo beside the real-Slurm tests: it answers what a one-node local Slurm's answers.
    fake = tmp_path / "sinfo"
    fake.write_text("#!/bin/sh\necho 127.0.0.1\necho localhost\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _scheduler_host(BackendOptions()) == "127.0.0.1"  # every node is this host: loopback is right
    fake.unlink()
    with pytest.raises(UsageError, match="--interface"):
        _scheduler_host(BackendOptions(partition="gpu"))
