#!/bin/bash
# hpcdiff node bootstrap for AWS ParallelCluster (CustomActions/OnNodeConfigured); runs as root on every node.
#   $1  venv directory on the shared file system (FSx for Lustre)
#   $2  pip requirement for hpcdiff (a version, a git URL, or a wheel path under /fsx/s3/)
#   $3  python interpreter to install from the OS packages (hpcdiff needs Python >= 3.10)
# Head node: installs hpcdiff into the shared venv, once; compute nodes use it read-only.
# Compute nodes: install the same interpreter (the venv links to it); spot nodes also start a watcher that turns
# EC2's two-minute interruption notice into SIGUSR1 for the batch shell of every job on the node. ParallelCluster
# itself does not forward the notice: without the watcher the job only sees the node vanish (NODE_FAIL).
set -euo pipefail
venv=$1
spec=$2
python=$3
log() { echo "[hpcdiff-bootstrap] $*"; }

# shellcheck disable=SC1091
. /etc/parallelcluster/cfnconfig # defines cfn_node_type: HeadNode or ComputeFleet

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
  cat >/etc/profile.d/hpcdiff.sh <<EOF
export PATH="$venv/bin:\$PATH"
export HDF5_USE_FILE_LOCKING=FALSE
EOF
}

install_hpcdiff() {
  if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$spec"
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
