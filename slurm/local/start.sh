#!/usr/bin/env bash
# Start a real Slurm (munged, slurmctld, one slurmd per node) whose every file lives under DIR: config, state,
# spool, logs, pid files, its own munge key and socket, on free ports of its own. Nothing from /etc/slurm or
# the system munge socket is used, so it runs beside a real installation. Needs root (SlurmUser=root).
#
# Usage: slurm/local/start.sh DIR [--nodes N]     then: source DIR/env.sh; sbatch ...; slurm/local/stop.sh DIR
# --nodes 1 (the default): one node "localhost" on 127.0.0.1.
# --nodes N > 1: nodes node1..nodeN, each a slurmd in its own network, UTS and mount namespace (own hostname,
#   own address on a private bridge that only these namespaces and this host share, no route anywhere else, a
#   hosts file naming every node bind-mounted over /etc/hosts); the file system stays shared, as NFS is.
# Running it again while the daemons of DIR are alive only waits for the nodes to be idle (and restarts the
# slurmd of a failed node). Otherwise it first removes what a killed earlier start left behind.
# LOCAL_SLURM_CPUS=N declares N CPUs per node (default: what `slurmd -C` reports, at least 2; 4 with --nodes).
set -euo pipefail

usage() {
  echo "usage: $0 DIR [--nodes N]   (DIR: a folder for the config, state and logs of the local Slurm)" >&2
  exit 2
}
NODES=1
ARGS=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nodes)
      [ "$#" -ge 2 ] || usage
      NODES=$2
      shift 2
      ;;
    --nodes=*)
      NODES=${1#--nodes=}
      shift
      ;;
    *)
      ARGS+=("$1")
      shift
      ;;
  esac
done
if [ "${#ARGS[@]}" -ne 1 ] || [ -z "${ARGS[0]}" ]; then usage; fi
case "$NODES" in
  '' | *[!0-9]* | 0)
    echo "$0: --nodes takes a number >= 1, got '$NODES'" >&2
    exit 2
    ;;
esac
set -- "${ARGS[0]}"
if [ "$(id -u)" != 0 ]; then
  echo "$0: must run as root: the local Slurm runs with SlurmUser=root and its own munged" >&2
  exit 1
fi
NEEDED="munged mungekey slurmctld slurmd sinfo srun python3"
[ "$NODES" = 1 ] || NEEDED="$NEEDED ip nsenter unshare"
for cmd in $NEEDED; do
  if ! command -v "$cmd" >/dev/null; then
    echo "$0: '$cmd' not found: apt-get install -y --no-install-recommends" \
      "slurmctld slurmd slurm-client munge iproute2 util-linux" >&2
    exit 1
  fi
done

case "$1" in
  *'"'* | *$'\n'*)
    echo "$0: DIR may contain spaces but not double quotes or newlines (slurm.conf quotes paths with \"): $1" >&2
    exit 2
    ;;
esac
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
CONF="$DIR/slurm.conf"
MUNGE="$DIR/munge"
SOCKET="$MUNGE/munge.socket.2"
LOGS="$DIR/log"
RUN="$DIR/run"
HERE=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=slurm/local/nodes.sh
. "$HERE/nodes.sh"
TAG=$(cluster_tag "$DIR")
say() { printf '[local-slurm] %s\n' "$*"; }

alive() { # alive PIDFILE: the process recorded there is running
  [ -s "$1" ] && running "$(cat "$1")"
}

