"""A real Slurm for tests: started by slurm/local/start.sh under one folder, stopped by PID.

One node (``localhost``) by default; with ``nodes=N`` each node is a slurmd in its own network and UTS namespace
(hostname ``nodeK``, its own address on a private bridge), sharing this machine's file system.

Job states are read with ``scontrol show job -o`` (there is no accounting database, so no ``sacct``); finished jobs
stay visible for the config's MinJobAge (300 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.harness import ROOT, require, run

START = ROOT / "slurm" / "local" / "start.sh"
STOP = ROOT / "slurm" / "local" / "stop.sh"
FAIL_NODE = ROOT / "slurm" / "local" / "fail-node.sh"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "scancel")
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


def require_slurm() -> None:
    """Skip (or fail under HPCDIFF_REQUIRE=slurm) unless a local Slurm can be started here."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    fix = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
    require("slurm", not missing, f"missing {', '.join(missing)} ({fix})")
    require("slurm", os.geteuid() == 0, "the local Slurm runs with SlurmUser=root: run the tests as root")


def require_namespaces() -> None:
    """Skip (or fail under HPCDIFF_REQUIRE=slurm) unless nodes can be made of network namespaces here."""
    require_slurm()
    missing = [b for b in ("ip", "nsenter", "unshare") if shutil.which(b) is None]
    require("slurm", not missing, f"missing {', '.join(missing)} (apt-get install -y iproute2 util-linux)")


class SlurmCluster:
    """Handle on a running local Slurm: its folder, the environment its clients need, and job helpers."""

    def __init__(self, directory: Path, nodes: int = 1) -> None:
        self.dir = directory
        self.nodes = nodes
        self.conf = directory / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, directory: Path, nodes: int = 1, timeout: float = 60) -> SlurmCluster:
        cluster = cls(directory, nodes)
        cluster.up(timeout)
        return cluster

    def up(self, timeout: float = 60) -> None:
        """Start the cluster, or bring back the slurmd of a failed node and wait until every node is idle."""
        proc = run(["bash", START, self.dir, "--nodes", self.nodes], timeout=timeout)
        if proc.returncode != 0:
            self.stop()  # whatever half of it came up must not outlive the session
            pytest.fail(f"slurm/local/start.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    @property
    def node_names(self) -> list[str]:
        return [f"node{k}" for k in range(1, self.nodes + 1)] if self.nodes > 1 else ["localhost"]

    def node_addresses(self) -> dict[str, str]:
        """Node name -> its address on the cluster's bridge, from the hosts file every node sees."""
        pairs = (line.split() for line in (self.dir / "hosts").read_text().splitlines() if not line.startswith("#"))
        return {name: addr for addr, name, *_ in pairs if name in self.node_names}

    @property
    def tag(self) -> str:
        """What the names of this cluster's namespaces (hpcdiff-TAG-nodeK) and bridge (hdbTAG) carry."""
        return re.search(r"^TAG=(\w+)$", (self.dir / "nodes.env").read_text(), re.M).group(1)

    def network_leftovers(self) -> list[str]:
        """This cluster's namespaces and bridge that exist now (none once it is stopped)."""
        namespaces = run(["ip", "netns", "list"], timeout=30).stdout.split()
        links = run(["ip", "-o", "link", "show"], timeout=30).stdout
        found = [ns for ns in namespaces if ns.startswith(f"hpcdiff-{self.tag}-")]
        return found + ([f"hdb{self.tag}"] if f" hdb{self.tag}:" in links else [])

    def node_pids(self, node: str) -> list[int]:
        """Every process running on ``node`` (in its network namespace): slurmd, slurmstepd, tasks."""
        proc = run(["ip", "netns", "pids", f"hpcdiff-{self.tag}-{node}"], timeout=30)
        return [int(p) for p in proc.stdout.split()]

    def fail_node(self, node: str) -> None:
        """Kill every process of ``node`` as a power loss would; Slurm marks it DOWN within SlurmdTimeout."""
        proc = run(["bash", FAIL_NODE, self.dir, node], timeout=60)
        if proc.returncode != 0:
            pytest.fail(f"fail-node.sh {node} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def node_state(self, node: str) -> str:
        return self._checked(["sinfo", "-h", "-n", node, "-p", "low", "-o", "%t"]).strip()

    def stop(self, timeout: float = 90) -> None:
        proc = run(["bash", STOP, self.dir], timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"slurm/local/stop.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def run(self, argv: Iterable[object], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (or anything else) against this cluster."""
        return run(list(argv), timeout=timeout, env=self.env)

    def _checked(self, argv: list[object], timeout: float = 60) -> str:
        proc = self.run(argv, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def sbatch(self, script: Path, *args: object) -> str:
        """Submit ``script`` with extra sbatch options; return the job id."""
        out = self._checked(["sbatch", "--parsable", *args, script])
        return out.strip().split(";")[0]

    def show_job(self, job_id: str) -> str:
        """The one-line ``scontrol show job -o`` record of a job."""
        return self._checked(["scontrol", "show", "job", "-o", job_id]).strip()

    def job_field(self, job_id: str, key: str) -> str:
        """One ``Key=value`` field of the job record (values without spaces only, such as JobState)."""
        match = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", self.show_job(job_id))
        if match is None:
            pytest.fail(f"no {key}= in the record of job {job_id}")
        return match.group(1)

    def job_state(self, job_id: str) -> str:
        return self.job_field(job_id, "JobState")

    def wait(self, job_id: str, states: Iterable[str] = FINAL_STATES, timeout: float = 120, poll: float = 0.2) -> str:
        """Poll until the job reaches one of ``states``; return it. Fails the test with the record past timeout."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            ended = state in FINAL_STATES
            if ended or time.monotonic() > deadline:
                why = f"ended {state}" if ended else f"still {state} after {timeout}s"
                pytest.fail(f"job {job_id} {why}, wanted {sorted(wanted)}:\n{self.show_job(job_id)}")
            time.sleep(poll)
