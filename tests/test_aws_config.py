"""The ParallelCluster config hpcdiff writes: loaded by ParallelCluster's own schema, bad options refused.

No AWS account is used: the schema and the validators that need no AWS API run offline. aws-parallelcluster pins
``packaging~=25`` while nilearn needs ``>=26``, so it usually lives in its own venv (``.venv-pcluster``, made by
``scripts/setup.sh --test``) and hpcdiff runs it there; the schema tests run whenever it is importable here or found
there, skip otherwise, and fail instead when HPCDIFF_REQUIRE lists ``pcluster``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from hpcdiff.errors import ConfigError, UsageError
from hpcdiff.launch.aws import cluster as aws
from hpcdiff.launch.aws import pcluster_check
from hpcdiff.launch.aws.cluster import (
    DATA_DIR,
    AwsClusterOptions,
    bootstrap_script,
    render_cluster_config,
    validate_with_schema,
)
from tests import harness

WHEEL_SHA = "0123456789abcdef" * 4
BASE = {
    "region": "us-east-1",
    "subnet": "subnet-0123abcd",
    "bucket": "hpcdiff-test-data",
    "wheel": "hpcdiff-0.1.0-py3-none-any.whl",
    "wheel_sha256": WHEEL_SHA,
}

OPTION_SETS = {
    "defaults": {},
    "big-gpu-ubuntu": {
        "key_name": "lab key",
        "gpu_instance": "p4d.24xlarge",
        "cpu_instance": "m7i.8xlarge",
        "max_gpu_nodes": 8,
        "max_cpu_nodes": 16,
        "fsx_storage_gib": 4800,
        "fsx_throughput": 250,
        "os": "ubuntu2404",
        "constraints_sha256": "f" * 64,
    },
    "graviton": {"head_instance": "c7g.large", "cpu_instance": "c7g.4xlarge", "gpu_instance": "g5g.2xlarge"},
    "rocky-long-subnet": {"subnet": "subnet-0123456789abcdef0", "region": "eu-central-1", "os": "rocky9"},
}


def pcluster_missing() -> str | None:
    """None when validate_with_schema can reach ParallelCluster (here or in its own venv), else why not."""
    if pcluster_check.available() is None:
        return None
    try:
        aws.pcluster_python()
    except UsageError as e:
        return str(e)
    return None


@pytest.fixture()
def pcluster() -> None:
    missing = pcluster_missing()
    harness.require("pcluster", missing is None, f"{missing} (scripts/setup.sh --test builds .venv-pcluster)")


@pytest.fixture()
def pcluster_python(pcluster) -> str:
    """The interpreter of ParallelCluster's own venv (request it before ``nothing_found``, which hides it)."""
    if pcluster_check.available() is None:
        pytest.skip("aws-parallelcluster is importable in this venv: the separate-interpreter path is not used")
    return aws.pcluster_python()


@pytest.fixture()
def nothing_found(monkeypatch, tmp_path) -> None:
    """No ParallelCluster anywhere: not importable, no HPCDIFF_PCLUSTER_PYTHON, no .venv-pcluster, none on PATH."""
    monkeypatch.setitem(sys.modules, "pcluster.schemas.cluster_schema", None)  # makes the import fail
    monkeypatch.delenv("HPCDIFF_PCLUSTER_PYTHON", raising=False)
    monkeypatch.setattr(aws, "PCLUSTER_VENV", tmp_path / "no-venv")
    monkeypatch.setenv("PATH", str(tmp_path))


