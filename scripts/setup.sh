#!/usr/bin/env bash
# Set up everything hpcdiff needs, idempotently: system MPI (and, with --test, Slurm, munge, hdf5-tools, nifti-bin),
# a .venv with a CPU build of torch where no NVIDIA GPU is present, and the package itself.
# --test (and --aws) also build .venv-pcluster: the `pcluster` CLI in an environment of its own, because
# aws-parallelcluster pins packaging~=25 while nilearn 0.14 needs packaging>=26 (docs/aws.md).
# Usage: scripts/setup.sh [--test] [--aws]
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
want_pcluster=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 want_pcluster=1 ;;
    --aws) want_pcluster=1 ;;
    *) printf '[setup] unknown option %s; usage: scripts/setup.sh [--test] [--aws]\n' "$arg" >&2 && exit 2 ;;
  esac
done
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${HPCDIFF_TORCH_VERSION:-2.13.0}
say() { printf '[setup] %s\n' "$*"; }

# --- system packages -------------------------------------------------------------------------------
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin libopenmpi-dev)
if [ "$want_test" = 1 ]; then
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sbatch >/dev/null || need+=(slurm-client)
  command -v munged >/dev/null || need+=(munge)
  command -v h5dump >/dev/null || need+=(hdf5-tools)
  command -v nifti_tool >/dev/null || need+=(nifti-bin)
  command -v ip >/dev/null || need+=(iproute2) # the multi-node local Slurm (network namespaces)
  command -v strace >/dev/null || need+=(strace) # counts the files a process opens (scale and finisher tests)
fi
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    say "missing system packages: ${need[*]}"
    say "without root, load them as modules instead, e.g. 'module load openmpi' (and 'module load slurm'),"
    say "then run this again."
    exit 1
  fi
fi

# --- ParallelCluster's own environment (hpcdiff checks cluster configs against its schema there) ---
PCLUSTER_VENV=.venv-pcluster  # where hpcdiff looks for it (hpcdiff/launch/aws/cluster.py)
PCLUSTER_SPEC=aws-parallelcluster==3.16.1
if [ "$want_pcluster" = 1 ] && [ "$(cat "$PCLUSTER_VENV/.hpcdiff-setup" 2>/dev/null)" != "$PCLUSTER_SPEC" ]; then
  say "installing $PCLUSTER_SPEC into $PCLUSTER_VENV"
  [ -x "$PCLUSTER_VENV/bin/python" ] || "$PYTHON" -m venv "$PCLUSTER_VENV"
  "$PCLUSTER_VENV/bin/python" -m pip install -q --upgrade pip
  "$PCLUSTER_VENV/bin/python" -m pip install -q "$PCLUSTER_SPEC"
  echo "$PCLUSTER_SPEC" >"$PCLUSTER_VENV/.hpcdiff-setup"
fi

# --- virtual environment ---------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q)
stamp="$VENV/.hpcdiff-setup"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)-test$want_test"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# A CPU build of torch where there is no NVIDIA GPU: never pull the multi-GB CUDA wheels there.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: installing the CUDA build of torch"
    "${PIP[@]}" "torch>=2.3"
  else
    say "no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
    "${PIP[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null ||
      "${PIP[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
extras=""
[ "$want_test" = 1 ] && extras="[test]"
# The lock file of this Python pins every dependency (scripts/lock.sh refreshes it); torch was chosen above.
lock="hpcdiff/resources/constraints-py$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])').txt"
constraints=()
if [ -f "$lock" ]; then
  constraints=(-c "$lock")
else
  say "no lock file $lock for this Python: resolving dependencies afresh"
fi
say "installing hpcdiff$extras"
"${PIP[@]}" "${constraints[@]}" -e ".$extras"
echo "$want" >"$stamp"
say "done"
