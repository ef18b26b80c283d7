"""Sub-commands about the machine and the cluster: doctor, and the AWS cluster set-up."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpcdiff.cli.common import Parser


# ---------------------------------------------------------------- doctor
def add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="what is available: MPI, Slurm, GPUs, HDF5 filters, versions")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(handler=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    from hpcdiff.doctor import diagnose, render

    report = diagnose()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


# ---------------------------------------------------------------- cluster aws
def add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="cluster set-up: AWS ParallelCluster config and S3 staging")
    providers = p.add_subparsers(dest="provider", metavar="PROVIDER", parser_class=Parser, required=True)
    aws = providers.add_parser("aws", help="a Slurm cluster on AWS (ParallelCluster v3) and S3 staging")
    actions = aws.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser, required=True)

    init = actions.add_parser(
        "init",
        help="write the cluster config (ParallelCluster cluster.yaml or AWS PCS pcs.yaml), the bootstrap script and "
        "the hpcdiff wheel; print the commands that stage them and bring the cluster up",
    )
    init.add_argument("--out", required=True, help="directory for the config, bootstrap.sh, wheel and lock file")
    init.add_argument(
        "--service",
        choices=("parallelcluster", "pcs"),
        default="parallelcluster",
        help="AWS ParallelCluster (a head node you run; default) or AWS PCS (managed Slurm, a CloudFormation stack)",
    )
    init.add_argument("--bucket", required=True, help="S3 bucket for data, runs and the bootstrap script")
    init.add_argument("--subnet", required=True, help="subnet id (subnet-...) with a route to the internet")
    init.add_argument("--region", help="AWS region (default: $AWS_REGION or $AWS_DEFAULT_REGION)")
    init.add_argument("--key-name", help="EC2 key pair for 'pcluster ssh'")
    init.add_argument("--name", default="hpcdiff", help="cluster name (default: hpcdiff)")
    for flag in ("head", "cpu", "gpu"):
        init.add_argument(f"--{flag}-instance", help=f"{flag} instance type (family.size)")
    init.add_argument("--max-cpu-nodes", type=int)
    init.add_argument("--max-gpu-nodes", type=int, help="per GPU queue (gpu and gpu-ondemand)")
    init.add_argument("--fsx-storage-gib", type=int, help="FSx capacity: 1200 or n*2400")
    init.add_argument("--fsx-throughput", type=int, help="FSx MB/s per TiB: 125, 250, 500 or 1000")
    init.add_argument("--os", help="alinux2023 (default), ubuntu2204, ubuntu2404, rhel9 or rocky9")
    init.add_argument(
        "--wheel",
        help="hpcdiff wheel to install on the cluster (default: built from the checkout hpcdiff runs from)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing cluster.yaml")
    init.set_defaults(handler=_run_cluster_aws_init)

    for name, src, dst, what in (
        ("stage", "dir", "s3_url", "upload a directory to s3://BUCKET/PREFIX (verified, resumable)"),
        ("fetch", "s3_url", "dir", "download s3://BUCKET/PREFIX into a directory (verified, resumable)"),
    ):
        q = actions.add_parser(name, help=what)
        q.add_argument(src, metavar=src.upper())
        q.add_argument(dst, metavar=dst.upper())
        q.add_argument("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
        q.add_argument("--part-mib", type=int, default=64, help="multipart threshold and part size, MiB (>= 5)")
        q.set_defaults(handler=_run_cluster_aws_transfer)


def _run_cluster_aws_init(args: argparse.Namespace) -> int:
    import dataclasses
    import hashlib
    import os

    from hpcdiff.atomic import file_sha256
    from hpcdiff.errors import UsageError
    from hpcdiff.launch.aws import cluster

    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise UsageError("no region: pass --region (e.g. --region us-east-1) or set AWS_DEFAULT_REGION")
    fields = ("key_name", "head_instance", "cpu_instance", "gpu_instance", "max_cpu_nodes", "max_gpu_nodes")
    fields += ("fsx_storage_gib", "fsx_throughput", "os")
    chosen = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    opts = cluster.AwsClusterOptions(region=region, subnet=args.subnet, bucket=args.bucket, **chosen)
    name = cluster.check_cluster_name(args.name)
    out = Path(args.out)
    cluster.refuse_overwrite(out / ("pcs.yaml" if args.service == "pcs" else "cluster.yaml"), args.force)
    wheel = cluster.prepare_wheel(out, Path(args.wheel) if args.wheel else None)
    lock = cluster.lock_file(opts.python)
    opts = dataclasses.replace(
        opts,
        wheel=wheel.name,
        wheel_sha256=file_sha256(wheel),
        constraints_sha256=hashlib.sha256(lock.encode()).hexdigest() if lock else None,
    )
    if args.service == "pcs":
        config_path, commands, checked = _pcs_files(opts, name, out)
    else:
        try:
            cluster.validate_with_schema(cluster.render_cluster_config(opts), name)
            checked = "checked offline against ParallelCluster's schema"
        except UsageError as e:
            checked = f"NOT checked offline ({e})"
        config_path = out / "cluster.yaml"
        commands = cluster.cluster_commands(opts, name, out)
    script_path = cluster.write_cluster_files(opts, out, lock, config=args.service == "parallelcluster")
    print(f"wrote {config_path} ({checked}), {script_path} and {wheel} (sha256 {opts.wheel_sha256})")
    if lock is None:
        print(f"# no lock file for {opts.python}: the cluster resolves hpcdiff's dependencies afresh")
    print()
    print(cluster.format_commands(commands))
    print(
        f"\n# then, on the head node: data and runs live under {cluster.DATA_DIR} (= s3://{opts.bucket}); GPU jobs:\n"
        f"hpcdiff submit CONFIG.yaml --run-dir {cluster.DATA_DIR}/runs/NAME --backend slurm --partition "
        + ",".join(cluster.GPU_QUEUES)
    )
    return 0


def _pcs_files(opts: object, name: str, out: Path) -> tuple[Path, list, str]:
    """Render, lint and write OUT/pcs.yaml; the commands to stage and deploy it; how it was checked."""
    from hpcdiff.errors import ConfigError, UsageError
    from hpcdiff.launch.aws import cluster, pcs

    text = pcs.template_text(pcs.render_pcs_template(opts, name))
    try:
        findings = pcs.lint_template(text, opts.region)
        checked = "checked offline with cfn-lint"
    except UsageError as e:
        findings, checked = [], f"NOT checked offline ({e})"
    if findings:
        raise ConfigError("cfn-lint refuses the PCS template: " + "; ".join(findings))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pcs.yaml"
    cluster.write_text(
        path, "# AWS PCS cluster written by 'hpcdiff cluster aws init --service pcs' (CloudFormation).\n" + text
    )
    return path, cluster.staging_commands(opts, out) + pcs.pcs_commands(opts, name, str(path)), checked


def _run_cluster_aws_transfer(args: argparse.Namespace) -> int:
    from hpcdiff.launch.aws import s3stage

    part = args.part_mib * s3stage.MiB
    sizes = {"endpoint_url": args.endpoint_url, "multipart_threshold": part, "multipart_chunksize": part}
    if args.action == "stage":
        report = s3stage.stage(args.dir, args.s3_url, **sizes)
    else:
        report = s3stage.fetch(args.s3_url, args.dir, **sizes)
    print(f"{args.action}: {report.summary()}")
    return 0
