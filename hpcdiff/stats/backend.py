"""Where dask runs the statistics: one context manager, five backends, the same results.

- ``local``: dask's threaded scheduler in this process (default); ``synchronous``: one thread, for debugging.
- ``distributed``: a LocalCluster of worker *processes* on loopback.
- ``slurm``: a dask-jobqueue SLURMCluster; each worker is a Slurm job running this Python (the venv's), with the
  environment (PYTHONPATH, HDF5_PLUGIN_PATH) exported in the job script.
- ``mpi``: dask-mpi under ``mpirun -n N`` (N >= 3): rank 0 runs the scheduler, ranks >= 2 the workers (they
  exit inside this context manager when the client is done), rank 1 runs the statistics.

Worker processes get ``HDF5_PLUGIN_PATH`` so h5py finds LZ4 even before anything imports hdf5plugin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import dask

from hpcdiff.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

BackendName = Literal["local", "synchronous", "distributed", "slurm", "mpi"]
BACKENDS: tuple[str, ...] = ("local", "synchronous", "distributed", "slurm", "mpi")


@dataclass(kw_only=True)
class BackendOptions:
    """How many workers and, for Slurm, where to submit them."""

    workers: int = 2
    """worker processes (distributed) or Slurm jobs (slurm); mpi takes its count from mpirun."""
    threads: int | None = None
    """threads of the local scheduler (None: one per core)."""
    partition: str | None = None
    """Slurm partition for worker jobs (None: the default partition)."""
    walltime: str = "00:30:00"
    """Slurm time limit of each worker job."""
    timeout_s: float = 300.0
    """how long to wait for workers to join before giving up."""
    interface: str | None = None
    """network interface of the scheduler and workers (e.g. "ib0"). None: for slurm "lo"; for mpi "lo" when every
    rank is on one host, else on each rank the interface of its address that the other hosts reach."""
    job_extra: list[str] = field(default_factory=list)
    """extra #SBATCH directives, e.g. ["--account=abc"]."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1 (--workers), got {self.workers}")


def _worker_env() -> dict[str, str]:
    import hdf5plugin

    import hpcdiff

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(hpcdiff.__file__)))
    python_path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
    return {"HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH, "PYTHONPATH": python_path}


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def backend(name: str, options: BackendOptions | None = None) -> Iterator[str]:
    """Run the dask computations inside this block on the named backend; yields the name.

    Raises:
        UsageError: unknown backend, or mpi without enough ranks.
    """
    opts = options or BackendOptions()
    if name not in BACKENDS:
        raise UsageError(f"unknown backend '{name}': choose one of {', '.join(BACKENDS)}")
    if name in ("local", "synchronous"):
        scheduler = "threads" if name == "local" else "synchronous"
        with dask.config.set(scheduler=scheduler, num_workers=opts.threads):
            yield name
        return
    from distributed import Client

    tmp = os.environ.get("DASK_TEMPORARY_DIRECTORY") or tempfile.gettempdir()
    with _env(_worker_env()), dask.config.set({"temporary-directory": tmp}):
        if name == "distributed":
            from distributed import LocalCluster

            with (
                LocalCluster(
                    n_workers=opts.workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    local_directory=tmp,
                ) as cluster,
                Client(cluster) as client,
            ):
                client.wait_for_workers(opts.workers, timeout=opts.timeout_s)
                yield name
        elif name == "slurm":
            with _slurm_cluster(opts, tmp) as cluster, Client(cluster) as client:
                client.wait_for_workers(opts.workers, timeout=opts.timeout_s)
                yield name
        else:
            with _mpi_client(tmp, opts.interface):
                yield name


@contextlib.contextmanager
def _slurm_cluster(opts: BackendOptions, tmp: str) -> Iterator[object]:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as e:
        raise UsageError("backend 'slurm' needs dask-jobqueue: pip install dask-jobqueue") from e
    env = _worker_env()
    cluster = SLURMCluster(
        cores=1,
        processes=1,
        memory="2GB",
        walltime=opts.walltime,
        queue=opts.partition,
        python=sys.executable,
        interface=opts.interface or "lo",
        local_directory=tmp,
        log_directory=os.path.join(tmp, "hpcdiff-dask-slurm"),
        job_name="hpcdiff-stats",
        # A local Slurm may declare little memory; the worker's own limit is what keeps it in bounds.
        job_directives_skip=["--mem"],
        job_extra_directives=["--export=ALL", *opts.job_extra],
        job_script_prologue=[f"export {k}={_quote(v)}" for k, v in env.items()],
        death_timeout=opts.timeout_s,
    )
    log.info("Slurm worker job script:\n%s", cluster.job_script())
    try:
        cluster.scale(jobs=opts.workers)
        yield cluster
    finally:
        cluster.close()


def _quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


@contextlib.contextmanager
def _mpi_client(tmp: str, interface: str | None) -> Iterator[None]:
    try:
        import dask_mpi
        from mpi4py import MPI
    except ImportError as e:
        raise UsageError("backend 'mpi' needs dask-mpi and mpi4py: pip install dask-mpi mpi4py") from e
    from distributed import Client

    if MPI.COMM_WORLD.Get_size() < 3:
        raise UsageError(
            "backend 'mpi' runs under mpirun with at least 3 ranks (scheduler, client, workers): "
            "mpirun -n 4 hpcdiff stats ... --backend mpi"
        )
    hostnames = MPI.COMM_WORLD.allgather(socket.gethostname())
    interface = interface or _interface_for(hostnames)
    log.info("dask-mpi on interface %s (%d hosts)", interface, len(set(hostnames)))
    # Ranks other than 1 serve as scheduler or worker and exit inside initialize once the client closes.
    dask_mpi.initialize(interface=interface, nthreads=1, local_directory=tmp, dashboard=False)
    with Client() as client:
        client.wait_for_workers(MPI.COMM_WORLD.Get_size() - 2, timeout=300)
        yield


def _interface_for(hostnames: list[str]) -> str:
    """Loopback when every rank is on this host; else the interface holding this host's reachable address."""
    import psutil

    from hpcdiff.dist import reachable_address

    own = socket.gethostname()
    if all(h == own for h in hostnames):
        return "lo"
    address = reachable_address(own, hostnames)
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    raise UsageError(f"no network interface of {own} holds its address {address}: pass --interface NAME")
