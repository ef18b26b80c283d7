"""An academic-style Slurm cluster on AWS: a ParallelCluster v3 config rendered from a few typed options.

The config is a pure function of :class:`AwsClusterOptions`, so a test can load it into ParallelCluster's own schema
without an AWS account. Three queues look like a university cluster's partitions: ``cpu`` (on-demand), ``gpu``
(spot) and ``gpu-ondemand`` (the same GPUs on demand). ParallelCluster cannot fall back from spot to on-demand
inside one queue, so the fallback is a second queue and ``--partition gpu,gpu-ondemand`` lets Slurm take whichever
starts first. Storage is FSx for Lustre linked to the user's bucket, retained when the cluster is deleted.

hpcdiff itself reaches the cluster as a wheel built from the user's checkout (or given with ``--wheel``), staged to
their bucket and pinned by its sha256, with the dependencies pinned by the lock file for the node's Python: never
as a bare package name from a public index (the name ``hpcdiff`` is not ours on any index, and whoever registered
it would run code on every cluster made with such a default).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hpcdiff.errors import ConfigError, UsageError
from hpcdiff.launch.aws import pcluster_check

MOUNT_DIR = "/fsx"
DATA_DIR = f"{MOUNT_DIR}/s3"  # the bucket appears here (imported and exported automatically)
VENV_DIR = f"{MOUNT_DIR}/hpcdiff/venv"  # outside DATA_DIR: a venv must not be exported to S3
BOOTSTRAP_KEY = "hpcdiff/bootstrap.sh"
WHEEL_PREFIX = "hpcdiff/wheels/"
CONSTRAINTS_KEY = "hpcdiff/constraints.txt"
GPU_QUEUES = ("gpu", "gpu-ondemand")

# The interpreter each OS can install from its own packages (hpcdiff needs Python >= 3.10).
OS_PYTHON = {
    "alinux2023": "python3.11",
    "ubuntu2204": "python3.10",
    "ubuntu2404": "python3.12",
    "rhel9": "python3.11",
    "rocky9": "python3.11",
}
FSX_THROUGHPUTS = (125, 250, 500, 1000)  # MB/s/TiB offered by PERSISTENT_2

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
_SUBNET = re.compile(r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$")
_INSTANCE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_CLUSTER_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{0,59}$")
_ARM_FAMILY = re.compile(r"^[a-z]+\d+g")  # Graviton: c7g, m6gd, g5g, im4gn ...
_WHEEL = re.compile(r"^hpcdiff-[0-9][A-Za-z0-9_.+!]*-py3-none-any\.whl$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(kw_only=True)
class AwsClusterOptions:
    """What a user chooses for an hpcdiff cluster; everything else is a fixed, documented default."""

    region: str
    """AWS region, e.g. us-east-1."""
    subnet: str
    """Subnet (subnet-xxxxxxxx) for the head node and all queues; it needs a route to the internet or NAT."""
    bucket: str
    """S3 bucket holding data, runs and the bootstrap script; linked to FSx at /fsx/s3."""
    key_name: str | None = None
    """EC2 key pair for ``pcluster ssh``; without one, reach the head node through SSM Session Manager."""
    head_instance: str = "c6i.large"
    """Head node instance type (runs slurmctld and installs hpcdiff once)."""
    cpu_instance: str = "c6i.2xlarge"
    """Instance type of the on-demand ``cpu`` queue (ingest, sampling, statistics)."""
    gpu_instance: str = "g5.xlarge"
    """Instance type of the ``gpu`` (spot) and ``gpu-ondemand`` queues."""
    max_cpu_nodes: int = 4
    """Most nodes the ``cpu`` queue scales up to (it scales down to zero when idle)."""
    max_gpu_nodes: int = 2
    """Most nodes each GPU queue scales up to."""
    fsx_storage_gib: int = 1200
    """FSx for Lustre PERSISTENT_2 capacity: 1200 or a multiple of 2400 GiB."""
    fsx_throughput: int = 125
    """FSx PERSISTENT_2 throughput per TiB (MB/s): 125, 250, 500 or 1000."""
    os: str = "alinux2023"
    """Node operating system; one of OS_PYTHON."""
    wheel: str | None = None
    """File name of the hpcdiff wheel staged under s3://BUCKET/hpcdiff/wheels/ (see :func:`prepare_wheel`);
    required to render a config."""
    wheel_sha256: str | None = None
    """Its sha256: the bootstrap refuses a wheel with any other digest."""
    constraints_sha256: str | None = None
    """sha256 of the lock file staged at s3://BUCKET/hpcdiff/constraints.txt; None installs without one."""
    scaledown_idle_minutes: int = 10
    """Idle minutes before Slurm powers a dynamic node down (and its billing stops)."""

    def __post_init__(self) -> None:
        _check(_REGION.match(self.region), "region", self.region, "an AWS region such as us-east-1")
        _check(_SUBNET.match(self.subnet), "subnet", self.subnet, "a subnet id such as subnet-0123abcd")
        _check_bucket(self.bucket)
        if self.key_name is not None:
            _check(
                0 < len(self.key_name) <= 255 and self.key_name.isascii() and self.key_name.strip() == self.key_name,
                "key_name",
                self.key_name,
                "the name of an EC2 key pair (aws ec2 describe-key-pairs)",
            )
        for name in ("head_instance", "cpu_instance", "gpu_instance"):
            value = getattr(self, name)
            _check(_INSTANCE.match(value), name, value, "an EC2 instance type family.size such as g5.xlarge")
        arches = {name: _arch(getattr(self, name)) for name in ("head_instance", "cpu_instance", "gpu_instance")}
        if len(set(arches.values())) > 1:
            detail = ", ".join(f"{k}={getattr(self, k)} ({v})" for k, v in arches.items())
            raise ConfigError(f"head_instance, cpu_instance and gpu_instance must share one CPU architecture: {detail}")
        for name in ("max_cpu_nodes", "max_gpu_nodes", "scaledown_idle_minutes"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "a whole number >= 1")
        _check(
            isinstance(self.fsx_storage_gib, int)
            and self.fsx_storage_gib > 0
            and (self.fsx_storage_gib == 1200 or self.fsx_storage_gib % 2400 == 0),
            "fsx_storage_gib",
            self.fsx_storage_gib,
            "1200 or a multiple of 2400 (FSx for Lustre PERSISTENT_2 sizes)",
        )
        _check(self.fsx_throughput in FSX_THROUGHPUTS, "fsx_throughput", self.fsx_throughput, str(FSX_THROUGHPUTS))
        _check(self.os in OS_PYTHON, "os", self.os, f"one of {', '.join(OS_PYTHON)}")
        if self.wheel is not None:
            _check(_WHEEL.match(self.wheel), "wheel", self.wheel, "a wheel file name: hpcdiff-VERSION-py3-none-any.whl")
        _check((self.wheel is None) == (self.wheel_sha256 is None), "wheel_sha256", self.wheel_sha256, "with wheel")
        for name in ("wheel_sha256", "constraints_sha256"):
            value = getattr(self, name)
            if value is not None:
                _check(_SHA256.match(value), name, value, "a sha256 digest: 64 lowercase hex digits")

    @property
    def python(self) -> str:
        """The interpreter the bootstrap installs and builds the shared venv from."""
        return OS_PYTHON[self.os]

    @property
    def bootstrap_url(self) -> str:
        return f"s3://{self.bucket}/{BOOTSTRAP_KEY}"

    @property
    def wheel_url(self) -> str:
        return f"s3://{self.bucket}/{WHEEL_PREFIX}{self.wheel}"

    @property
    def constraints_url(self) -> str:
        return f"s3://{self.bucket}/{CONSTRAINTS_KEY}"

    def bootstrap_args(self) -> list[str]:
        """The bootstrap's arguments: venv, wheel URL and sha256, interpreter, then the lock file's URL and sha256."""
        if self.wheel is None or self.wheel_sha256 is None:
            raise ConfigError("wheel: no hpcdiff wheel chosen; the cluster installs hpcdiff only from a pinned wheel")
        args = [VENV_DIR, self.wheel_url, self.wheel_sha256, self.python]
        return args + ([self.constraints_url, self.constraints_sha256] if self.constraints_sha256 else [])


