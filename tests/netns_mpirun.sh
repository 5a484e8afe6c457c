#!/usr/bin/env bash
# `mpirun --host A,B` across two "hosts" made of network namespaces: Open MPI's launcher, its
# out-of-band wire-up and the TCP BTL over real interfaces, one rank per host.
#
#   tests/netns_mpirun.sh BUILD_DIR          (as root; CTest: netns_mpirun)
#
# Hosts: $P-ma 10.78.0.1 and $P-mb 10.78.0.2 on a bridge in $P-mbr (tests/netns_lib.sh).
# mpirun runs on host a; Open MPI reaches "remote" hosts through an ssh-like agent
# (plm_rsh_agent): ours is a script that runs the command in the namespace owning that address
# instead of ssh'ing to it. Shared memory between the ranks is ruled out (--mca btl tcp,self).
# Checks: `strata-worker --job ... --dp 2` trains 5 steps; the two ranks ran in the two
# namespaces; the gradients crossed the veth (byte counters); per-step losses equal the
# one-process `strata train` run (<= 1e-5 relative). Exit 0 pass, 1 fail, 77 skipped.
set -uo pipefail

BUILD=${1:?usage: tests/netns_mpirun.sh BUILD_DIR}
BUILD=$(cd "$BUILD" && pwd)
BIN=$BUILD/bin
P=${STRATA_NETNS_PREFIX:-strata}
NET=10.78.0
STEPS=5

# shellcheck source=tests/netns_lib.sh
source "$(dirname "$0")/netns_lib.sh"
netns_require netns_mpirun
if ! command -v mpirun >/dev/null; then
  echo "netns_mpirun: SKIPPED: no mpirun (Open MPI: scripts/install_deps.sh installs it)"
  exit 77
fi

WORK=$(mktemp -d /tmp/strata-mpirun.XXXXXX)
HOSTS=("$P-ma=$NET.1/24" "$P-mb=$NET.2/24")
cleanup() {
  netns_delete "${HOSTS[@]}" "$P-mbr"
  if [ "${KEEP_WORK:-0}" = "1" ]; then echo "netns_mpirun: files kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM
fail() {
  echo "netns_mpirun: FAILED: $*"
  for f in "$WORK"/mpirun.log "$WORK"/agent.log; do
    [ -f "$f" ] && { echo "---- $(basename "$f") (tail) ----"; tail -n 40 "$f"; }
  done
  exit 1
}

netns_build "$P-mbr" "${HOSTS[@]}" || fail "could not build the namespaces"

# The launcher's "ssh": Open MPI calls it as AGENT [options] HOST COMMAND... where COMMAND is a
# shell command line (an orted with its wire-up arguments).
cat > "$WORK/netns-rsh" <<EOF
#!/bin/sh
echo "netns-rsh: \$*" >> "$WORK/agent.log"
while [ \$# -gt 0 ]; do case \$1 in -*) shift ;; *) break ;; esac; done
host=\$1
shift
case \$host in
  $NET.1) ns=$P-ma ;;
  $NET.2) ns=$P-mb ;;
  *) echo "netns-rsh: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" /bin/sh -c "\$*"
EOF
# Each rank records the namespace it runs in, then becomes strata-worker.
cat > "$WORK/rank" <<EOF
#!/bin/sh
echo "\$OMPI_COMM_WORLD_RANK \$(ip netns identify \$\$)" >> "$WORK/ranks.txt"
exec "$BIN/strata-worker" "\$@"
EOF
chmod +x "$WORK/netns-rsh" "$WORK/rank"

yes "the quick brown fox jumps over the lazy dog while a cat sat on the mat and watched it" |
  head -c 100000 > "$WORK/input.txt"
cat > "$WORK/job.yaml" <<EOF
name: netns-mpirun
model: {layers: 2, heads: 2, d_model: 32, seq_len: 16}
data: {train: input.txt}
train: {steps: $STEPS, global_batch: 8, micro_batch: 2, lr: 1.0e-2, warmup: 2, seed: 5}
eval: {every: 0}
EOF
"$BIN/strata" train "$WORK/job.yaml" --threads 1 --metrics "$WORK/ref.jsonl" > /dev/null 2>&1 ||
  fail "strata train (the reference) failed"

rx_bytes() { ip netns exec "$P-mb" cat /sys/class/net/eth0/statistics/rx_bytes; }
RX0=$(rx_bytes)
T0=$(date +%s.%N)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# timeout: a wire-up that hangs (e.g. a wrong interface) fails the test instead of CTest's timeout.
timeout -k 5 90 ip netns exec "$P-ma" mpirun --host "$NET.1,$NET.2" -np 2 \
  --mca plm_rsh_agent "$WORK/netns-rsh" \
  --mca btl tcp,self --mca btl_tcp_if_include "$NET.0/24" --mca oob_tcp_if_include "$NET.0/24" \
  "$WORK/rank" --job "$WORK/job.yaml" --dp 2 --threads 1 --metrics "$WORK/dp2.jsonl" \
  > "$WORK/mpirun.log" 2>&1
RC=$?
T1=$(date +%s.%N)
RX1=$(rx_bytes)
[ $RC = 0 ] || fail "mpirun exited with $RC"
grep -q "done: $STEPS steps" "$WORK/mpirun.log" || fail "no 'done: $STEPS steps' line from rank 0"

sort "$WORK/ranks.txt" | tr '\n' ' ' | grep -qx "0 $P-ma 1 $P-mb " ||
  fail "ranks ran in: $(tr '\n' ' ' < "$WORK/ranks.txt") (expected 0 $P-ma, 1 $P-mb)"
# The gradients of this model are ~30k floats per step; all of it must have crossed eth0.
RX=$((RX1 - RX0))
[ "$RX" -gt $((STEPS * 100000)) ] || fail "only $RX bytes reached $P-mb's eth0"

/usr/bin/python3 - "$WORK/ref.jsonl" "$WORK/dp2.jsonl" <<'EOF' || fail "losses differ from strata train"
import json, sys
ref, dp2 = ([json.loads(l)["loss"] for l in open(p) if '"loss"' in l] for p in sys.argv[1:])
assert len(ref) == len(dp2) > 0, (len(ref), len(dp2))
for step, (a, b) in enumerate(zip(ref, dp2), 1):
    if abs(a - b) > 1e-5 * abs(a):
        sys.exit(f"step {step}: strata train {a} vs mpirun dp2 {b}")
print(f"netns_mpirun: {len(ref)} steps, losses match strata train (last {dp2[-1]:.6f})")
EOF
echo "netns_mpirun: mpirun --host $NET.1,$NET.2: rank 0 in $P-ma, rank 1 in $P-mb," \
  "$RX bytes into $P-mb over its veth, $(dt "$T0" "$T1") s"
echo "netns_mpirun: PASSED"