def options(**changes: object) -> AwsClusterOptions:
    return AwsClusterOptions(**{**BASE, **changes})


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_generated_config_loads_in_parallelcluster_schema(pcluster, name, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    config = render_cluster_config(options(**OPTION_SETS[name]))
    validate_with_schema(config, f"hpcdiff-{name}")
    # The region is set for the schema only while it runs.
    assert "AWS_DEFAULT_REGION" not in os.environ


def test_schema_errors_name_every_bad_key(pcluster):
    config = render_cluster_config(options())
    config["Scheduling"]["SlurmQueues"][1]["CapacityType"] = "SPOTTY"
    config["HeadNode"]["InstanceTyp"] = "c6i.large"
    with pytest.raises(ConfigError) as e:
        validate_with_schema(config, "hpcdiff")
    assert "Scheduling.SlurmQueues[1].CapacityType" in str(e.value)
    assert "HeadNode.InstanceTyp" in str(e.value)


def test_offline_validators_refuse_denied_slurm_setting_and_fsx_size(pcluster):
    config = render_cluster_config(options())
    config["Scheduling"]["SlurmSettings"]["CustomSlurmSettings"].append({"SlurmctldParameters": "x"})
    config["SharedStorage"][0]["FsxLustreSettings"]["StorageCapacity"] = 1300
    with pytest.raises(ConfigError) as e:
        validate_with_schema(config, "hpcdiff")
    assert "SlurmctldParameters" in str(e.value)
    assert "2,400" in str(e.value)


def test_offline_validators_refuse_bad_cluster_name(pcluster):
    with pytest.raises(ConfigError, match="cluster name"):
        validate_with_schema(render_cluster_config(options()), "9-starts-with-a-digit")


def test_missing_parallelcluster_is_a_usage_error_with_the_fix(nothing_found):
    with pytest.raises(UsageError, match=r"not found: .*scripts/setup.sh --aws.*pipx install aws-parallelcluster"):
        validate_with_schema(render_cluster_config(options()), "hpcdiff")


# A pcluster console script as pip writes it: a plain #!, #!/usr/bin/env, or the /bin/sh trampoline pip uses when
# the interpreter's path has spaces or is too long for #!.
SHEBANGS = {
    "plain": "#!{python}\n",
    "env": "#!/usr/bin/env python\n",
    "sh-trampoline": "#!/bin/sh\n'''exec' {quoted} \"$0\" \"$@\"\n' '''\n",
}


@pytest.mark.parametrize("style", sorted(SHEBANGS))
def test_parallelcluster_is_found_behind_pcluster_on_path(pcluster_python, nothing_found, monkeypatch, tmp_path, style):
    bin_dir = tmp_path / "pipx bin"
    bin_dir.mkdir()
    script = bin_dir / "pcluster"
    script.write_text(SHEBANGS[style].format(python=pcluster_python, quoted=shlex.quote(pcluster_python)))
    script.chmod(0o755)
    # the venv's bin comes second, as a pipx venv's does: only `env` looks there
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.path.dirname(pcluster_python)]))
    assert os.path.samefile(aws.pcluster_python(), pcluster_python)
    config = render_cluster_config(options())
    validate_with_schema(config, "hpcdiff")
    config["HeadNode"]["InstanceTyp"] = "c6i.large"
    with pytest.raises(ConfigError, match=r"HeadNode\.InstanceTyp"):
        validate_with_schema(config, "hpcdiff")


def test_hpcdiff_pcluster_python_is_used_first(pcluster_python, nothing_found, monkeypatch):
    monkeypatch.setenv("HPCDIFF_PCLUSTER_PYTHON", pcluster_python)
    assert aws.pcluster_python() == pcluster_python
    with pytest.raises(ConfigError, match="cluster name"):
        validate_with_schema(render_cluster_config(options()), "9-starts-with-a-digit")


@pytest.mark.parametrize(
    ("python", "fragment"),
    [
        ("/nonexistent/python", "HPCDIFF_PCLUSTER_PYTHON='/nonexistent/python' is not an executable"),
        ("/bin/false", "failed (exit 1)"),
        pytest.param(
            sys.executable,
            "cannot import aws-parallelcluster",
            marks=pytest.mark.skipif(pcluster_check.available() is None, reason="this python has pcluster"),
        ),
    ],
)
def test_a_bad_pcluster_interpreter_is_a_usage_error(nothing_found, monkeypatch, python, fragment):
    monkeypatch.setenv("HPCDIFF_PCLUSTER_PYTHON", python)
    with pytest.raises(UsageError) as e:
        validate_with_schema(render_cluster_config(options()), "hpcdiff")
    assert fragment in str(e.value)


