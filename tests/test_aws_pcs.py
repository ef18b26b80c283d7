"""The AWS PCS CloudFormation template: clean under cfn-lint (offline, its bundled AWS resource schemas), built from
the same options as the ParallelCluster config, and written by ``hpcdiff cluster aws init --service pcs``.

No AWS account is used: nothing here deploys a stack.
"""

from __future__ import annotations

import hashlib

import pytest
import yaml

from hpcdiff.launch.aws import pcs as aws_pcs
from hpcdiff.launch.aws.cluster import bootstrap_script, render_cluster_config
from tests import harness
from tests.test_aws_config import OPTION_SETS, WHEEL_SHA, init_args, options, wheel  # noqa: F401  (fixture)

pytest.importorskip("cfnlint")


def _render(**changes: object) -> dict:
    return aws_pcs.render_pcs_template(options(**changes), "hpcdiff")


def _of_type(template: dict, kind: str) -> dict[str, dict]:
    return {k: r["Properties"] for k, r in template["Resources"].items() if r["Type"] == kind}


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_template_passes_cfn_lint(name):
    opts = options(**OPTION_SETS[name])
    text = aws_pcs.template_text(aws_pcs.render_pcs_template(opts, f"hpcdiff-{name}"))
    assert aws_pcs.lint_template(text, opts.region) == []


def test_cfn_lint_catches_a_broken_template():
    template = _render()
    template["Resources"]["GpuSpotGroup"]["Properties"]["PurchaseOption"] = "SPOTTY"
    template["Resources"]["CpuQueue"]["Properties"]["ComputeNodeGroupConfiguration"] = []
    findings = " ".join(aws_pcs.lint_template(aws_pcs.template_text(template), "us-east-1"))
    assert "SPOTTY" in findings and "ComputeNodeGroupConfiguration" in findings


def test_node_groups_and_queues_mirror_the_parallelcluster_queues():
    changes = {"gpu_instance": "g6.12xlarge", "max_gpu_nodes": 3, "cpu_instance": "m7i.8xlarge", "max_cpu_nodes": 5}
    template = _render(**changes)
    groups = {p["Name"]: p for p in _of_type(template, "AWS::PCS::ComputeNodeGroup").values()}
    seen = {
        n: (g["InstanceConfigs"][0]["InstanceType"], g["PurchaseOption"], g["ScalingConfiguration"])
        for n, g in groups.items()
    }
    assert seen == {
        "login": ("c6i.large", "ONDEMAND", {"MinInstanceCount": 1, "MaxInstanceCount": 1}),
        "cpu": ("m7i.8xlarge", "ONDEMAND", {"MinInstanceCount": 0, "MaxInstanceCount": 5}),
        "gpu-spot": ("g6.12xlarge", "SPOT", {"MinInstanceCount": 0, "MaxInstanceCount": 3}),
        "gpu-ondemand": ("g6.12xlarge", "ONDEMAND", {"MinInstanceCount": 0, "MaxInstanceCount": 3}),
    }
    queues = {q["Name"]: q["ComputeNodeGroupConfigurations"] for q in _of_type(template, "AWS::PCS::Queue").values()}
    pcluster = render_cluster_config(options(**changes))["Scheduling"]["SlurmQueues"]
    assert set(queues) == {q["Name"] for q in pcluster}, "the same partitions on both services"
    assert queues["gpu"] == [{"ComputeNodeGroupId": {"Fn::GetAtt": ["GpuSpotGroup", "Id"]}}]


def test_fsx_is_retained_and_linked_to_the_bucket():
    template = _render(bucket="my-lab-bucket", fsx_storage_gib=4800, fsx_throughput=250)
    fs = template["Resources"]["FileSystem"]
    assert (fs["DeletionPolicy"], fs["UpdateReplacePolicy"]) == ("Retain", "Retain")
    lustre = fs["Properties"]
    assert (lustre["StorageCapacity"], lustre["LustreConfiguration"]["PerUnitStorageThroughput"]) == (4800, 250)
    (dra,) = _of_type(template, "AWS::FSx::DataRepositoryAssociation").values()
    assert dra["DataRepositoryPath"] == "s3://my-lab-bucket" and dra["FileSystemPath"] == "/s3"
    assert dra["FileSystemId"] == {"Ref": "FileSystem"}


def test_every_node_mounts_fsx_and_runs_the_pinned_bootstrap():
    template = _render(bucket="my-lab-bucket")
    script_sha = hashlib.sha256(bootstrap_script().encode()).hexdigest()
    for name, node_type in (("LoginTemplate", "HeadNode"), ("ComputeTemplate", "ComputeFleet")):
        data = template["Resources"][name]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
        assert data.startswith("MIME-Version: 1.0") and "text/x-shellscript" in data
        assert "${FileSystem.DNSName}@tcp:/${FileSystem.LustreMountName} /fsx" in data
        assert f'echo "{script_sha}  /root/hpcdiff-bootstrap.sh" | sha256sum -c -' in data
        assert f"HPCDIFF_NODE_TYPE={node_type} bash /root/hpcdiff-bootstrap.sh" in data
        assert f"s3://my-lab-bucket/hpcdiff/wheels/hpcdiff-0.1.0-py3-none-any.whl {WHEEL_SHA}" in data
    (profile,) = _of_type(template, "AWS::IAM::InstanceProfile").values()
    assert profile["Path"] == "/aws-pcs/"


def test_cli_init_service_pcs_writes_the_template_and_prints_the_commands(tmp_path, wheel):  # noqa: F811
    out = tmp_path / "pcs cluster"
    proc = harness.hpcdiff(*init_args(out, "--region", "eu-west-1", "--service", "pcs", "--wheel", wheel))
    harness.assert_ok(proc)
    assert "checked offline with cfn-lint" in proc.stdout
    written = yaml.safe_load((out / "pcs.yaml").read_text())
    assert written["Resources"]["Cluster"]["Type"] == "AWS::PCS::Cluster"
    assert not (out / "cluster.yaml").exists()
    assert (out / "bootstrap.sh").read_text() == bootstrap_script()
    for command in ("aws s3 cp", "aws cloudformation deploy", "CAPABILITY_IAM", "aws cloudformation delete-stack"):
        assert command in proc.stdout
