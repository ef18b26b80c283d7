"""Where dask runs the statistics: one context manager, five backends, the same results.

- ``local``: dask's threaded scheduler in this process (default); ``synchronous``: one thread, for debugging.
- ``distributed``: a LocalCluster of worker *processes* on loopback.
- ``slurm``: a dask-jobqueue SLURMCluster; each worker is a Slurm job running this Python (the venv's), with the
  environment (PYTHONPATH, HDF5_PLUGIN_PATH) exported in the job script. The scheduler runs in this process and
  listens on the address of its route to the partition's nodes (loopback only when every node is this host), so
  workers on other nodes reach it; the worker jobs' logs go to a folder on the shared file system, and their
  memory is sized from the grid and the block (``worker_memory``), not a fixed amount.
- ``mpi``: dask-mpi under ``mpirun -n N`` (N >= 3): rank 0 runs the scheduler, ranks >= 2 the workers (they
  exit inside this context manager when the client is done), rank 1 runs the statistics.

Worker processes get ``HDF5_PLUGIN_PATH`` so h5py finds LZ4 even before anything imports hdf5plugin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import dask

from hpcdiff.errors import ConfigError, UsageError
from hpcdiff.stats.reduce import SPLIT_EVERY
from hpcdiff.stats.source import block_for

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
    """network interface of the scheduler and workers (e.g. "ib0"). None: for slurm the scheduler listens on the
    address of its route to the partition's nodes (loopback when they are all this host) and each worker on the
    address of its route to the scheduler; for mpi "lo" when every rank is on one host, else on each rank the
    interface of its address that the other hosts reach."""
    job_extra: list[str] = field(default_factory=list)
    """extra #SBATCH directives, e.g. ["--account=abc"]."""
    num_voxels: int | None = None
    """voxels per volume of the shards analysed: sizes the memory of Slurm workers (None: a 1 mm MNI grid)."""
    block: int | None = None
    """subjects per dask task, as the statistics read them (None: ``block_for`` the grid)."""
    log_dir: str | None = None
    """folder of the Slurm worker jobs' logs, on a file system this host and the nodes share (None:
    ``.hpcdiff/dask-workers`` in the current folder)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1 (--workers), got {self.workers}")


MNI_1MM_VOXELS = 182 * 218 * 182
"""Voxels of the 1 mm MNI grid: what worker memory is sized for when the grid is not known."""
WORKER_BASE_BYTES = 1 << 30
"""A worker process before any data: Python, numpy, torch, h5py, distributed (measured 0.36-0.60 GB resident).

Twice the typical base, not the typical base: a worker near its limit does not slow down, it stops (see
``WORKER_MEMORY_POLICY``), so the margin is where a machine's allocator or thread arenas differ from ours."""
WORKER_MEMORY_POLICY = {
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False",
}
"""No spilling and no pausing in worker processes: a statistics task holds only its own block, so there is nothing
to spill, and a worker paused at 80% of its limit waits forever (a job that hangs until its time limit). Without a
pause, a worker past 95% is restarted by its nanny and the task fails with KilledWorker after a few tries: an error,
not a hang."""
BLOCK_COPIES = 3
"""Copies of one task's float64 block alive at once: the stored float16 read, its float64 copy, a centred copy."""
SUMMARY_MAPS = 10
"""Per-voxel float64 maps in the largest block summary (groupdiff: GLM sums and two groups' moments)."""


def worker_memory(num_voxels: int, block: int | None = None) -> int:
    """Bytes a one-thread dask worker needs for statistics over volumes of ``num_voxels`` voxels.

    The same estimate that sizes the blocks of every backend (``block_for``): a task holds its block of volumes in
    float64 a few times over, and a merge holds ``SPLIT_EVERY`` summaries plus its result. Summaries are counted
    over the whole grid (the mask is not known before the data are read), so this is an upper bound: measured
    peaks were 0.38 GB for 16 thousand voxels and 0.72 GB for a million, estimates 0.55 and 1.7 GB
    (bench/bench_stats_worker.py).
    """
    block = block or block_for(num_voxels)
    block_bytes = BLOCK_COPIES * 8 * block * num_voxels
    summary_bytes = (SPLIT_EVERY + 1) * SUMMARY_MAPS * 8 * num_voxels
    return WORKER_BASE_BYTES + block_bytes + summary_bytes


