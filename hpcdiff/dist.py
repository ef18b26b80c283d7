"""Who am I, how many are we, and a torch.distributed group that never hangs silently.

Rank and world size are read once from a table of launcher variables and passed on explicitly, so nothing below
this module reads the environment. Bring-up is race-free: rank 0 opens a ``TCPStore`` on a port the OS picks and
broadcasts it over MPI (broadcasting a "free port" found beforehand races: another process may take it first).
Every collective carries a timeout, so a dead peer ends the job in bounded time instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar

from hpcdiff.errors import HpcdiffError

Launcher = Literal["single", "mpirun", "srun", "torchrun"]
T = TypeVar("T")
log = logging.getLogger(__name__)

# Set once this process has brought up torch.distributed; exit_process then skips finalization.
_process_group_started = False

# (launcher, rank, world size, local rank, local world size); first match wins. torchrun comes first because it
# may itself run inside an srun step; srun is recognised by its *step* variables only, because a batch script
# also carries SLURM_PROCID/SLURM_NTASKS while being one process.
_LAUNCHER_TABLE: tuple[tuple[Launcher, str, str, str, str], ...] = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    (
        "mpirun",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
)


@dataclass(frozen=True)
class Topology:
    """Where this process stands among its peers; plain data, testable without any launcher."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: Launcher
    job_id: str | None = None
    num_nodes: int | None = None
    """Nodes the ranks run on, as the launcher says; None when it does not say (then taken as several)."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} outside node of size {self.local_world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single_node(self) -> bool:
        """True only when the launcher says every rank runs on this host; a guess is never taken for it."""
        return self.world_size == 1 or self.num_nodes == 1


_TASKS_GROUP = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def parse_tasks_per_node(value: str) -> list[int]:
    """Expand Slurm's compressed tasks-per-node list: ``"3(x2),1"`` -> ``[3, 3, 1]``.

    This is the form of ``SLURM_STEP_TASKS_PER_NODE`` and ``SLURM_TASKS_PER_NODE``; raises ValueError otherwise.
    """
    counts: list[int] = []
    for group in value.split(","):
        match = _TASKS_GROUP.match(group.strip())
        if match is None:
            raise ValueError(f"not a Slurm tasks-per-node list (such as '4(x2)' or '2,1'): {value!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _srun_topology(env: Mapping[str, str], rank: int, size: int, job_id: str | None) -> Topology:
    """Rank layout of an srun step, from its tasks-per-node list and this task's node index."""
    key = "SLURM_STEP_TASKS_PER_NODE"
    try:
        counts = parse_tasks_per_node(env.get(key, str(size)))
        node = int(env.get("SLURM_NODEID", "0"))
        local_size, local_rank = counts[node], int(env.get("SLURM_LOCALID", "0"))
    except (ValueError, IndexError) as e:
        raise ValueError(
            f"cannot place rank {rank} from {key}={env.get(key)!r}, SLURM_NODEID={env.get('SLURM_NODEID')!r} "
            f"and SLURM_LOCALID={env.get('SLURM_LOCALID')!r}: {e}"
        ) from e
    if sum(counts) != size:
        raise ValueError(f"{key}={env.get(key)!r} counts {sum(counts)} tasks but SLURM_STEP_NUM_TASKS={size}")
    return Topology(rank, size, local_rank, local_size, "srun", job_id, num_nodes=len(counts))