def _check(ok: object, field: str, value: object, expected: str) -> None:
    if not ok:
        flag = "--" + field.replace("_", "-")
        raise ConfigError(f"{field} ({flag}): {value!r} is not valid; expected {expected}")


def _check_bucket(bucket: str) -> None:
    rules = "3-63 lowercase letters, digits, dots or hyphens, starting and ending with a letter or digit"
    _check(bool(bucket), "bucket", bucket, f"an S3 bucket name ({rules}); create one with 'aws s3 mb s3://NAME'")
    bad = (
        not _BUCKET.match(bucket)
        or ".." in bucket
        or ".-" in bucket
        or "-." in bucket
        or _IPV4.match(bucket)
        or bucket.startswith(("xn--", "sthree-", "amzn-s3-demo-"))
        or bucket.endswith(("-s3alias", "--ol-s3", "--x-s3"))
    )
    _check(not bad, "bucket", bucket, f"an S3 bucket name ({rules}), not an IP address; no s3:// prefix")


def _arch(instance_type: str) -> str:
    return "arm64" if _ARM_FAMILY.match(instance_type.split(".", 1)[0]) else "x86_64"


def check_cluster_name(name: str) -> str:
    """Refuse a name ParallelCluster would refuse, before any file is written."""
    if not _CLUSTER_NAME.match(name):
        raise ConfigError(
            f"cluster name {name!r} is not valid: use letters, digits and hyphens, start with a letter, "
            "at most 60 characters"
        )
    return name


