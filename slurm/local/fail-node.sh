#!/usr/bin/env bash
# Fail one node of a multi-node local Slurm the way a cluster loses one: SIGKILL its slurmd, the slurmstepd of
# its jobs and every task, that is every process in its network namespace. slurmctld marks it DOWN after
# SlurmdTimeout (5 s) and requeues its batch jobs that allow it (NODE_FAIL). Bring it back with start.sh DIR.
# Usage: slurm/local/fail-node.sh DIR NODE       (NODE: node1, node2, ...)
set -euo pipefail

if [ "$#" -ne 2 ]; then
  echo "usage: $0 DIR NODE   (the folder given to slurm/local/start.sh --nodes N, and a node such as node2)" >&2
  exit 2
fi
DIR=$(cd "$1" && pwd)
RUN="$DIR/run"
# shellcheck source=slurm/local/nodes.sh
. "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"
NS=$(ns_of "$(cluster_tag "$DIR")" "$2")
if ! ip netns list | grep -q "^$NS\b"; then
  echo "$0: no node '$2' in $DIR (its namespace $NS does not exist; nodes are node1..nodeN)" >&2
  exit 2
fi
kill_namespace "$NS"
rm -f "$RUN/slurmd-$2.pid"
echo "[local-slurm] $2 failed: every process in $NS killed"