def test_gpu_queues_are_spot_with_an_on_demand_twin():
    config = render_cluster_config(options(gpu_instance="g6.12xlarge", max_gpu_nodes=3))
    queues = {q["Name"]: q for q in config["Scheduling"]["SlurmQueues"]}
    assert {n: q["CapacityType"] for n, q in queues.items()} == {
        "cpu": "ONDEMAND",
        "gpu": "SPOT",
        "gpu-ondemand": "ONDEMAND",
    }
    for name in ("gpu", "gpu-ondemand"):
        (resource,) = queues[name]["ComputeResources"]
        assert (resource["InstanceType"], resource["MinCount"], resource["MaxCount"]) == ("g6.12xlarge", 0, 3)


def test_fsx_is_retained_and_linked_to_the_bucket():
    (fsx,) = render_cluster_config(options(bucket="my-lab-bucket"))["SharedStorage"]
    settings = fsx["FsxLustreSettings"]
    assert fsx["StorageType"] == "FsxLustre"
    assert settings["DeletionPolicy"] == "Retain"
    (dra,) = settings["DataRepositoryAssociations"]
    assert dra["DataRepositoryPath"] == "s3://my-lab-bucket"
    assert fsx["MountDir"] + dra["FileSystemPath"] == DATA_DIR
    assert "NEW" in dra["AutoExportPolicy"] and "NEW" in dra["AutoImportPolicy"]


def test_every_node_runs_the_bootstrap_and_may_write_the_bucket():
    config = render_cluster_config(options(bucket="my-lab-bucket", constraints_sha256="e" * 64))
    nodes = [config["HeadNode"], *config["Scheduling"]["SlurmQueues"]]
    for node in nodes:
        action = node["CustomActions"]["OnNodeConfigured"]
        assert action["Script"] == "s3://my-lab-bucket/hpcdiff/bootstrap.sh"
        # hpcdiff comes from the staged wheel pinned by its digest, never from a package name on an index.
        assert action["Args"][1:] == [
            "s3://my-lab-bucket/hpcdiff/wheels/hpcdiff-0.1.0-py3-none-any.whl",
            WHEEL_SHA,
            "python3.11",
            "s3://my-lab-bucket/hpcdiff/constraints.txt",
            "e" * 64,
        ]
        assert node["Iam"]["S3Access"] == [{"BucketName": "my-lab-bucket", "EnableWriteAccess": True}]


def test_slurm_requeues_by_default_and_on_exit_75():
    settings = render_cluster_config(options())["Scheduling"]["SlurmSettings"]["CustomSlurmSettings"]
    merged = {k: v for item in settings for k, v in item.items()}
    assert merged["JobRequeue"] == 1
    assert merged["RequeueExit"] == 75


def test_ssh_section_only_with_a_key():
    assert render_cluster_config(options(key_name="me"))["HeadNode"]["Ssh"] == {"KeyName": "me"}
    assert "Ssh" not in render_cluster_config(options())["HeadNode"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu_instance", "g5xlarge"),
        ("gpu_instance", "G5.XLARGE"),
        ("cpu_instance", "c6i."),
        ("subnet", "sub-0123abcd"),
        ("subnet", "subnet-0123"),
        ("bucket", ""),
        ("bucket", "s3://my-bucket"),
        ("bucket", "My_Bucket"),
        ("bucket", "192.168.1.1"),
        ("bucket", "ab"),
        ("region", "us-east"),
        ("max_gpu_nodes", 0),
        ("fsx_storage_gib", 2000),
        ("fsx_throughput", 200),
        ("os", "alinux2"),
        ("wheel", "hpcdiff"),
        ("wheel", "hpcdiff-0.1.0.tar.gz"),
        ("wheel_sha256", "abc"),
        ("wheel_sha256", None),
        ("constraints_sha256", "F" * 64),
    ],
)
def test_bad_options_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        options(**{field: value})
    assert field in str(e.value)
    assert repr(value) in str(e.value)


def test_a_config_without_a_pinned_wheel_is_refused():
    with pytest.raises(ConfigError, match="wheel"):
        render_cluster_config(options(wheel=None, wheel_sha256=None))


def test_mixed_cpu_architectures_are_refused():
    with pytest.raises(ConfigError, match="architecture"):
        options(gpu_instance="g5g.xlarge")


def test_bootstrap_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n"], input=bootstrap_script(), text=True, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- CLI
@pytest.fixture()
def wheel(tmp_path_factory) -> Path:
    """A small stand-in for a built wheel: init only checks its name and contents, and pins its digest."""
    path = tmp_path_factory.mktemp("wheel") / "hpcdiff-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hpcdiff/__init__.py", '__version__ = "0.1.0"\n')
    return path