free_ports() { # two TCP ports the OS reports free on 127.0.0.1
  python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

node_lines() { # one line per node, sized as slurmd sees this machine, with at least LOCAL_SLURM_CPUS CPUs
  local detected cpus want mem k
  detected=$(slurmd -C | head -n 1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
  if [ "$NODES" -gt 1 ]; then
    # Every node shares this machine's cores: oversubscribed, so that tests get several ranks per node.
    want=${LOCAL_SLURM_CPUS:-4}
    for ((k = 1; k <= NODES; k++)); do
      echo "NodeName=node$k NodeHostname=node$k NodeAddr=$PREFIX.$k CPUs=$want Boards=1 SocketsPerBoard=1" \
        "CoresPerSocket=$want ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
    done
    return
  fi
  want=${LOCAL_SLURM_CPUS:-$((cpus < 2 ? 2 : cpus))}
  if [ "$want" = "$cpus" ]; then
    sed 's/^NodeName=[^ ]*/NodeName=localhost NodeAddr=127.0.0.1/; s/$/ State=UNKNOWN/' <<<"$detected"
  else
    # A declared size other than the real one: one socket of plain cores, accepted via config_overrides.
    echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$want Boards=1 SocketsPerBoard=1 CoresPerSocket=$want" \
      "ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
  fi
}

node_settings() { # the slurm.conf lines that differ between one node and several
  if [ "$NODES" = 1 ]; then
    cat <<EOF
SlurmctldHost=localhost(127.0.0.1)
SlurmdPidFile="$RUN/slurmd.pid"
SlurmdLogFile="$LOGS/slurmd.log"
SlurmdSpoolDir="$DIR/spool"
EOF
    return
  fi
  cat <<EOF
# slurmctld takes the name localhost on any host; the nodes reach it at the bridge address.
SlurmctldHost=localhost($PREFIX.254)
# One slurmd per node: %n is the node name.
SlurmdPidFile="$RUN/slurmd-%n.pid"
SlurmdLogFile="$LOGS/slurmd-%n.log"
SlurmdSpoolDir="$DIR/spool/%n"
# Node-local scratch: PMIx puts a folder per step there, named by job and step only, so nodes sharing /tmp
# would collide.
TmpFS="$DIR/tmp/%n"
# A node that stops answering is DOWN within seconds and its jobs are requeued (NODE_FAIL);
# ReturnToService=2 lets it back in as soon as its slurmd registers again.
SlurmdTimeout=5
EOF
}

write_config() {
  local ctld_port slurmd_port nodelist=localhost
  [ "$NODES" = 1 ] || nodelist="node[1-$NODES]"
  read -r ctld_port slurmd_port <<<"$(free_ports)"
  # Values are double-quoted so that DIR may contain spaces.
  cat >"$CONF" <<EOF
# Written by slurm/local/start.sh for a $NODES-node test cluster under this folder. Rewritten whenever its daemons start.
ClusterName=hpcdiff-local
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Own munge socket; cred_expire=5 lets a requeued job start again after ~5 s instead of 120 s.
AuthInfo="socket=$SOCKET,cred_expire=5"
StateSaveLocation="$DIR/state"
SlurmctldPidFile="$RUN/slurmctld.pid"
SlurmctldLogFile="$LOGS/slurmctld.log"
$(node_settings)
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no accounting database: what a container or a laptop offers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
# Fast scheduling: submit to done in well under a second.
SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0
# Finished jobs stay visible to scontrol/squeue for MinJobAge seconds (there is no sacct here).
MinJobAge=300
KillWait=5
JobRequeue=1
# Real preemption: a job in 'high' requeues jobs in 'low' (after USR1 with --signal=B:USR1@N, then TERM).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$(node_lines)
PartitionName=low Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=high Nodes=$nodelist Default=NO MaxTime=INFINITE State=UP PriorityTier=10
EOF
  # PMIx where this Slurm has the plugin (`srun --mpi=list` reads the config file only).
  if SLURM_CONF="$CONF" srun --mpi=list 2>&1 | grep -qw pmix; then
    sed -i 's/^MpiDefault=none$/MpiDefault=pmix/' "$CONF"
  fi
  printf 'export SLURM_CONF=%q\nexport LOCAL_SLURM_DIR=%q\n' "$CONF" "$DIR" >"$DIR/env.sh"
  printf 'NODES=%s\nPREFIX=%s\nTAG=%s\n' "$NODES" "$PREFIX" "$TAG" >"$DIR/nodes.env"
}

show_logs() {
  local f
  for f in "$LOGS/munged.log" "$LOGS/slurmctld.log" "$LOGS"/slurmd*.log; do
    [ -f "$f" ] && { echo "--- tail of $f"; tail -n 20 "$f"; }
  done >&2
}

any_alive() { # any daemon of DIR still running
  local f
  for f in "$RUN"/*.pid; do alive "$f" && return 0; done
  return 1
}

if alive "$RUN/slurmctld.pid" && [ -s "$DIR/nodes.env" ]; then
  # shellcheck source=/dev/null
  . "$DIR/nodes.env" # the running cluster's size wins over --nodes
  say "daemons of $DIR already running: keeping $CONF"
else
  if any_alive; then # a killed start or a crash left part of it: stop that first
    bash "$HERE/stop.sh" "$DIR"
  fi
  [ "$NODES" = 1 ] || cleanup_leftovers # the namespaces of this DIR, and of any cluster whose controller is gone
  mkdir -p "$MUNGE" "$LOGS" "$RUN" "$DIR/state" "$DIR/spool"
  chmod 0755 "$MUNGE" # munged refuses a socket directory others can write to, clients must reach it
  chmod 0700 "$DIR/state"
  PREFIX=127.0.0
  if [ "$NODES" -gt 1 ]; then
    PREFIX=$(free_subnet "$TAG")
    make_network "$TAG" "$PREFIX" "$NODES"
    write_hosts "$PREFIX" "$NODES"
  fi
  write_config
fi
export SLURM_CONF="$CONF"

if ! alive "$RUN/munged.pid"; then
  if [ ! -s "$MUNGE/munge.key" ]; then
    mungekey --create --keyfile="$MUNGE/munge.key"
  fi
  chmod 0600 "$MUNGE/munge.key"
  # --force: munged insists that every folder above its socket be searchable by all users, which a private
  # temporary folder (pytest's, mode 0700) is not; the clients of this cluster all run as root.
  munged --force --socket="$SOCKET" --key-file="$MUNGE/munge.key" --pid-file="$RUN/munged.pid" \
    --log-file="$LOGS/munged.log" --seed-file="$MUNGE/munged.seed" || { show_logs; exit 1; }
fi
if ! alive "$RUN/slurmctld.pid"; then
  slurmctld -f "$CONF" || { show_logs; exit 1; }
fi
if [ "$NODES" = 1 ]; then
  alive "$RUN/slurmd.pid" || slurmd -f "$CONF" -N localhost || { show_logs; exit 1; }
else
  for ((k = 1; k <= NODES; k++)); do
    alive "$RUN/slurmd-node$k.pid" && continue
    kill_namespace "$(ns_of "$TAG" "node$k")" # what is left of a failed node goes before it comes back
    start_node_slurmd "$TAG" "node$k" || { show_logs; exit 1; }
  done
fi

timeout=${LOCAL_SLURM_START_TIMEOUT:-30}
deadline=$((SECONDS + timeout))
usable() { [ -n "$states" ] && ! grep -qvE ' (idle|mix|alloc)$' <<<"$states"; }
states=""
while [ "$SECONDS" -lt "$deadline" ]; do
  # Every node usable; one that was down comes back through ReturnToService=2 once its slurmd registers.
  states=$(sinfo -h -N -p low -o '%N %t' 2>/dev/null | sort -u || true)
  usable && break
  sleep 0.2
done
if ! usable; then
  echo "$0: the nodes did not become idle within ${timeout}s (states: '${states:-no answer}')" >&2
  show_logs
  exit 1
fi
say "up: $(tr '\n' ' ' <<<"$states" | sed 's/ $//'); partitions: $(sinfo -h -o %P | tr '\n' ' ')"
say "use it with: source $(printf %q "$DIR/env.sh")"
