"""The cluster bootstrap, run for real off a cluster: it installs hpcdiff from the wheel staged to S3 (moto's server
on loopback, reached by the real AWS CLI), verified by sha256, and refuses a wheel whose sha256 differs.

Installs are offline (``PIP_NO_INDEX``/``PIP_NO_DEPS``, read by pip itself): the test is about where hpcdiff comes
from and whether its digest is checked, not about resolving its dependencies from an index.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from hpcdiff.launch.aws.cluster import AwsClusterOptions, bootstrap_script, lock_file, prepare_wheel
from tests import harness
from tests.test_install import copy_checkout
from tests.test_s3_stage import endpoint, fake_credentials  # noqa: F401  (fixtures)

boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel 'hpcdiff cluster aws init' builds from a checkout (a copy: the build writes into its source)."""
    tmp = tmp_path_factory.mktemp("bootstrap wheel")
    return prepare_wheel(tmp / "cluster", source=copy_checkout(tmp / "src"))


@pytest.fixture()
def staged(endpoint, wheel, tmp_path):  # noqa: F811
    """The wheel and the lock file in a fresh bucket, where 'hpcdiff cluster aws init' tells the user to put them."""
    harness.require("aws-cli", shutil.which("aws") is not None, "the bootstrap downloads with the AWS CLI")
    bucket = f"hpcdiff-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    lock = lock_file("python{}.{}".format(*sys.version_info[:2]))
    assert lock is not None
    opts = AwsClusterOptions(
        region="us-east-1",
        subnet="subnet-0123abcd",
        bucket=bucket,
        wheel=wheel.name,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        constraints_sha256=hashlib.sha256(lock.encode()).hexdigest(),
    )
    s3.upload_file(str(wheel), bucket, opts.wheel_url.removeprefix(f"s3://{bucket}/"))
    s3.put_object(Bucket=bucket, Key=opts.constraints_url.removeprefix(f"s3://{bucket}/"), Body=lock.encode())
    return opts, s3


def run_bootstrap(args: list[str], root: Path, endpoint: str) -> subprocess.CompletedProcess[str]:  # noqa: F811
    """bootstrap.sh as the head node runs it, with /etc moved under ``root``."""
    etc = root / "etc"
    (etc / "parallelcluster").mkdir(parents=True)
    (etc / "parallelcluster" / "cfnconfig").write_text("cfn_node_type=HeadNode\n")
    script = root / "bootstrap.sh"
    script.write_text(bootstrap_script())
    env = {
        "HPCDIFF_BOOTSTRAP_ETC": str(etc),
        "AWS_ENDPOINT_URL": endpoint,
        "PIP_NO_INDEX": "1",
        "PIP_NO_DEPS": "1",
        "PYTHONPATH": "",
    }
    return harness.run(["bash", script, *args], env=env, timeout=300)


def args_for(opts: AwsClusterOptions, venv: Path) -> list[str]:
    args = opts.bootstrap_args()
    args[0] = str(venv)  # the venv under the test's folder instead of /fsx
    args[3] = sys._base_executable  # an interpreter that is surely there
    return args


def test_bootstrap_installs_hpcdiff_from_the_staged_wheel(staged, endpoint, wheel, tmp_path):  # noqa: F811
    opts, _ = staged
    venv = tmp_path / "fsx" / "hpcdiff" / "venv"
    proc = run_bootstrap(args_for(opts, venv), tmp_path, endpoint)
    harness.assert_ok(proc)
    (site,) = (venv / "lib").glob("python*/site-packages")
    installed = (site / "hpcdiff" / "__init__.py").read_bytes()
    assert installed == zipfile.ZipFile(wheel).read("hpcdiff/__init__.py")
    (record,) = site.glob("hpcdiff-*.dist-info/RECORD")
    assert "hpcdiff/launch/aws/bootstrap.sh" in record.read_text()
    downloads = venv.parent / "downloads"
    assert (downloads / wheel.name).read_bytes() == wheel.read_bytes()
    assert (downloads / "constraints.txt").read_text() == lock_file("python{}.{}".format(*sys.version_info[:2]))
    assert f'export PATH="{venv}/bin:$PATH"' in (tmp_path / "etc" / "profile.d" / "hpcdiff.sh").read_text()


def test_bootstrap_refuses_a_wheel_whose_sha256_differs(staged, endpoint, wheel, tmp_path):  # noqa: F811
    opts, s3 = staged
    # Someone replaced the staged wheel (or the config pins another build): the bytes no longer match the pin.
    tampered = wheel.read_bytes() + b"\0"
    s3.put_object(Bucket=opts.bucket, Key=opts.wheel_url.removeprefix(f"s3://{opts.bucket}/"), Body=tampered)
    venv = tmp_path / "fsx" / "hpcdiff" / "venv"
    proc = run_bootstrap(args_for(opts, venv), tmp_path, endpoint)
    harness.assert_ok(proc, 3)
    assert "REFUSED" in proc.stdout and hashlib.sha256(tampered).hexdigest() in proc.stdout
    assert not venv.exists(), "nothing may be installed from a wheel that fails its check"
    assert not list((venv.parent / "downloads").iterdir())
