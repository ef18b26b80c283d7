"""models/ is maths on tensors: it never imports distribution, MPI, HDF5, dask or launchers."""

import ast
import subprocess
import sys
from pathlib import Path

import hpcdiff.models

MODELS = Path(hpcdiff.models.__file__).parent
FORBIDDEN = ("torch.distributed", "mpi4py", "h5py", "dask", "hpcdiff.launch")


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module a file imports, relative imports resolved."""
    package = ["hpcdiff", "models"]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level else ""
            module = base.strip(".") if node.level else node.module
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_models_source_imports_nothing_forbidden():
    files = sorted(MODELS.glob("*.py"))
    assert len(files) >= 5
    bad = {str(f.name): [n for n in _imported_modules(f) if _forbidden(n)] for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_the_scan_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import torch.distributed as dist\nfrom ..launch import slurm\nfrom dask import array\n")
    assert [n for n in _imported_modules(sample) if _forbidden(n)] == [
        "torch.distributed",
        "hpcdiff.launch",
        "hpcdiff.launch.slurm",
        "dask",
        "dask.array",
    ]


def test_importing_models_loads_no_mpi_hdf5_dask_or_launchers():
    code = (
        "import sys, hpcdiff.models\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mpi4py', 'h5py', 'dask') "
        "or m.startswith('hpcdiff.launch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
