"""Installs: the wheel built from this checkout installs into a fresh venv and runs, and the lock file is usable.

Offline and fast: the wheel is built without build isolation (this venv's setuptools) and installed with
``--no-deps --no-index``; its dependencies come from this venv's site-packages, linked into the fresh venv by a
``.pth`` line (which adds the folder without running the editable-install hooks in it, so the wheel's copy of
hpcdiff is the one imported).
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, assert_ok, run

SETUPTOOLS_WARNINGS = re.compile(r"Package would be ignored|BuildBackendWarning|SetuptoolsDeprecationWarning")
_SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def copy_checkout(dest: Path) -> Path:
    """A copy of this checkout's sources: a build writes build/ and *.egg-info beside them."""
    shutil.copytree(ROOT, dest, ignore=_SKIP)
    return dest


def build_wheel(dest: Path) -> tuple[Path, str]:
    """Build hpcdiff's wheel from a copy of this checkout, verbosely: the log is searched for warnings."""
    src = copy_checkout(dest / "src")
    proc = run([PYTHON, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", dest, src], timeout=300)
    assert_ok(proc)
    (wheel,) = dest.glob("hpcdiff-*.whl")
    return wheel, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_builds_without_package_data_warnings_and_ships_its_data(wheel):
    import zipfile

    path, log = wheel
    warned = [line.strip() for line in log.splitlines() if SETUPTOOLS_WARNINGS.search(line)]
    assert not warned, warned
    names = set(zipfile.ZipFile(path).namelist())
    for data in ("launch/aws/bootstrap.sh", "launch/slurm/sbatch_runner.sh", "resources/demo.yaml", "py.typed"):
        assert f"hpcdiff/{data}" in names, f"{data} is missing from the wheel"
    version = "{}.{}".format(*sys.version_info[:2])
    assert f"hpcdiff/resources/constraints-py{version}.txt" in names


def test_wheel_installs_into_a_fresh_venv_and_doctor_runs(wheel, tmp_path):
    path, _ = wheel
    venv = tmp_path / "fresh venv"
    assert_ok(run([PYTHON, "-m", "venv", "--without-pip", venv]))
    (site,) = (venv / "lib").glob("python*/site-packages")
    # The tests put the checkout first on the path, and `python -c` puts the working directory there: the venv
    # must see neither.
    env, cwd = {"PYTHONPATH": ""}, tmp_path
    pip = [PYTHON, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", path]
    assert_ok(run(pip, env=env, cwd=cwd, timeout=300))
    # After the install: this venv's site-packages holds an editable hpcdiff that pip would take as installed.
    (site / "deps-of-the-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = run([venv / "bin" / "python", "-c", "import hpcdiff; print(hpcdiff.__file__)"], env=env, cwd=cwd)
    assert_ok(where)
    assert where.stdout.strip().startswith(str(site)), where.stdout
    doctor = run([venv / "bin" / "hpcdiff", "doctor"], env=env, cwd=cwd, timeout=180)
    assert_ok(doctor)
    assert "hpcdiff" in doctor.stdout


def test_constraints_pin_exact_versions_and_leave_torch_out():
    version = "{}.{}".format(*sys.version_info[:2])
    lock = ROOT / "hpcdiff" / "resources" / f"constraints-py{version}.txt"
    pins = [line for line in lock.read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+!\-]+", p) for p in pins), pins
    names = {p.split("==")[0].lower() for p in pins}
    assert {"numpy", "h5py", "mpi4py", "pyyaml", "matplotlib"} <= names
    assert not {n for n in names if n == "torch" or n.startswith(("nvidia-", "triton"))}
    assert "scripts/lock.sh" in lock.read_text().splitlines()[0]
