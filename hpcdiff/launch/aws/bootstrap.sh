#!/bin/bash
# hpcdiff node bootstrap for AWS ParallelCluster (CustomActions/OnNodeConfigured) and AWS PCS (launch template user
# data); runs as root on every node.
#   $1  venv directory on the shared file system (FSx for Lustre)
#   $2  s3:// URL of the hpcdiff wheel staged by the user (built from their checkout by 'hpcdiff cluster aws init')
#   $3  sha256 of that wheel: any other content is refused, nothing is installed
#   $4  python interpreter to install from the OS packages (hpcdiff needs Python >= 3.10)
#   $5  s3:// URL of the lock (constraints) file for that interpreter, $6 its sha256 (both optional)
# Head node: installs hpcdiff into the shared venv, once, from the verified wheel (never by name from an index) with
# its dependencies pinned by the lock file; compute nodes use the venv read-only.
# HPCDIFF_BOOTSTRAP_ETC (default /etc) is where cfnconfig is read and profile.d written: set it to try the script
# off a cluster.
# Compute nodes: install the same interpreter (the venv links to it); spot nodes also start a watcher that turns
# EC2's two-minute interruption notice into SIGUSR1 for the batch shell of every job on the node. ParallelCluster
# itself does not forward the notice: without the watcher the job only sees the node vanish (NODE_FAIL).
set -euo pipefail
venv=$1
wheel_url=$2
wheel_sha256=$3
python=$4
constraints_url=${5:-}
constraints_sha256=${6:-}
etc=${HPCDIFF_BOOTSTRAP_ETC:-/etc}
log() { echo "[hpcdiff-bootstrap] $*"; }

# ParallelCluster's cfnconfig defines cfn_node_type (HeadNode or ComputeFleet); on AWS PCS, which has no such file,
# the launch template's user data sets HPCDIFF_NODE_TYPE instead.
if [ -n "${HPCDIFF_NODE_TYPE:-}" ]; then
  cfn_node_type=$HPCDIFF_NODE_TYPE
else
  # shellcheck disable=SC1091
  . "$etc/parallelcluster/cfnconfig"
fi

install_python() {
  if command -v "$python" >/dev/null; then return; fi
  log "installing $python"
  if command -v dnf >/dev/null; then
    dnf install -y -q "$python" "$python-pip"
  else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "$python" "$python-venv"
  fi
}

write_profile() {
  # HDF5's file locking fails on Lustre; the shared venv goes first on PATH for logins and batch jobs.
  mkdir -p "$etc/profile.d"
  cat >"$etc/profile.d/hpcdiff.sh" <<EOF
export PATH="$venv/bin:\$PATH"
export HDF5_USE_FILE_LOCKING=FALSE
EOF
}

# Download s3://... to a file and keep it only if its sha256 is the expected one.
fetch_verified() {
  local url=$1 expected=$2 dest=$3 actual
  aws s3 cp --only-show-errors "$url" "$dest.part"
  actual=$(sha256sum "$dest.part" | cut -d' ' -f1)
  if [ "$actual" != "$expected" ]; then
    rm -f "$dest.part"
    log "REFUSED $url: its sha256 is $actual, expected $expected. Nothing was installed; stage the file" \
      "'hpcdiff cluster aws init' wrote (or run init again) and recreate the cluster."
    exit 3
  fi
  mv "$dest.part" "$dest"
}

install_hpcdiff() {
  local downloads wheel constraints=()
  downloads="$(dirname "$venv")/downloads"
  mkdir -p "$downloads"
  wheel="$downloads/$(basename "$wheel_url")"
  fetch_verified "$wheel_url" "$wheel_sha256" "$wheel"
  if [ -n "$constraints_url" ]; then
    fetch_verified "$constraints_url" "$constraints_sha256" "$downloads/constraints.txt"
    constraints=(-c "$downloads/constraints.txt")
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  # A file path, not a name: pip takes hpcdiff from the verified wheel; the lock pins every dependency.
  "$venv/bin/python" -m pip install -q "${constraints[@]}" "$wheel"
  "$venv/bin/hpcdiff" doctor || log "hpcdiff doctor reported problems (see above)"
  chmod -R a+rX "$venv"
}

imds() {
  local token
  token=$(curl -sf -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" http://169.254.169.254/latest/api/token) || return 1
  curl -sf -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}

start_spot_watcher() {
  if [ "$(imds instance-life-cycle || true)" != "spot" ]; then return; fi
  cat >/usr/local/sbin/hpcdiff-spot-watcher <<'EOF'
#!/bin/bash
# Poll the instance metadata every 5 s (AWS's advice); on an interruption notice, send SIGUSR1 to the batch shell
# of each job running here, once. hpcdiff then checkpoints at the next step and exits 75 (Slurm requeues it).
export PATH=/opt/slurm/bin:$PATH
node=$(hostname -s)
while true; do
  token=$(curl -sf -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" http://169.254.169.254/latest/api/token)
  if curl -sf -H "X-aws-ec2-metadata-token: $token" \
    http://169.254.169.254/latest/meta-data/spot/instance-action >/dev/null; then
    for job in $(squeue -h -w "$node" -t RUNNING -o %A); do
      logger -t hpcdiff-spot "interruption notice: SIGUSR1 to job $job"
      scancel --batch --signal=USR1 "$job" || true
    done
    exit 0
  fi
  sleep 5
done
EOF
  chmod 755 /usr/local/sbin/hpcdiff-spot-watcher
  cat >/etc/systemd/system/hpcdiff-spot-watcher.service <<'EOF'
[Unit]
Description=hpcdiff: forward EC2 spot interruption notices to Slurm jobs as SIGUSR1
After=network-online.target slurmd.service

[Service]
ExecStart=/usr/local/sbin/hpcdiff-spot-watcher
Restart=no

[Install]
WantedBy=multi-user.target
EOF
  systemctl daemon-reload
  systemctl enable --now hpcdiff-spot-watcher.service
  log "spot interruption watcher started"
}

install_python
write_profile
case "${cfn_node_type:-}" in
HeadNode) install_hpcdiff ;;
ComputeFleet) start_spot_watcher ;;
*) log "unknown node type '${cfn_node_type:-}'"; exit 1 ;;
esac
log "done on ${cfn_node_type}"
