#!/usr/bin/env bash
# Stop the Slurm that slurm/local/start.sh started under DIR: cancel its jobs, then stop the slurmd of each node,
# slurmctld and munged by the PIDs recorded in DIR (never by name, so other Slurms on the machine are safe), and
# with --nodes N > 1 remove the nodes' namespaces, links and bridge (and any process still inside them).
# Usage: slurm/local/stop.sh DIR      Safe to run twice; DIR itself is kept (delete it to forget the jobs).
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 DIR   (the folder given to slurm/local/start.sh)" >&2
  exit 2
fi
if [ ! -d "$1" ]; then
  echo "[local-slurm] $1 does not exist: nothing to stop"
  exit 0
fi
DIR=$(cd "$1" && pwd)
RUN="$DIR/run"
export SLURM_CONF="$DIR/slurm.conf"
# shellcheck source=slurm/local/nodes.sh
. "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"
say() { printf '[local-slurm] %s\n' "$*"; }

pid_of() { # pid_of NAME: the recorded pid of a live daemon, or nothing
  local f="$RUN/$1.pid"
  if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then cat "$f"; fi
}

wait_gone() { # wait_gone PID SECONDS: true once PID has exited
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

# Jobs first: slurmstepd outlives slurmd, so a job left running would outlive the cluster.
slurmds=$(cd "$RUN" 2>/dev/null && ls slurmd*.pid 2>/dev/null | sed 's/\.pid$//' || true)
alive_slurmd=""
for name in $slurmds; do [ -z "$(pid_of "$name")" ] || alive_slurmd=1; done
if [ -n "$(pid_of slurmctld)" ] && [ -n "$alive_slurmd" ]; then
  jobs=$(squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
    # shellcheck disable=SC2086  # one job id per word
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do # KillWait (5 s) plus slack
      [ -z "$(squeue -h -t running,completing -o %A 2>/dev/null || true)" ] && break
      sleep 0.1
    done
  fi
fi

stop() { # stop NAME...: TERM the recorded daemons together, wait, KILL any left after 15 s
  local name pid pids=()
  for name in "$@"; do
    pid=$(pid_of "$name")
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$name:$pid")
  done
  for entry in ${pids[@]+"${pids[@]}"}; do
    name=${entry%%:*}
    pid=${entry#*:}
    if ! wait_gone "$pid" 15; then
      say "$name ($pid) ignored SIGTERM for 15 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || true
    fi
    say "stopped $name ($pid)"
    stopped=$((stopped + 1))
  done
}

stopped=0
# shellcheck disable=SC2086  # one daemon name per word
stop $slurmds slurmctld # each takes ~2 s to shut down: in parallel
stop munged             # last: the Slurm daemons authenticate through it until they are gone
rm -f "$RUN"/*.pid
if [ -n "$(ip netns list 2>/dev/null | grep "^hpcdiff-$(cluster_tag "$DIR")-" || true)" ]; then
  teardown_tag "$(cluster_tag "$DIR")" # whatever a killed job left running inside a node goes with it
  say "removed the nodes' namespaces and bridge"
fi
[ "$stopped" -gt 0 ] || say "no daemon of $DIR was running"
