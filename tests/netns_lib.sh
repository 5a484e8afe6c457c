# shellcheck shell=bash
# Shared by tests/netns_*.sh (sourced): "hosts" on one machine made of network namespaces.
#
# netns_require TEST: exits 77 (CTest's skip code) with a message unless we are root and
# `ip netns add` works.
netns_require() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$1: SKIPPED: needs root (network namespaces, veth pairs, a bridge)"
    exit 77
  fi
  local probe="strata-probe-$$"
  if ! ip netns add "$probe" 2>/dev/null; then
    echo "$1: SKIPPED: 'ip netns add' does not work here (no iproute2 or no CAP_SYS_ADMIN)"
    exit 77
  fi
  ip netns del "$probe"
}

# netns_build BRIDGE_NS NS=ADDR/PREFIX...: a namespace BRIDGE_NS holding bridge br0, and for each
# NS a namespace whose only interfaces are lo and eth0, a veth whose peer v-<NS suffix after the
# last '-'> sits on br0. No default route, no NAT: packets cannot leave these namespaces.
# Namespaces left by a crashed run are deleted first. Returns non-zero on any failure.
netns_build() {
  local br=$1 spec ns addr port
  shift
  netns_delete "$br" "$@"
  ip netns add "$br" && ip -n "$br" link add br0 type bridge && ip -n "$br" link set br0 up ||
    return 1
  for spec in "$@"; do
    ns=${spec%%=*}
    addr=${spec#*=}
    port="v-${ns##*-}"
    ip netns add "$ns" &&
      ip -n "$br" link add "$port" type veth peer name eth0 netns "$ns" &&
      ip -n "$br" link set "$port" master br0 up &&
      ip -n "$ns" link set lo up &&
      ip -n "$ns" addr add "$addr" dev eth0 &&
      ip -n "$ns" link set eth0 up || return 1
    if ip -n "$ns" route | grep -q default; then
      echo "netns_build: $ns has a default route" >&2
      return 1
    fi
  done
}

# netns_delete NS[=ADDR]...: SIGKILLs what still runs in the namespaces (only this test's
# processes live there), then deletes them, and with them their veths and the bridge.
netns_delete() {
  local spec pids
  for spec in "$@"; do
    pids=$(ip netns pids "${spec%%=*}" 2>/dev/null)
    # shellcheck disable=SC2086  # one pid per word
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    ip netns del "${spec%%=*}" 2>/dev/null
  done
  return 0
}

# dt T0 T1: seconds between two `date +%s.%N` stamps, 2 decimals.
dt() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
