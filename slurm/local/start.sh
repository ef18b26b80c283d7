#!/usr/bin/env bash
# Start a real single-node Slurm (munged, slurmctld, slurmd) whose every file lives under DIR: config, state,
# spool, logs, pid files, its own munge key and socket, on free ports of its own. Nothing from /etc/slurm or
# the system munge socket is used, so it runs beside a real installation. Needs root (SlurmUser=root).
#
# Usage: slurm/local/start.sh DIR        then: source DIR/env.sh; sbatch ...; slurm/local/stop.sh DIR
# Running it again while the daemons of DIR are alive only waits for the node to be idle.
# LOCAL_SLURM_CPUS=N declares N CPUs on the node (default: what `slurmd -C` reports, at least 2).
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 DIR   (a folder for the config, state and logs of the local Slurm; created if absent)" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "$0: must run as root: the local Slurm runs with SlurmUser=root and its own munged" >&2
  exit 1
fi
for cmd in munged mungekey slurmctld slurmd sinfo srun python3; do
  if ! command -v "$cmd" >/dev/null; then
    echo "$0: '$cmd' not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
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
say() { printf '[local-slurm] %s\n' "$*"; }

alive() { # alive PIDFILE: the process recorded there is running
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
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

node_line() { # the node as slurmd sees it, renamed to localhost, with at least LOCAL_SLURM_CPUS CPUs
  local detected cpus want
  detected=$(slurmd -C | head -n 1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")
  want=${LOCAL_SLURM_CPUS:-$((cpus < 2 ? 2 : cpus))}
  if [ "$want" = "$cpus" ]; then
    sed 's/^NodeName=[^ ]*/NodeName=localhost NodeAddr=127.0.0.1/' <<<"$detected"
  else
    # A declared size other than the real one: one socket of plain cores, accepted via config_overrides.
    local mem
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
    echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$want Boards=1 SocketsPerBoard=1 CoresPerSocket=$want" \
      "ThreadsPerCore=1 RealMemory=$mem"
  fi
}

write_config() {
  local ctld_port slurmd_port
  read -r ctld_port slurmd_port <<<"$(free_ports)"
  # Values are double-quoted so that DIR may contain spaces.
  cat >"$CONF" <<EOF
# Written by slurm/local/start.sh for a single-node test cluster under this folder. Rewritten whenever its daemons start.
ClusterName=hpcdiff-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Own munge socket; cred_expire=5 lets a requeued job start again after ~5 s instead of 120 s.
AuthInfo="socket=$SOCKET,cred_expire=5"
StateSaveLocation="$DIR/state"
SlurmdSpoolDir="$DIR/spool"
SlurmctldPidFile="$RUN/slurmctld.pid"
SlurmdPidFile="$RUN/slurmd.pid"
SlurmctldLogFile="$LOGS/slurmctld.log"
SlurmdLogFile="$LOGS/slurmd.log"
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
$(node_line) State=UNKNOWN
PartitionName=low Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=high Nodes=localhost Default=NO MaxTime=INFINITE State=UP PriorityTier=10
EOF
  # PMIx where this Slurm has the plugin (`srun --mpi=list` reads the config file only).
  if SLURM_CONF="$CONF" srun --mpi=list 2>&1 | grep -qw pmix; then
    sed -i 's/^MpiDefault=none$/MpiDefault=pmix/' "$CONF"
  fi
  printf 'export SLURM_CONF=%q\nexport LOCAL_SLURM_DIR=%q\n' "$CONF" "$DIR" >"$DIR/env.sh"
}

show_logs() {
  local f
  for f in "$LOGS/munged.log" "$LOGS/slurmctld.log" "$LOGS/slurmd.log"; do
    [ -f "$f" ] && { echo "--- tail of $f"; tail -n 20 "$f"; }
  done >&2
}

if alive "$RUN/munged.pid" || alive "$RUN/slurmctld.pid" || alive "$RUN/slurmd.pid"; then
  say "daemons of $DIR already running: keeping $CONF"
else
  mkdir -p "$MUNGE" "$LOGS" "$RUN" "$DIR/state" "$DIR/spool"
  chmod 0755 "$MUNGE" # munged refuses a socket directory others can write to, clients must reach it
  chmod 0700 "$DIR/state"
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
if ! alive "$RUN/slurmd.pid"; then
  slurmd -f "$CONF" -N localhost || { show_logs; exit 1; }
fi

deadline=$((SECONDS + ${LOCAL_SLURM_START_TIMEOUT:-30}))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
  state=$(sinfo -h -n localhost -o %t 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle | mix | alloc) break ;;
  esac
  sleep 0.2
done
case "$state" in
  idle | mix | alloc) ;;
  *)
    echo "$0: the node did not become idle within ${LOCAL_SLURM_START_TIMEOUT:-30}s (state: '${state:-no answer}')" >&2
    show_logs
    exit 1
    ;;
esac
say "up: node localhost $state; partitions: $(sinfo -h -o %P | tr '\n' ' ')"
say "use it with: source $(printf %q "$DIR/env.sh")"