def render_cluster_config(opts: AwsClusterOptions) -> dict[str, Any]:
    """The ParallelCluster v3 cluster config (a mapping ready for YAML) for ``opts``."""
    s3_access = [{"BucketName": opts.bucket, "EnableWriteAccess": True}]
    bootstrap = {"Script": opts.bootstrap_url, "Args": opts.bootstrap_args()}
    head: dict[str, Any] = {
        "InstanceType": opts.head_instance,
        "Networking": {"SubnetId": opts.subnet},
        "Iam": {"S3Access": s3_access},
        "CustomActions": {"OnNodeConfigured": bootstrap},
    }
    if opts.key_name:
        head["Ssh"] = {"KeyName": opts.key_name}

    def queue(name: str, capacity: str, instance: str, max_nodes: int) -> dict[str, Any]:
        return {
            "Name": name,
            "CapacityType": capacity,
            "Networking": {"SubnetIds": [opts.subnet]},
            "ComputeResources": [{"Name": name, "InstanceType": instance, "MinCount": 0, "MaxCount": max_nodes}],
            "Iam": {"S3Access": s3_access},
            "CustomActions": {"OnNodeConfigured": bootstrap},
        }

    return {
        "Region": opts.region,
        "Image": {"Os": opts.os},
        "HeadNode": head,
        "Scheduling": {
            "Scheduler": "slurm",
            "SlurmSettings": {
                "ScaledownIdletime": opts.scaledown_idle_minutes,
                # Requeue is the default for batch jobs (so a job on a reclaimed spot node restarts), and a job
                # that exits 75 (hpcdiff's "checkpointed on a signal, requeue me") is requeued by Slurm itself,
                # even where the job script cannot reach scontrol.
                "CustomSlurmSettings": [{"JobRequeue": 1}, {"RequeueExit": 75}],
            },
            "SlurmQueues": [
                queue("cpu", "ONDEMAND", opts.cpu_instance, opts.max_cpu_nodes),
                queue("gpu", "SPOT", opts.gpu_instance, opts.max_gpu_nodes),
                queue("gpu-ondemand", "ONDEMAND", opts.gpu_instance, opts.max_gpu_nodes),
            ],
        },
        "SharedStorage": [
            {
                "MountDir": MOUNT_DIR,
                "Name": "hpcdiff-fsx",
                "StorageType": "FsxLustre",
                "FsxLustreSettings": {
                    "StorageCapacity": opts.fsx_storage_gib,
                    "DeploymentType": "PERSISTENT_2",
                    "PerUnitStorageThroughput": opts.fsx_throughput,
                    "DataCompressionType": "LZ4",
                    # ParallelCluster deletes a managed file system with the cluster by default; runs and
                    # checkpoints must outlive it.
                    "DeletionPolicy": "Retain",
                    "DataRepositoryAssociations": [
                        {
                            "Name": "hpcdiff-bucket",
                            "DataRepositoryPath": f"s3://{opts.bucket}",
                            "FileSystemPath": DATA_DIR.removeprefix(MOUNT_DIR),
                            "BatchImportMetaDataOnCreate": True,
                            "AutoImportPolicy": ["NEW", "CHANGED", "DELETED"],
                            "AutoExportPolicy": ["NEW", "CHANGED", "DELETED"],
                        }
                    ],
                },
            }
        ],
    }