def init_args(out, *extra):
    return ("cluster", "aws", "init", "--out", out, "--bucket", "my-lab-bucket", "--subnet", "subnet-0123abcd", *extra)


def test_cli_init_writes_the_config_and_prints_the_commands(tmp_path, wheel):
    out = tmp_path / "my cluster 'a'"  # shell-unsafe characters must come out quoted
    flags = ("--region", "eu-west-1", "--gpu-instance", "g6.xlarge", "--name", "lab", "--wheel", wheel)
    proc = harness.hpcdiff(*init_args(out, *flags))
    harness.assert_ok(proc)
    written = yaml.safe_load((out / "cluster.yaml").read_text())
    lock = aws.lock_file("python3.11")
    expected = options(
        region="eu-west-1",
        bucket="my-lab-bucket",
        gpu_instance="g6.xlarge",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        constraints_sha256=hashlib.sha256(lock.encode()).hexdigest() if lock else None,
    )
    assert written == render_cluster_config(expected)
    assert (out / "bootstrap.sh").read_text() == bootstrap_script()
    assert os.access(out / "bootstrap.sh", os.X_OK)
    assert (out / wheel.name).read_bytes() == wheel.read_bytes()
    assert lock is None or (out / "constraints.txt").read_text() == lock
    for command in ("pcluster create-cluster", "pcluster ssh", "aws s3 cp", "pcluster delete-cluster"):
        assert command in proc.stdout
    assert "s3://my-lab-bucket/hpcdiff/wheels/hpcdiff-0.1.0-py3-none-any.whl" in proc.stdout
    assert "--partition gpu,gpu-ondemand" in proc.stdout
    assert shlex.quote(str(out / "cluster.yaml")) in proc.stdout
    if pcluster_missing() is None:
        assert "checked offline against ParallelCluster's schema" in proc.stdout


def test_cli_init_keeps_an_existing_config_without_force(tmp_path, wheel):
    harness.assert_ok(harness.hpcdiff(*init_args(tmp_path, "--region", "us-east-1", "--wheel", wheel)))
    (tmp_path / "cluster.yaml").write_text("# edited by hand\n")
    proc = harness.hpcdiff(*init_args(tmp_path, "--region", "us-east-1", "--wheel", wheel))
    harness.assert_ok(proc, 2)
    assert "--force" in proc.stderr
    assert (tmp_path / "cluster.yaml").read_text() == "# edited by hand\n"
    harness.assert_ok(harness.hpcdiff(*init_args(tmp_path, "--region", "us-east-1", "--wheel", wheel, "--force")))


def test_cli_init_refuses_a_file_that_is_no_hpcdiff_wheel(tmp_path):
    bogus = tmp_path / "hpcdiff-0.1.0-py3-none-any.whl"
    bogus.write_text("not a zip")
    proc = harness.hpcdiff(*init_args(tmp_path / "out", "--region", "us-east-1", "--wheel", bogus))
    harness.assert_ok(proc, 2)
    assert "not an hpcdiff wheel" in proc.stderr
    assert not (tmp_path / "out" / "cluster.yaml").exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ("cluster", "aws", "init", "--out", "{out}", "--subnet", "subnet-0123abcd", "--region", "us-east-1"),
            "--bucket",
        ),
        (("{init}", "--region", "us-east-1", "--gpu-instance", "g5xlarge"), "--gpu-instance"),
        (("{init}", "--region", "us-east-1", "--max-gpu-nodes", "0"), "--max-gpu-nodes"),
        (("{init}", "--region", "us-east-1", "--name", "bad_name"), "cluster name"),
        (("{init}",), "--region"),
    ],
)
def test_cli_init_bad_options_exit_2(tmp_path, argv, fragment):
    args = []
    for a in argv:
        args += init_args(tmp_path) if a == "{init}" else [a.replace("{out}", str(tmp_path))]
    env = {"AWS_DEFAULT_REGION": "", "AWS_REGION": ""}
    proc = harness.hpcdiff(*args, env=env)
    harness.assert_ok(proc, 2)
    assert fragment in proc.stderr
    assert not (tmp_path / "cluster.yaml").exists()
