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


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    """A real 2-node Slurm (node1, node2: network namespaces, 4 CPUs each) shared by every multi-node test."""
    from tests.slurm_harness import SlurmCluster, require_namespaces

    require_namespaces()
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("two nodes"), nodes=2)
    yield cluster
    cluster.stop()
