"""One of each: one checksum helper, one NIfTI writer, one mpirun command builder, one device picker, one demo
config. Each test uses the one helper, then searches the package for a second definition."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from hpcdiff.atomic import file_sha256
from hpcdiff.data.covariates import is_missing
from hpcdiff.dist import pick_device
from hpcdiff.launch.local import mpirun_command
from hpcdiff.nifti import XFORM_CODE, write_nifti

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hpcdiff"


def _where(pattern: str) -> list[str]:
    """Package files (relative) whose text matches ``pattern``."""
    rx = re.compile(pattern)
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*")
        if p.suffix in (".py", ".sh") and rx.search(p.read_text(encoding="utf-8"))
    )


def test_one_checksum_helper(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert _where(r"def \w*sha256\w*\(path") == ["hpcdiff/atomic.py"]
    assert _where(r"hashlib\.sha256\(\)") == ["hpcdiff/atomic.py", "hpcdiff/checkpoint.py"]  # + tensor digests


def test_one_nifti_writer_sets_qform_and_sform_alike_and_writes_equal_bytes(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -20, -5]
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    write_nifti(tmp_path / "a.nii.gz", data, affine)
    write_nifti(tmp_path / "b.nii.gz", data, affine)
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.nii.gz").read_bytes())[:4] == (348).to_bytes(4, "little")
    img = nib.load(tmp_path / "a.nii.gz")
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == XFORM_CODE == 1
    np.testing.assert_allclose(img.header.get_qform(), affine)
    np.testing.assert_allclose(img.header.get_sform(), affine)
    np.testing.assert_array_equal(img.get_fdata(), data)
    assert _where(r"set_[qs]form\(|nib\.save\(|\.to_bytes\(\)") == ["hpcdiff/nifti.py"]


def test_one_mpirun_command_builder():
    argv = mpirun_command(3, ["python", "-m", "hpcdiff", "train"])
    assert argv[1:] == ["-n", "3", "--oversubscribe", "--bind-to", "none", "python", "-m", "hpcdiff", "train"]
    assert _where(r"--bind-to") == ["hpcdiff/launch/local.py"]


def test_one_device_picker():
    assert str(pick_device(0)) in ("cpu", "cuda:0")
    assert _where(r"torch\.device\(\"cuda\"") == ["hpcdiff/dist.py"]


def test_the_demo_config_lives_in_one_place():
    jobs_demo = ROOT / "jobs" / "demo.yaml"
    assert jobs_demo.is_symlink() and jobs_demo.resolve() == PACKAGE / "resources" / "demo.yaml"
    assert len([p for p in ROOT.rglob("demo.yaml") if ".venv" not in p.parts and not p.is_symlink()]) == 1


def test_one_definition_of_a_missing_value():
    assert is_missing("n/a") and is_missing(" NA ") and is_missing("") and not is_missing("0")
    # The spelled-out missing markers live in one module; the rest of the package asks it.
    assert _where(r"[\"']n/a[\"']") == ["hpcdiff/data/covariates.py"]
    assert _where(r"[\"']nan[\"']\s*[\],}]") == ["hpcdiff/data/covariates.py"]