def bootstrap_script() -> str:
    """The OnNodeConfigured script (installs hpcdiff on the shared FS; watches for spot interruption notices)."""
    return resources.files("hpcdiff.launch.aws").joinpath("bootstrap.sh").read_text()


PCLUSTER_VENV = Path(__file__).resolve().parents[3] / ".venv-pcluster"
"""Where ``scripts/setup.sh --aws`` (or ``--test``) puts ParallelCluster in a source checkout."""
_CHECK_TIMEOUT_S = 600  # a safety net: importing pcluster takes seconds, never minutes
_SEPARATE_VENV = (
    "install it in an environment of its own: 'scripts/setup.sh --aws' (makes .venv-pcluster), or "
    "'pipx install aws-parallelcluster==3.16.1' (puts pcluster on PATH), or set HPCDIFF_PCLUSTER_PYTHON to the "
    "python of a venv where it is installed; not into hpcdiff's own venv (it pins packaging~=25, nilearn needs >=26)"
)


def validate_with_schema(config: dict[str, Any], cluster_name: str) -> None:
    """Load ``config`` into ParallelCluster's own schema and run its offline validators; no AWS call is made.

    ParallelCluster is used in this process when importable, else through the interpreter of its own environment
    (see :func:`pcluster_python`), with the same checks and the same messages.

    Raises:
        UsageError: no ParallelCluster is found, or its interpreter fails.
        ConfigError: the schema or a validator refuses the config; the message lists every key and reason.
    """
    if pcluster_check.available() is None:
        errors = pcluster_check.check(config, cluster_name)
    else:
        errors = _check_in(pcluster_python(), config, cluster_name)
    if errors:
        raise ConfigError("ParallelCluster refuses the cluster config: " + "; ".join(errors))


def pcluster_python() -> str:
    """The interpreter that has aws-parallelcluster: ``$HPCDIFF_PCLUSTER_PYTHON``, else ``.venv-pcluster`` in the
    source checkout, else the one behind a ``pcluster`` command on PATH.

    Raises:
        UsageError: none of them is there.
    """
    named = os.environ.get("HPCDIFF_PCLUSTER_PYTHON")
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            raise UsageError(f"HPCDIFF_PCLUSTER_PYTHON={named!r} is not an executable file; point it at a python")
        return named
    venv_python = PCLUSTER_VENV / "bin" / "python"
    if venv_python.is_file():
        return str(venv_python)
    command = shutil.which("pcluster")
    python = _shebang_python(Path(command)) if command else None
    if python is None:
        raise UsageError(f"validating a cluster config needs AWS ParallelCluster, not found: {_SEPARATE_VENV}")
    return python