def _worker_env() -> dict[str, str]:
    import hdf5plugin

    import hpcdiff

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(hpcdiff.__file__)))
    python_path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
    return {"HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH, "PYTHONPATH": python_path, **WORKER_MEMORY_POLICY}


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
            with _slurm_cluster(opts) as cluster, Client(cluster) as client:
                client.wait_for_workers(opts.workers, timeout=opts.timeout_s)
                yield name
        else:
            with _mpi_client(tmp, opts.interface):
                yield name


@contextlib.contextmanager
def _slurm_cluster(opts: BackendOptions) -> Iterator[object]:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as e:
        raise UsageError("backend 'slurm' needs dask-jobqueue: pip install dask-jobqueue") from e
    env = _worker_env()
    memory = worker_memory(opts.num_voxels or MNI_1MM_VOXELS, opts.block)
    log_dir = os.path.abspath(opts.log_dir or os.path.join(".hpcdiff", "dask-workers"))
    # An interface names the scheduler's and the workers' network; without one the scheduler takes the address
    # the nodes reach, and each worker the address of its own route back to it.
    where = {"interface": opts.interface} if opts.interface else {"scheduler_options": {"host": _scheduler_host(opts)}}
    cluster = SLURMCluster(
        cores=1,
        processes=1,
        memory=f"{memory}B",
        walltime=opts.walltime,
        queue=opts.partition,
        python=sys.executable,
        job_name="hpcdiff-stats",
        job_extra_directives=["--export=ALL", *_log_directives(log_dir), *opts.job_extra],
        job_script_prologue=[f"export {k}={_quote(v)}" for k, v in env.items()],
        death_timeout=opts.timeout_s,
        **where,
    )
    log.info(
        "Slurm worker jobs: %.2f GB each, logs in %s; job script:\n%s", memory / 1e9, log_dir, cluster.job_script()
    )
    try:
        cluster.scale(jobs=opts.workers)
        yield cluster
    finally:
        cluster.close()


def _log_directives(log_dir: str) -> list[str]:
    """sbatch --output/--error into ``log_dir``, quoted: sbatch splits #SBATCH lines at spaces outside quotes
    (dask-jobqueue's own log_directory is written unquoted, so a folder with a space lost every worker's log)."""
    if '"' in log_dir or "\n" in log_dir:
        raise UsageError(f"the worker log folder {log_dir!r} may not contain double quotes: choose another --out")
    os.makedirs(log_dir, exist_ok=True)
    escaped = log_dir.replace("%", "%%")
    return [f'--output="{escaped}/%j.out"', f'--error="{escaped}/%j.err"']


def _scheduler_host(opts: BackendOptions) -> str:
    """The address of this host that the partition's nodes reach: loopback only when every node is this host."""
    from hpcdiff.dist import reachable_address

    addresses = _node_addresses(opts.partition)
    if all(_is_loopback(a) for a in addresses):
        return "127.0.0.1"
    try:
        return reachable_address(socket.gethostname(), addresses)
    except RuntimeError as e:
        raise UsageError(f"{e}; or name the network with --interface NAME (e.g. ib0)") from e


def _node_addresses(partition: str | None) -> list[str]:
    """NodeAddr of every node of ``partition`` (all partitions when None), as sinfo reports them."""
    argv = ["sinfo", "-h", "-N", "-o", "%o", *(["-p", partition] if partition else [])]
    fix = "check --partition against sinfo -s, or name the scheduler's network with --interface NAME"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"backend 'slurm': could not list the nodes with {' '.join(argv)} ({e}); {fix}") from e
    addresses = list(dict.fromkeys(proc.stdout.split()))
    if proc.returncode != 0 or not addresses:
        why = proc.stderr.strip() or "no nodes"
        raise UsageError(f"backend 'slurm': {' '.join(argv)} exited {proc.returncode} ({why}); {fix}")
    return addresses


def _is_loopback(address: str) -> bool:
    try:
        return all(i[4][0].startswith("127.") for i in socket.getaddrinfo(address, None, socket.AF_INET))
    except OSError:
        return False


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