def detect_topology(env: Mapping[str, str] | None = None) -> Topology:
    """Read rank and world size from the first launcher whose variables are present.

    One process with no launcher is a world of size 1. Under mpirun and torchrun the ranks are on one node only
    when the local size equals the world size; under srun the step's tasks-per-node list says where each is.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID") or None
    for launcher, k_rank, k_size, k_local, k_local_size in _LAUNCHER_TABLE:
        if k_rank in env and k_size in env:
            rank, size = int(env[k_rank]), int(env[k_size])
            if launcher == "srun":
                if "SLURM_STEP_ID" not in env:
                    continue
                return _srun_topology(env, rank, size, job_id)
            if k_local not in env or k_local_size not in env:
                # Placement unknown: the local rank only picks a GPU, so the global one will do; the node count
                # stays unknown, so the ranks are never taken to share this host.
                return Topology(rank, size, rank, size, launcher, job_id, num_nodes=None)
            local_rank, local_size = int(env[k_local]), int(env[k_local_size])
            nodes = 1 if local_size == size else None
            return Topology(rank, size, local_rank, local_size, launcher, job_id, num_nodes=nodes)
    return Topology(0, 1, 0, 1, "single", job_id, num_nodes=1)


@dataclass
class Context:
    """A brought-up process group (or a world of one) with the few collectives hpcdiff needs."""

    topology: Topology
    device: Any  # torch.device; typed loosely so importing this module does not import torch
    backend: str | None
    timeout_s: float

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def is_main(self) -> bool:
        return self.topology.is_main

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as tdist

            # gloo's barrier honours the group timeout; a monitored barrier names the missing rank.
            if self.backend == "gloo":
                tdist.monitored_barrier(timeout=_dt.timedelta(seconds=self.timeout_s))
            else:
                tdist.barrier()

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag true on every rank when it is true on at least one, in one collective.

        This is how ranks agree to checkpoint or stop at a step boundary.
        """
        if not self.distributed:
            return list(flags)
        import torch
        import torch.distributed as tdist

        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def all_reduce_sum(self, tensor: Any) -> Any:
        """Sum a tensor over ranks in place and return it."""
        if self.distributed:
            import torch.distributed as tdist

            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather one picklable object from every rank, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand every rank its result, or raise its error on every rank.

        A bad input that rank 0 finds while planning must end every rank the same way (exit 2 or 3), cleanly,
        rather than leave the others in a collective until an abort turns the exit code into a crash.
        """
        outcome: tuple[bool, Any] | None = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except HpcdiffError as e:
                outcome = (False, e)
        ok, value = self.broadcast_object(outcome)
        if not ok:
            value.on_every_rank = True
            raise value
        return value

    def close(self) -> None:
        """Tear the group down; safe to call twice and after a failure."""
        if self.distributed:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()
            self.backend = None


def exit_process(code: int) -> NoReturn:
    """Leave with ``code``; once torch.distributed has run here, without Python's finalization.

    DistributedDataParallel keeps gloo's process group alive past ``destroy_process_group`` (its worker threads
    are never joined). A worker thread that releases a tensor after Python has begun to finalize cannot take the
    GIL and aborts the process (SIGABRT, exit 134): a finished job would be reported as crashed. So, after an
    orderly teardown (threads joined as at a normal exit, logs and streams flushed, MPI finalized), the process
    ends at once. Everything on disk is complete by then: writers close their files and fsync before returning.
    """
    if not _process_group_started:
        sys.exit(code)
    # What Python runs first at exit: the hooks that let idle executor workers quit, then joins of the
    # non-daemon threads (a checkpoint writer finishing its file). Only the finalization after it is skipped.
    threading._shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe must not change the exit code
            stream.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def abort_peers(code: int) -> None:
    """End every rank of an MPI job now; for an error on one rank that the others cannot see.

    A rank that exits on its own leaves its peers blocked in a collective until the timeout; MPI's abort ends
    them at once and mpirun or srun reports the failure.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        sys.stderr.flush()
        mpi.COMM_WORLD.Abort(code)


def _abort_on_uncaught(exc_type, exc, tb) -> None:  # noqa: ANN001
    sys.__excepthook__(exc_type, exc, tb)
    abort_peers(1)


def rendezvous_host(topo: Topology, hostnames: Sequence[str]) -> str:
    """The address rank 0 advertises for the rendezvous: loopback only when every rank is on this host.

    Otherwise the address its peers reach (``reachable_address``). Raises RuntimeError when there is none,
    since a loopback address would hang the peers instead.

    Args:
        topo: rank 0's topology.
        hostnames: ``socket.gethostname()`` of every rank, in rank order.
    """
    own = hostnames[0]
    if topo.single_node and all(h == own for h in hostnames):
        return "127.0.0.1"
    return reachable_address(own, hostnames)


