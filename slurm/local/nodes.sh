# Sourced by start.sh, stop.sh and fail-node.sh: the network namespaces of a multi-node local Slurm.
#
# Every name carries a tag made from DIR, so two clusters never share a namespace or a link, and what a killed
# start left behind can be found again: namespaces hpcdiff-TAG-nodeK, bridge hdbTAG, host-side veth hdvTAG-K.
# The bridge subnet is 10.213.X.0/24 (X from the tag, moved on past any subnet the machine already uses); the
# host takes .254 and node K takes .K. No namespace has a default route, so traffic stays on the bridge.
# Callers set DIR and RUN; /run/hpcdiff-local-slurm/TAG records the DIR of each tag for later clean-ups.

REGISTRY=/run/hpcdiff-local-slurm

cluster_tag() { # cluster_tag DIR: 6 hex digits naming DIR's namespaces and links
  printf '%s' "$1" | sha256sum | cut -c1-6
}

ns_of() { # ns_of TAG NODE: the network namespace of a node
  echo "hpcdiff-$1-$2"
}

ns_pids() { # ns_pids NS: every process in the network namespace NS (slurmd, slurmstepd, job tasks)
  ip netns pids "$1" 2>/dev/null || true
}

kill_namespace() { # kill_namespace NS: SIGKILL everything in NS, as a node that loses power; wait until gone
  local i pids
  for ((i = 0; i < 100; i++)); do
    pids=$(ns_pids "$1")
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086  # one pid per word
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  echo "[local-slurm] processes $(ns_pids "$1" | tr '\n' ' ')in $1 survived SIGKILL for 10 s" >&2
  return 1
}

teardown_tag() { # teardown_tag TAG: kill the processes of the tag's namespaces, delete them and its bridge
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^hpcdiff-$1-" || true); do
    kill_namespace "$ns" || true
    ip netns delete "$ns" 2>/dev/null || true # its veth end goes with it, and so the host end
  done
  ip link delete "hdb$1" 2>/dev/null || true
  rm -f "$REGISTRY/$1"
}

running() { # running PID: the process exists and is not a zombie (a killed daemon nobody has reaped yet)
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
  [ -n "$state" ] && [ "$state" != Z ]
}

cleanup_leftovers() { # remove the namespaces of every tag whose slurmctld is not running (a killed start, a crash)
  local tag dir
  for tag in $( (
    ls "$REGISTRY" 2>/dev/null
    ip netns list 2>/dev/null | sed -n 's/^hpcdiff-\([0-9a-f]\{6\}\)-.*/\1/p'
    ip -o link show type bridge 2>/dev/null | sed -n 's/^[0-9]*: hdb\([0-9a-f]\{6\}\)[:@].*/\1/p'
  ) | sort -u); do
    dir=$(cat "$REGISTRY/$tag" 2>/dev/null || true)
    if [ -n "$dir" ] && [ -s "$dir/run/slurmctld.pid" ] && running "$(cat "$dir/run/slurmctld.pid")"; then
      continue # a live cluster: not a leftover
    fi
    echo "[local-slurm] removing leftovers of an earlier start (tag $tag${dir:+, $dir})"
    teardown_tag "$tag"
  done
}

free_subnet() { # free_subnet TAG: a 10.213.X prefix no address or route of this machine uses yet
  local x used
  x=$((16#${1:0:2}))
  used=$(
    ip -4 -o addr show 2>/dev/null
    ip -4 route show table all 2>/dev/null
  )
  for ((i = 0; i < 256; i++)); do
    if ! grep -q "10\.213\.$x\." <<<"$used"; then
      echo "10.213.$x"
      return 0
    fi
    x=$(((x + 1) % 256))
  done
  echo "[local-slurm] no free subnet in 10.213.0.0/16" >&2
  return 1
}

make_network() { # make_network TAG PREFIX N: bridge PREFIX.254 on this host, namespaces for node1..nodeN
  local tag=$1 prefix=$2 n=$3 k ns bridge="hdb$1"
  mkdir -p "$REGISTRY"
  printf '%s\n' "$DIR" >"$REGISTRY/$tag"
  ip link add "$bridge" type bridge
  ip addr add "$prefix.254/24" dev "$bridge"
  ip link set "$bridge" up
  for ((k = 1; k <= n; k++)); do
    ns=$(ns_of "$tag" "node$k")
    ip netns add "$ns"
    ip link add "hdv$tag-$k" type veth peer name eth0 netns "$ns"
    ip link set "hdv$tag-$k" master "$bridge" up
    ip -n "$ns" addr add "$prefix.$k/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done
}

write_hosts() { # write_hosts PREFIX N: the hosts file every node sees as /etc/hosts
  local k
  {
    echo "# Written by slurm/local/start.sh: bind-mounted over /etc/hosts inside each node's namespace."
    echo "127.0.0.1 localhost"
    echo "$1.254 slurm-controller"
    for ((k = 1; k <= $2; k++)); do echo "$1.$k node$k"; done
  } >"$DIR/hosts"
}

start_node_slurmd() { # start_node_slurmd TAG NODE: slurmd inside the node's namespaces, with its own hostname
  # nsenter enters the network namespace (not `ip netns exec`, which remounts /sys and so hides the cgroup
  # file system slurmd looks at); unshare adds a UTS namespace (the hostname) and a mount namespace (the hosts
  # file). slurmd daemonizes; its children (slurmstepd, the tasks) inherit all three.
  mkdir -p "$DIR/spool/$2" "$DIR/tmp/$2"
  nsenter --net="/run/netns/$(ns_of "$1" "$2")" -- unshare --uts --mount --propagation private -- \
    sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
    start-node "$2" "$DIR/hosts" "$CONF"
}
