"""Launchers: where and how hpcdiff jobs run (local mpirun, Slurm, AWS ParallelCluster with S3 staging)."""

from hpcdiff.launch.aws import AwsClusterOptions, render_cluster_config, validate_with_schema
from hpcdiff.launch.s3stage import TransferReport, fetch, stage

__all__ = [
    "AwsClusterOptions",
    "TransferReport",
    "fetch",
    "render_cluster_config",
    "stage",
    "validate_with_schema",
]
