"""The same cluster on AWS Parallel Computing Service (PCS): a CloudFormation template from the same options.

PCS runs the Slurm controller in AWS's account: there is no head node and no YAML of its own, only resources to
declare. The template mirrors the ParallelCluster config of :mod:`hpcdiff.launch.aws.cluster`: a static ``login`` node
group (where users log in and where hpcdiff is installed into the shared venv, the head node's job), node groups
``cpu`` (on-demand), ``gpu-spot`` and ``gpu-ondemand`` that scale from zero, one queue each (``cpu``, ``gpu``,
``gpu-ondemand``: submit with ``--partition gpu,gpu-ondemand`` as on ParallelCluster), and FSx for Lustre with a
data repository association to the bucket at /fsx/s3, retained when the stack is deleted. Every node mounts FSx
and runs the same bootstrap script, itself pinned by its sha256, which installs hpcdiff from the staged wheel.

The template is a pure function of the options; the tests check it offline with cfn-lint.
"""

from __future__ import annotations

import hashlib
import shlex
from typing import Any

import yaml

from hpcdiff.errors import UsageError
from hpcdiff.launch.aws.cluster import DATA_DIR, MOUNT_DIR, AwsClusterOptions, bootstrap_script

SLURM_VERSION = "24.11"
"""A Slurm version PCS offers; its node AMIs must match it."""

_BOUNDARY = "==HPCDIFF-BOUNDARY=="


def _size(opts: AwsClusterOptions) -> str:
    """PCS controller size by the most instances the cluster can run (SMALL <= 32, MEDIUM <= 512)."""
    most = 1 + opts.max_cpu_nodes + 2 * opts.max_gpu_nodes
    return "SMALL" if most <= 32 else "MEDIUM" if most <= 512 else "LARGE"


def _user_data(opts: AwsClusterOptions, node_type: str) -> dict[str, Any]:
    """Launch-template user data (MIME multi-part, as PCS requires): mount FSx, then run the pinned bootstrap."""
    script_sha = hashlib.sha256(bootstrap_script().encode()).hexdigest()
    args = shlex.join(opts.bootstrap_args())
    script = "\n".join(
        [
            "#!/bin/bash",
            "set -euo pipefail",
            "command -v mount.lustre >/dev/null || dnf install -y -q lustre-client",
            f"mkdir -p {MOUNT_DIR}",
            # ${...} here are CloudFormation's (Fn::Sub): the file system's address and mount name.
            "mount -t lustre -o relatime,flock ${FileSystem.DNSName}@tcp:/${FileSystem.LustreMountName} " + MOUNT_DIR,
            f"aws s3 cp --only-show-errors {opts.bootstrap_url} /root/hpcdiff-bootstrap.sh",
            f'echo "{script_sha}  /root/hpcdiff-bootstrap.sh" | sha256sum -c -',
            f"HPCDIFF_NODE_TYPE={node_type} bash /root/hpcdiff-bootstrap.sh {args}",
        ]
    )
    mime = (
        f'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="{_BOUNDARY}"\n\n--{_BOUNDARY}\n'
        f'Content-Type: text/x-shellscript; charset="us-ascii"\n\n{script}\n\n--{_BOUNDARY}--\n'
    )
    return {"Fn::Base64": {"Fn::Sub": mime}}


def _launch_template(opts: AwsClusterOptions, node_type: str, login: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "SecurityGroupIds": [{"Ref": "NodeSecurityGroup"}],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "UserData": _user_data(opts, node_type),
    }
    if login and opts.key_name:
        data["KeyName"] = opts.key_name
    return {"Type": "AWS::EC2::LaunchTemplate", "Properties": {"LaunchTemplateData": data}}


def _node_group(opts: AwsClusterOptions, name: str, template: str, instance: str, lo: int, hi: int, buy: str):
    return {
        "Type": "AWS::PCS::ComputeNodeGroup",
        "Properties": {
            "Name": name,
            "ClusterId": {"Fn::GetAtt": ["Cluster", "Id"]},
            "AmiId": {"Ref": "NodeAmiId"},
            "CustomLaunchTemplate": {
                "TemplateId": {"Ref": template},
                "Version": {"Fn::GetAtt": [template, "LatestVersionNumber"]},
            },
            "IamInstanceProfileArn": {"Fn::GetAtt": ["NodeInstanceProfile", "Arn"]},
            "InstanceConfigs": [{"InstanceType": instance}],
            "ScalingConfiguration": {"MinInstanceCount": lo, "MaxInstanceCount": hi},
            "PurchaseOption": buy,
            "SubnetIds": [opts.subnet],
        },
    }


