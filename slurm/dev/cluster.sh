#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for development and CI: `cluster.sh up|down|status` (root).
#
# Each compute node (ddpm-n1, ddpm-n2) is a network namespace with a veth onto the bridge ddpmbr0 (10.77.0.11,
# 10.77.0.12) and a UTS namespace of its own (`hostname` is the node name); slurmd runs inside both. slurmctld
# runs in the host's network namespace at the bridge address 10.77.0.1, in a UTS namespace named ddpm-ctl (it
# only starts under the host name of SlurmctldHost). One munged (the system socket) serves all of them. All
# share the filesystem: the checkout, /tmp, runs and logs are the "shared storage".
#
# `up` installs slurm-wlm and munge with apt-get when missing, then writes:
#   /etc/slurm/slurm.conf   from slurm.conf.in, so plain sbatch/srun/squeue/scontrol from the host shell work
#                           (Debian's clients read that path); refused if a slurm.conf that is not ours is there
#   /etc/hosts              a block between "# ddpm-dev-cluster begin" and "# ddpm-dev-cluster end"
#   $DDPM_SLURM_STATE       (default /tmp/ddpm-slurm) controller state, spool, pid files and logs
# `down` stops only what `up` started (by pid), kills the jobs left in the node namespaces, and removes the
# namespaces, the bridge, the hosts block, our slurm.conf and the state directory. Both are idempotent.
set -euo pipefail

STATE=${DDPM_SLURM_STATE:-/tmp/ddpm-slurm}
WAIT_S=${DDPM_SLURM_WAIT_S:-60}
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=/etc/slurm/slurm.conf
MARK="# Written by slurm/dev/cluster.sh"
STATE_MARK=.ddpm-dev-cluster
BRIDGE=ddpmbr0
CTL=ddpm-ctl
CTL_ADDR=10.77.0.1
NODES=(ddpm-n1 ddpm-n2)
declare -A ADDR=([ddpm-n1]=10.77.0.11 [ddpm-n2]=10.77.0.12)

log() { echo "cluster: $*"; }
die() { echo "cluster: $*" >&2; exit 1; }

