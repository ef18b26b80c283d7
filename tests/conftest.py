import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node Slurm for the whole session, under a folder whose name has a space."""
    from tests.slurm_harness import SlurmCluster, require_slurm

    require_slurm()
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("local slurm"))
    yield cluster
    cluster.stop()