def _queue(name: str, group: str) -> dict[str, Any]:
    return {
        "Type": "AWS::PCS::Queue",
        "Properties": {
            "Name": name,
            "ClusterId": {"Fn::GetAtt": ["Cluster", "Id"]},
            "ComputeNodeGroupConfigurations": [{"ComputeNodeGroupId": {"Fn::GetAtt": [group, "Id"]}}],
        },
    }


def _node_role(opts: AwsClusterOptions) -> dict[str, Any]:
    bucket_arn = {"Fn::Sub": f"arn:${{AWS::Partition}}:s3:::{opts.bucket}"}
    objects_arn = {"Fn::Sub": f"arn:${{AWS::Partition}}:s3:::{opts.bucket}/*"}
    return {
        "Type": "AWS::IAM::Role",
        "Properties": {
            "Path": "/aws-pcs/",  # PCS takes instance profiles under /aws-pcs/ (or named AWSPCS...)
            "AssumeRolePolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
                ],
            },
            "ManagedPolicyArns": [{"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"}],
            "Policies": [
                {
                    "PolicyName": "hpcdiff-pcs-node",
                    "PolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [
                            {"Effect": "Allow", "Action": "pcs:RegisterComputeNodeGroupInstance", "Resource": "*"},
                            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket_arn},
                            {
                                "Effect": "Allow",
                                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                                "Resource": objects_arn,
                            },
                        ],
                    },
                }
            ],
        },
    }


def _file_system(opts: AwsClusterOptions) -> dict[str, Any]:
    return {
        "Type": "AWS::FSx::FileSystem",
        # Runs and checkpoints must outlive the cluster: the file system stays when the stack is deleted.
        "DeletionPolicy": "Retain",
        "UpdateReplacePolicy": "Retain",
        "Properties": {
            "FileSystemType": "LUSTRE",
            "FileSystemTypeVersion": "2.15",
            "StorageCapacity": opts.fsx_storage_gib,
            "SubnetIds": [opts.subnet],
            "SecurityGroupIds": [{"Ref": "NodeSecurityGroup"}],
            "LustreConfiguration": {
                "DeploymentType": "PERSISTENT_2",
                "PerUnitStorageThroughput": opts.fsx_throughput,
                "DataCompressionType": "LZ4",
            },
        },
    }


def _data_repository(opts: AwsClusterOptions) -> dict[str, Any]:
    events = ["NEW", "CHANGED", "DELETED"]
    return {
        "Type": "AWS::FSx::DataRepositoryAssociation",
        "DeletionPolicy": "Retain",
        "UpdateReplacePolicy": "Retain",
        "Properties": {
            "FileSystemId": {"Ref": "FileSystem"},
            "FileSystemPath": DATA_DIR.removeprefix(MOUNT_DIR),
            "DataRepositoryPath": f"s3://{opts.bucket}",
            "BatchImportMetaDataOnCreate": True,
            "S3": {"AutoImportPolicy": {"Events": events}, "AutoExportPolicy": {"Events": events}},
        },
    }