def reachable_address(own: str, hostnames: Sequence[str]) -> str:
    """This host's address that the other hosts reach, for a server they must connect to.

    The source address of the route to another host (a UDP ``connect`` sends nothing, it only asks the kernel
    for the route), else this host's name resolved to a non-loopback address.

    Args:
        own: this host's name.
        hostnames: the hosts of every peer (this one may be among them).
    """
    for peer in dict.fromkeys(h for h in hostnames if h != own):
        with contextlib.suppress(OSError):
            peer_ip = socket.getaddrinfo(peer, None, socket.AF_INET)[0][4][0]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((peer_ip, 9))
                address = probe.getsockname()[0]
            if not address.startswith("127."):
                return address
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(own, None, socket.AF_INET):
            if not info[4][0].startswith("127."):
                return info[4][0]
    raise RuntimeError(
        f"the ranks run on several hosts ({', '.join(sorted(set(hostnames)))}), but no address of {own} other than "
        "loopback reaches them: check that every node's hostname resolves (DNS or /etc/hosts) to its network address"
    )


def _store_via_mpi(topo: Topology, timeout: _dt.timedelta) -> Any:
    """Rank 0 opens a TCPStore on an OS-chosen port; MPI broadcasts (host, port) to the others."""
    import torch.distributed as tdist
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    sys.excepthook = _abort_on_uncaught
    if comm.Get_size() != topo.world_size:
        raise RuntimeError(
            f"MPI sees {comm.Get_size()} ranks but the launcher says {topo.world_size}: "
            "is mpi4py built against the MPI that launched this job?"
        )
    hostnames = comm.gather(socket.gethostname(), root=0)
    store = None
    address = None
    if topo.rank == 0:
        # The store's server listens on every interface; the host is what the peers are told to dial.
        host = rendezvous_host(topo, hostnames)
        store = tdist.TCPStore(host, 0, topo.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        address = (host, store.port)
        log.info("rendezvous at %s:%d on %s (%d hosts)", host, store.port, hostnames[0], len(set(hostnames)))
    host, port = comm.bcast(address, root=0)
    if store is None:
        store = tdist.TCPStore(host, port, topo.world_size, is_master=False, timeout=timeout)
    return store


def pick_device(local_rank: int) -> Any:
    """The GPU of this local rank (round robin over the node's GPUs) when CUDA is present, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(
    timeout_s: float = 300.0,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    topology: Topology | None = None,
) -> Context:
    """Bring up torch.distributed for this process (or nothing, for a world of one).

    Args:
        timeout_s: every collective fails after this many seconds instead of waiting for a dead peer.
        device: "auto" takes the GPU of this local rank when CUDA is present, else the CPU.
        topology: who this process is; read from the launcher variables when omitted.
    """
    import torch
    import torch.distributed as tdist

    topo = topology or detect_topology()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = pick_device(topo.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if topo.world_size == 1:
        return Context(topo, dev, None, timeout_s)
    # Every rank names its host in its own log: where a rank ran is the first question after a failure.
    log.info(
        "rank %d of %d on host %s (local rank %d of %d, %s)",
        topo.rank,
        topo.world_size,
        socket.gethostname(),
        topo.local_rank,
        topo.local_world_size,
        f"{topo.num_nodes} node(s)" if topo.num_nodes else "nodes not reported by the launcher",
    )
    global _process_group_started
    _process_group_started = True
    backend = "nccl" if use_cuda else "gloo"
    timeout = _dt.timedelta(seconds=timeout_s)
    if topo.launcher == "torchrun":
        tdist.init_process_group(backend, rank=topo.rank, world_size=topo.world_size, timeout=timeout)
    else:
        store = _store_via_mpi(topo, timeout)
        tdist.init_process_group(backend, store=store, rank=topo.rank, world_size=topo.world_size, timeout=timeout)
    return Context(topo, dev, backend, timeout_s)
