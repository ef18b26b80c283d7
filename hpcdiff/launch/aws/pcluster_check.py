"""Check a cluster config with AWS ParallelCluster's own schema and offline validators; no AWS call is made.

aws-parallelcluster pins ``packaging~=25`` while nilearn (an hpcdiff dependency) needs ``>=26``, so it usually lives
in an environment of its own (as the ``pcluster`` CLI does anyway). This file therefore depends only on the standard
library and pcluster, and works both ways: imported by hpcdiff when pcluster is importable, or run as a script by
that other interpreter, with ``{"config": ..., "cluster_name": ...}`` as JSON on stdin and
``{"errors": [...]}`` (or ``{"missing": reason}``) as JSON on stdout. Keep it Python 3.9-compatible: it runs under
whatever interpreter pcluster was installed with.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any


def available() -> str | None:
    """None when pcluster can be imported here, else the reason it cannot."""
    try:
        import marshmallow  # noqa: F401
        import pcluster.schemas.cluster_schema  # noqa: F401
    except ImportError as e:
        return f"{sys.executable} cannot import aws-parallelcluster ({e})"
    return None


def check(config: dict[str, Any], cluster_name: str) -> list[str]:
    """Every reason ParallelCluster refuses ``config`` (schema errors first; validators only on a loadable config).

    Args:
        config: the cluster config as a mapping, as it would be read from cluster.yaml.
        cluster_name: the name ``pcluster create-cluster`` would be given.
    """
    from marshmallow import ValidationError
    from pcluster.schemas.cluster_schema import ClusterSchema

    region = config.get("Region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    with _region_env(region):
        try:
            cluster = ClusterSchema(cluster_name=cluster_name).load(config)
        except ValidationError as e:
            return _flatten(e.messages)
        return _offline_failures(cluster, cluster_name)


@contextlib.contextmanager
def _region_env(region: str) -> Iterator[None]:
    """ParallelCluster's schema reads the region from the environment; set it only while it runs."""
    saved = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = region
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = saved


def _flatten(messages: Any, path: str = "") -> list[str]:
    """marshmallow's nested error dict as 'A.B[0].C: reason' items."""
    if isinstance(messages, dict):
        items = []
        for key, value in messages.items():
            sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
            items += _flatten(value, sub)
        return items
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{path or 'config'}: {' '.join(messages)}"]
    if isinstance(messages, list):
        return [item for m in messages for item in _flatten(m, path)]
    return [f"{path or 'config'}: {messages}"]


def _offline_failures(cluster: Any, cluster_name: str) -> list[str]:
    """Run the ParallelCluster validators that need no AWS API (names, FSx sizes, Slurm settings)."""
    from pcluster.config.cluster_config import SharedFsxLustre
    from pcluster.validators.cluster_validators import ClusterNameValidator, NameValidator
    from pcluster.validators.common import FailureLevel
    from pcluster.validators.fsx_validators import (
        FsxDraValidator,
        FsxPersistentOptionsValidator,
        FsxStorageCapacityValidator,
    )
    from pcluster.validators.slurm_settings_validator import (
        SLURM_SETTINGS_DENY_LIST,
        CustomSlurmSettingLevel,
        CustomSlurmSettingsValidator,
    )

    results = ClusterNameValidator().execute(name=cluster_name, scheduling=cluster.scheduling)
    for q in cluster.scheduling.queues:
        results += NameValidator().execute(name=q.name)
        for cr in q.compute_resources:
            results += NameValidator().execute(name=cr.name)
    for fs in cluster.shared_storage or []:
        if not isinstance(fs, SharedFsxLustre):
            continue
        results += FsxStorageCapacityValidator().execute(
            storage_capacity=fs.storage_capacity,
            deployment_type=fs.deployment_type,
            fsx_storage_type=fs.fsx_storage_type,
            per_unit_storage_throughput=fs.per_unit_storage_throughput,
            file_system_id=fs.file_system_id,
            backup_id=fs.backup_id,
        )
        results += FsxPersistentOptionsValidator().execute(
            deployment_type=fs.deployment_type,
            kms_key_id=fs.kms_key_id,
            per_unit_storage_throughput=fs.per_unit_storage_throughput,
        )
        results += FsxDraValidator().execute(
            data_repository_associations=fs.data_repository_associations,
            import_path=fs.import_path,
            export_path=fs.export_path,
        )
    settings = cluster.scheduling.settings
    if settings and settings.custom_slurm_settings:
        results += CustomSlurmSettingsValidator().execute(
            custom_settings=settings.custom_slurm_settings,
            deny_list=SLURM_SETTINGS_DENY_LIST["SlurmConf"]["Global"],
            settings_level=CustomSlurmSettingLevel.SLURM_CONF,
        )
    return [r.message for r in results if r.level == FailureLevel.ERROR]


def main() -> None:
    """The script side: one request on stdin, one JSON answer on stdout."""
    request = json.load(sys.stdin)
    missing = available()
    answer = {"missing": missing} if missing else {"errors": check(request["config"], request["cluster_name"])}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    # Run as a script, Python puts this folder first on sys.path, where our modules (cluster.py, pcs.py) could
    # shadow top-level modules of pcluster's dependencies.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    main()