def _shebang_python(script: Path) -> str | None:
    """The interpreter a pip-installed console script runs: its ``#!`` line, or the line after pip's ``#!/bin/sh``
    trampoline (written when the path has spaces or is too long for ``#!``)."""
    with script.open("rb") as f:
        head = f.read(4096).decode(errors="replace").splitlines()
    if not head or not head[0].startswith("#!"):
        return None
    argv = shlex.split(head[0][2:])
    if argv == ["/bin/sh"] and len(head) > 1 and head[1].startswith("'''exec'"):
        argv = shlex.split(head[1])[1:]
    if argv and os.path.basename(argv[0]) == "env":
        names = [a for a in argv[1:] if not a.startswith("-")]
        argv = [shutil.which(names[0]) or names[0]] if names else []
    return argv[0] if argv and os.path.isabs(argv[0]) else None


def _check_in(python: str, config: dict[str, Any], cluster_name: str) -> list[str]:
    """Run pcluster_check.py under ``python``: JSON in, JSON out, an argument list and no shell."""
    request = json.dumps({"config": config, "cluster_name": cluster_name})
    argv = [python, str(Path(pcluster_check.__file__).resolve())]
    try:
        proc = subprocess.run(
            argv, input=request, capture_output=True, text=True, timeout=_CHECK_TIMEOUT_S, check=False
        )
        answer = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        raise UsageError(f"checking the cluster config with {python} failed: {e}") from e
    if answer is None:
        last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"checking the cluster config with {python} failed (exit {proc.returncode}): {last[0]}")
    if "missing" in answer:
        raise UsageError(f"{answer['missing']}; {_SEPARATE_VENV}")
    return answer["errors"]


def staging_commands(opts: AwsClusterOptions, out_dir: Path) -> list[tuple[str, list[str]]]:
    """Uploads of the wheel, the lock file and the bootstrap script to the bucket, as (what it does, argv)."""
    uploads = [
        ("upload the hpcdiff wheel", ["aws", "s3", "cp", str(out_dir / opts.wheel), opts.wheel_url]),
        ("upload the bootstrap script", ["aws", "s3", "cp", str(out_dir / "bootstrap.sh"), opts.bootstrap_url]),
    ]
    if opts.constraints_sha256:
        uploads.insert(
            1, ("upload the lock file", ["aws", "s3", "cp", str(out_dir / "constraints.txt"), opts.constraints_url])
        )
    return uploads


def cluster_commands(opts: AwsClusterOptions, cluster_name: str, out_dir: Path) -> list[tuple[str, list[str]]]:
    """The commands that bring the cluster up and down, as (what it does, argv); hpcdiff prints, never runs, them."""
    config = str(out_dir / "cluster.yaml")
    region = ["--region", opts.region]
    ssh = ["pcluster", "ssh", "--cluster-name", cluster_name, *region]
    if opts.key_name:
        ssh += ["-i", str(Path.home() / ".ssh" / f"{opts.key_name}.pem")]
    return [
        *staging_commands(opts, out_dir),
        (
            "create the cluster (about 20-30 minutes)",
            ["pcluster", "create-cluster", "--cluster-name", cluster_name, "--cluster-configuration", config, *region],
        ),
        ("watch it come up", ["pcluster", "describe-cluster", "--cluster-name", cluster_name, *region]),
        ("log in to the head node", ssh),
        (
            "delete the cluster (FSx is retained)",
            ["pcluster", "delete-cluster", "--cluster-name", cluster_name, *region],
        ),
    ]


def format_commands(commands: list[tuple[str, list[str]]]) -> str:
    """Shell-quoted, commented lines a user can paste."""
    return "\n".join(f"# {what}\n{shlex.join(argv)}" for what, argv in commands)