def render_pcs_template(opts: AwsClusterOptions, cluster_name: str) -> dict[str, Any]:
    """The CloudFormation template (a mapping ready for YAML or JSON) of the PCS cluster for ``opts``."""
    resources: dict[str, Any] = {
        "NodeSecurityGroup": {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {
                "GroupDescription": f"{cluster_name}: PCS controller, nodes and FSx for Lustre talk to each other",
                "VpcId": {"Ref": "VpcId"},
            },
        },
        "NodeSecurityGroupSelfIngress": {
            "Type": "AWS::EC2::SecurityGroupIngress",
            "Properties": {
                "GroupId": {"Ref": "NodeSecurityGroup"},
                "IpProtocol": "-1",
                "SourceSecurityGroupId": {"Ref": "NodeSecurityGroup"},
            },
        },
        "NodeRole": _node_role(opts),
        "NodeInstanceProfile": {
            "Type": "AWS::IAM::InstanceProfile",
            "Properties": {"Path": "/aws-pcs/", "Roles": [{"Ref": "NodeRole"}]},
        },
        "FileSystem": _file_system(opts),
        "BucketLink": _data_repository(opts),
        "Cluster": {
            "Type": "AWS::PCS::Cluster",
            "Properties": {
                "Name": cluster_name,
                "Size": _size(opts),
                "Scheduler": {"Type": "SLURM", "Version": SLURM_VERSION},
                "Networking": {"SubnetIds": [opts.subnet], "SecurityGroupIds": [{"Ref": "NodeSecurityGroup"}]},
                "SlurmConfiguration": {"ScaleDownIdleTimeInSeconds": 60 * opts.scaledown_idle_minutes},
            },
        },
        "LoginTemplate": _launch_template(opts, "HeadNode", login=True),
        "ComputeTemplate": _launch_template(opts, "ComputeFleet", login=False),
        "LoginGroup": _node_group(opts, "login", "LoginTemplate", opts.head_instance, 1, 1, "ONDEMAND"),
        "CpuGroup": _node_group(opts, "cpu", "ComputeTemplate", opts.cpu_instance, 0, opts.max_cpu_nodes, "ONDEMAND"),
        "GpuSpotGroup": _node_group(
            opts, "gpu-spot", "ComputeTemplate", opts.gpu_instance, 0, opts.max_gpu_nodes, "SPOT"
        ),
        "GpuOnDemandGroup": _node_group(
            opts, "gpu-ondemand", "ComputeTemplate", opts.gpu_instance, 0, opts.max_gpu_nodes, "ONDEMAND"
        ),
        "CpuQueue": _queue("cpu", "CpuGroup"),
        "GpuQueue": _queue("gpu", "GpuSpotGroup"),
        "GpuOnDemandQueue": _queue("gpu-ondemand", "GpuOnDemandGroup"),
    }
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"hpcdiff on AWS PCS: cluster {cluster_name}, FSx for Lustre linked to s3://{opts.bucket}",
        "Parameters": {
            "VpcId": {"Type": "AWS::EC2::VPC::Id", "Description": f"the VPC of subnet {opts.subnet}"},
            "NodeAmiId": {
                "Type": "AWS::EC2::Image::Id",
                "Description": f"an AMI for PCS nodes with Slurm {SLURM_VERSION} (an AWS PCS sample AMI, or your own)",
            },
        },
        "Resources": resources,
        "Outputs": {
            "ClusterId": {"Value": {"Fn::GetAtt": ["Cluster", "Id"]}},
            "LoginNodeGroupId": {"Value": {"Fn::GetAtt": ["LoginGroup", "Id"]}},
            "FileSystemId": {"Value": {"Ref": "FileSystem"}},
        },
    }


def pcs_commands(opts: AwsClusterOptions, stack: str, template: str) -> list[tuple[str, list[str]]]:
    """How to create, watch and delete the stack, as (what it does, argv); hpcdiff prints, never runs, them."""
    region = ["--region", opts.region]
    return [
        (
            "create the stack (VPC of the subnet and a PCS node AMI for your region)",
            [
                "aws",
                "cloudformation",
                "deploy",
                "--template-file",
                template,
                "--stack-name",
                stack,
                "--capabilities",
                "CAPABILITY_IAM",
                "--parameter-overrides",
                "VpcId=vpc-XXXXXXXX",
                "NodeAmiId=ami-XXXXXXXX",
                *region,
            ],
        ),
        ("watch it come up", ["aws", "cloudformation", "describe-stacks", "--stack-name", stack, *region]),
        (
            "find the login node (then: aws ssm start-session --target INSTANCE_ID)",
            [
                "aws",
                "ec2",
                "describe-instances",
                "--filters",
                "Name=tag:aws:pcs:compute-node-group-id,Values=LOGIN_GROUP_ID_FROM_STACK_OUTPUTS",
                *region,
            ],
        ),
        (
            "delete the stack (FSx is retained)",
            ["aws", "cloudformation", "delete-stack", "--stack-name", stack, *region],
        ),
    ]


class _NoAliases(yaml.SafeDumper):
    """CloudFormation rejects YAML anchors and aliases, which PyYAML writes for repeated objects."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def template_text(template: dict[str, Any]) -> str:
    """The template as the YAML CloudFormation reads (no aliases)."""
    return yaml.dump(template, Dumper=_NoAliases, sort_keys=False, default_flow_style=False)


def lint_template(text: str, region: str) -> list[str]:
    """cfn-lint's findings on a template, offline (its bundled resource schemas for ``region``); [] when clean.

    Raises:
        UsageError: cfn-lint is not installed.
    """
    try:
        from cfnlint.api import ManualArgs, lint
    except ImportError as e:
        raise UsageError("checking a PCS template needs cfn-lint: pip install cfn-lint") from e
    return [str(m) for m in lint(text, config=ManualArgs(regions=[region]))]
