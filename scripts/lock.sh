#!/usr/bin/env bash
# Refresh the constraints (lock) file: the exact version of every dependency of hpcdiff, its test and aws extras
# included, resolved fresh in a throwaway venv for one Python. torch is left out (its CPU and CUDA builds differ:
# scripts/setup.sh and the AWS bootstrap pick the build), and so are the CUDA wheels it pulls.
# Used by scripts/setup.sh and by the AWS bootstrap (pip install -c FILE). Needs network access to PyPI.
# Usage: scripts/lock.sh            (PYTHON=python3.11 by default; writes hpcdiff/resources/constraints-pyX.Y.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=${HPCDIFF_TORCH_VERSION:-2.13.0}
version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
out=hpcdiff/resources/constraints-py$version.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
# The CPU build resolves torch's own dependencies without the multi-GB CUDA wheels.
"${pip[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null ||
  "${pip[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
"${pip[@]}" ".[test,aws]"
{
  echo "# Exact versions for Python $version, written by scripts/lock.sh on $(date -u +%Y-%m-%d); refresh: scripts/lock.sh"
  echo "# torch is pinned apart (CPU and CUDA builds differ): scripts/setup.sh and the AWS bootstrap choose it."
  "$tmp/venv/bin/python" -m pip freeze --exclude hpcdiff | grep -v -E '^(torch|triton|nvidia-|cuda-)' | LC_ALL=C sort -f
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "[lock] wrote $out ($(grep -c -v '^#' "$out") pins)"