def source_checkout() -> Path | None:
    """The source checkout this hpcdiff runs from (an editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "setup.cfg").is_file() and (root / "pyproject.toml").is_file() else None


def prepare_wheel(out_dir: Path, wheel: Path | None = None, source: Path | None = None) -> Path:
    """Put the wheel to install on the cluster into ``out_dir``: ``wheel`` as given, or one built from ``source``
    (default: the checkout this hpcdiff runs from).

    Raises:
        UsageError: no wheel and no checkout to build one from, a build that fails, or a file that is no hpcdiff
            wheel.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        root = source or source_checkout()
        if root is None:
            raise UsageError(
                "hpcdiff is not running from a source checkout, so no wheel can be built here: build one in your "
                "checkout (pip wheel --no-deps -w dist .) and pass --wheel dist/hpcdiff-VERSION-py3-none-any.whl"
            )
        with tempfile.TemporaryDirectory() as tmp:
            argv = [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                tmp,
                str(root),
            ]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            built = sorted(Path(tmp).glob("hpcdiff-*.whl"))
            if proc.returncode != 0 or not built:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise UsageError(f"building the hpcdiff wheel from {root} failed: {last}; build one and pass --wheel")
            target = out_dir / built[0].name
            shutil.copyfile(built[0], target)
        return target
    wheel = Path(wheel)
    if not _WHEEL.match(wheel.name) or not zipfile.is_zipfile(wheel):
        raise UsageError(f"--wheel {wheel}: not an hpcdiff wheel file (hpcdiff-VERSION-py3-none-any.whl)")
    if "hpcdiff/__init__.py" not in zipfile.ZipFile(wheel).namelist():
        raise UsageError(f"--wheel {wheel}: the archive holds no hpcdiff package")
    target = out_dir / wheel.name
    if not target.exists() or not target.samefile(wheel):
        shutil.copyfile(wheel, target)
    return target


def lock_file(python: str) -> str | None:
    """The packaged constraints (lock) file for an interpreter such as python3.11, or None if there is none."""
    name = f"constraints-py{python.removeprefix('python')}.txt"
    path = resources.files("hpcdiff.resources").joinpath(name)
    return path.read_text() if path.is_file() else None


def refuse_overwrite(path: Path, force: bool) -> None:
    """An existing config (perhaps edited by hand) is kept unless ``force``: checked before anything is written."""
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"--out {path.parent} is a file, not a folder: give a folder for the cluster's files")
    if path.exists() and not force:
        raise UsageError(f"{path} exists (perhaps edited by hand); pass --force to overwrite it")


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_cluster_files(opts: AwsClusterOptions, out_dir: Path, constraints: str | None, config: bool = True) -> Path:
    """Write ``out_dir/bootstrap.sh``, the lock file as ``out_dir/constraints.txt`` and, with ``config``, the
    ParallelCluster config ``out_dir/cluster.yaml``; returns the script's path."""
    import yaml

    config_path, script_path = out_dir / "cluster.yaml", out_dir / "bootstrap.sh"
    out_dir.mkdir(parents=True, exist_ok=True)
    if config:
        header = (
            "# AWS ParallelCluster v3 config written by 'hpcdiff cluster aws init'.\n"
            "# Queues: cpu (on-demand), gpu (spot), gpu-ondemand; "
            f"the bucket s3://{opts.bucket} appears at {DATA_DIR}.\n"
            "# Submit GPU work with --partition gpu,gpu-ondemand to let Slurm take whichever starts first.\n"
        )
        body = yaml.safe_dump(render_cluster_config(opts), sort_keys=False, default_flow_style=False)
        write_text(config_path, header + body)
    write_text(script_path, bootstrap_script())
    if constraints is not None:
        write_text(out_dir / "constraints.txt", constraints)
    script_path.chmod(0o755)
    return script_path