install_packages() {
  local missing=() cmd
  for cmd in slurmctld:slurm-wlm slurmd:slurm-wlm sinfo:slurm-wlm munged:munge ip:iproute2 nsenter:util-linux \
             unshare:util-linux runuser:util-linux hostname:hostname; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || missing+=("${cmd##*:}")
  done
  ((${#missing[@]})) || return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# pid_of FILE NAME: the pid in FILE when that process is alive and is NAME (not a recycled pid).
pid_of() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$2" ]] && alive "$pid" || return 1
  echo "$pid"
}

# alive PID: running, not a zombie (init may reap a daemon's exit late). /proc, as procps may be missing.
alive() { local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; st=${st##*) }; [[ ${st%% *} != Z ]]; }

# stop_pid FILE NAME: SIGTERM, up to 15 s, then SIGKILL; removes FILE.
stop_pid() {
  local pid
  if pid=$(pid_of "$1" "$2"); then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$1"
}

start_munge() {
  if munge -n </dev/null >/dev/null 2>&1; then return 0; fi  # a munged already answers: use it, leave it be
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null >>"$STATE/log/daemons.out" 2>&1
  for _ in $(seq 50); do
    if munge -n </dev/null >/dev/null 2>&1; then cp /run/munge/munged.pid "$STATE/munged.pid"; return 0; fi
    sleep 0.1
  done
  tail -n 20 /var/log/munge/munged.log >&2 || true
  die "munged did not start"
}

hosts_block() {  # hosts_block add|remove: rewrite /etc/hosts in place (it may be a bind mount: no sed -i)
  local tmp node
  tmp=$(mktemp)
  sed '/^# ddpm-dev-cluster begin$/,/^# ddpm-dev-cluster end$/d' /etc/hosts >"$tmp"
  if [[ $1 == add ]]; then
    [[ ! -s $tmp || -z $(tail -c1 "$tmp") ]] || echo >>"$tmp"  # a last line without its newline
    { echo "# ddpm-dev-cluster begin"; echo "$CTL_ADDR $CTL"
      for node in "${NODES[@]}"; do echo "${ADDR[$node]} $node"; done
      echo "# ddpm-dev-cluster end"; } >>"$tmp"
  fi
  cmp -s "$tmp" /etc/hosts || cat "$tmp" >/etc/hosts
  rm -f "$tmp"
}

network_up() {
  local node veth
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$CTL_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for node in "${NODES[@]}"; do
    veth="v-${node#ddpm-}"
    [[ -e /run/netns/$node ]] || ip netns add "$node"
    ip link show "$veth" >/dev/null 2>&1 || ip link add "$veth" type veth peer name eth0 netns "$node"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$node" addr replace "${ADDR[$node]}/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
    # No default route on purpose: the host does not forward, so anything off the bridge (DNS included) should
    # fail at once, not time out (e.g. torch's c10d store reverse-resolves each peer: 10 s each via dead DNS).
  done
  hosts_block add
}

# write_conf: (re)generates slurm.conf; returns 0 when its content changed.
write_conf() {
  local tmp
  if [[ -f $CONF ]] && ! grep -q "^$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: move it away first"
  fi
  mkdir -p /etc/slurm
  tmp=$(mktemp)
  sed "s|@STATE@|$STATE|g" "$HERE/slurm.conf.in" >"$tmp"
  if cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; return 1; fi
  chmod 0644 "$tmp"; mv "$tmp" "$CONF"
}

start_daemons() {
  local node flag=
  if ! pid_of "$STATE/slurmctld.pid" slurmctld >/dev/null; then
    [[ -e $STATE/ctld/job_state ]] || flag=-c  # a fresh state directory: nothing to recover
    unshare --uts sh -c "hostname $CTL && exec /usr/sbin/slurmctld $flag" </dev/null >>"$STATE/log/daemons.out" 2>&1
  fi
  for node in "${NODES[@]}"; do
    pid_of "$STATE/slurmd-$node.pid" slurmd >/dev/null && continue
    mkdir -p "$STATE/spool/$node"
    # nsenter, not `ip netns exec`: the latter remounts /sys and slurmd then fails on cgroups.
    nsenter --net="/run/netns/$node" unshare --uts sh -c "hostname $node && exec /usr/sbin/slurmd -N $node" \
      </dev/null >>"$STATE/log/daemons.out" 2>&1
  done
}

wait_idle() {
  local ready
  for _ in $(seq "$WAIT_S"); do
    ready=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc|comp)$' || true)
    if [[ $ready == "${#NODES[@]}" ]]; then return 0; fi
    sleep 1
  done
  echo "cluster: the nodes did not come up within $WAIT_S s; sinfo says:" >&2
  sinfo -N -l >&2 || true
  sinfo -R >&2 || true
  for f in "$STATE"/log/*; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done
  exit 1
}

up() {
  local t0=$SECONDS node changed=0
  install_packages
  if [[ -d $STATE && ! -e $STATE/$STATE_MARK && -n $(ls -A "$STATE") ]]; then
    die "$STATE is not empty and was not made by this script: choose another DDPM_SLURM_STATE"
  fi
  mkdir -p "$STATE"/{ctld,log,spool}
  touch "$STATE/$STATE_MARK"
  start_munge
  network_up
  write_conf && changed=1
  if ((changed)) && pid_of "$STATE/slurmctld.pid" slurmctld >/dev/null; then
    # New settings for a running cluster: restart the daemons; running jobs and the queue survive.
    log "slurm.conf changed: restarting the daemons"
    for node in "${NODES[@]}"; do stop_pid "$STATE/slurmd-$node.pid" slurmd; done
    stop_pid "$STATE/slurmctld.pid" slurmctld
  fi
  start_daemons
  wait_idle
  log "up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N=%t' | sort -u | tr '\n' ' ')(state and logs in $STATE)"
}

down() {
  local node pids=()
  for node in "${NODES[@]}"; do
    stop_pid "$STATE/slurmd-$node.pid" slurmd
    if [[ -e /run/netns/$node ]]; then
      # What is left in the node's namespace is ours: job steps (slurmstepd) and their processes.
      mapfile -t pids < <(ip netns pids "$node" 2>/dev/null || true)
      if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 50); do [[ -z $(ip netns pids "$node" 2>/dev/null) ]] && break; sleep 0.1; done
        mapfile -t pids < <(ip netns pids "$node" 2>/dev/null || true)
        ((${#pids[@]} == 0)) || kill -9 "${pids[@]}" 2>/dev/null || true
      fi
      ip netns del "$node" 2>/dev/null || true
    fi
  done
  stop_pid "$STATE/slurmctld.pid" slurmctld
  stop_pid "$STATE/munged.pid" munged  # only a munged that `up` started
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  hosts_block remove
  if [[ -f $CONF ]] && grep -q "^$MARK" "$CONF"; then rm -f "$CONF"; fi
  if [[ -e $STATE/$STATE_MARK ]]; then rm -rf "$STATE"; fi
  log "down"
}

status() {
  if ! pid_of "$STATE/slurmctld.pid" slurmctld >/dev/null; then log "not up (make cluster-up)"; exit 1; fi
  sinfo -N -l
}

[[ $EUID == 0 ]] || die "needs root (network namespaces, /etc/hosts, /etc/slurm)"
case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
