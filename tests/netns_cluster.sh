#!/usr/bin/env bash
# A four-host cluster on one machine, built from network namespaces: the daemons' multi-node
# path (non-loopback binds, the API token, the control-plane secret, Gloo over real interfaces)
# and recovery from a killed worker and from a network partition.
#
#   tests/netns_cluster.sh BUILD_DIR          (as root; CTest: netns_cluster)
#
# Topology: namespace $P-br holds a bridge; every "host" is a namespace with one veth into it
# and its own address, nothing else (no default route, no NAT: traffic cannot leave the
# namespaces):
#   $P-c   10.77.0.1   strata-coordinator (API :8470, control plane :8471, token file)
#   $P-w1  10.77.0.11  strata-worker w1       $P-w2 .12 w2       $P-w3 .13 w3
# The filesystem is shared by all namespaces, so the coordinator's data dir is the shared
# checkpoint storage (DIR/checkpoints/<job>), as a shared filesystem would be across hosts.
#
# Scenario: submit a job (resources.workers 2, min_workers 1); at step >= 10 `kill -9` one busy
# worker -> the job must be RUNNING again on a higher generation; then pull the cable of another
# busy worker (its veth goes down on the bridge) -> recovered again; the job must end SUCCEEDED
# with every step done. Then the cable goes back in and the partitioned worker must register
# again. Timings are printed. Exit 0 pass, 1 fail (logs printed), 77 skipped (not root / no
# `ip netns`).
set -uo pipefail

BUILD=${1:?usage: tests/netns_cluster.sh BUILD_DIR}
BUILD=$(cd "$BUILD" && pwd)
BIN=$BUILD/bin
P=${STRATA_NETNS_PREFIX:-strata}
NET=10.77.0
STEPS=60
LIMIT_S=150  # the whole scenario, after setup

# shellcheck source=tests/netns_lib.sh
source "$(dirname "$0")/netns_lib.sh"
netns_require netns_cluster
for b in strata strata-coordinator strata-worker; do
  [ -x "$BIN/$b" ] || { echo "netns_cluster: FAILED: $BIN/$b is missing (build first)"; exit 1; }
done

WORK=$(mktemp -d /tmp/strata-netns.XXXXXX)
NSES=("$P-c" "$P-w1" "$P-w2" "$P-w3")
PIDS=()
declare -A WPID  # worker id -> pid
T0=$(date +%s.%N)

log() { printf '[netns_cluster %7ss] %s\n' "$(dt "$T0" "$(date +%s.%N)")" "$*"; }

cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  netns_delete "${NSES[@]}" "$P-br"
  if [ "${KEEP_WORK:-0}" = "1" ]; then echo "netns_cluster: logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM
# The CLI runs on the coordinator's host (the root namespace has no route into the cluster).
api() { ip netns exec "$P-c" "$BIN/strata" "$@"; }
json() { /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

fail() {
  echo "netns_cluster: FAILED: $*"
  echo "---- job status ----"
  api status "${JOB:-none}" 2>&1 | head -12
  echo "---- job log (tail) ----"
  api logs "${JOB:-none}" 2>&1 | tail -n 20
  echo "---- workers ----"
  api workers 2>&1
  echo "---- coordinator log (tail) ----"
  tail -n 60 "$WORK/coordinator.log"
  for w in w1 w2 w3; do
    echo "---- worker $w log (tail) ----"
    tail -n 25 "$WORK/$w.log"
  done
  exit 1
}

# ---- the network ---------------------------------------------------------------------------
netns_build "$P-br" "$P-c=$NET.1/24" "$P-w1=$NET.11/24" "$P-w2=$NET.12/24" "$P-w3=$NET.13/24" ||
  fail "could not build the namespaces"

# ---- the daemons ---------------------------------------------------------------------------
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
(umask 077 && echo "$TOKEN" > "$WORK/token")
export STRATA_COORDINATOR=$NET.1:8470 STRATA_TOKEN=$TOKEN

ip netns exec "$P-c" "$BIN/strata-coordinator" --data-dir "$WORK/coordinator" \
  --listen "$NET.1:8470" --control-listen "$NET.1:8471" --token-file "$WORK/token" \
  > "$WORK/coordinator.log" 2>&1 &
PIDS+=($!)
disown  # no "Killed" job notices from bash; cleanup() ends every pid in PIDS
for _ in $(seq 100); do
  grep -q "listening on" "$WORK/coordinator.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "listening on $NET.1:8470" "$WORK/coordinator.log" || fail "coordinator did not start"
for i in 1 2 3; do
  ip netns exec "$P-w$i" "$BIN/strata-worker" --coordinator "$NET.1:8471" --host "$NET.1$i" \
    --worker-id "w$i" --threads 1 --secret-file "$WORK/token" --log-level info \
    > "$WORK/w$i.log" 2>&1 &
  WPID[w$i]=$!
  PIDS+=($!)
  disown
done
# Off loopback, API calls without the token are refused.
STRATA_TOKEN="" api jobs > "$WORK/noauth.txt" 2>&1
grep -q "HTTP 401" "$WORK/noauth.txt" || fail "the API did not refuse a call without the token"
for _ in $(seq 100); do
  n=$(api workers --json 2>/dev/null | json "len(d.get('workers', []))" 2>/dev/null)
  [ "${n:-0}" = 3 ] && break
  sleep 0.1
done
[ "${n:-0}" = 3 ] || fail "3 workers did not register"
log "cluster up: coordinator $NET.1, workers $NET.11-13 registered"
api workers

# ---- the job -------------------------------------------------------------------------------
yes "the quick brown fox jumps over the lazy dog while a cat sat on the mat and watched it" |
  head -c 200000 > "$WORK/input.txt"
cat > "$WORK/job.yaml" <<EOF
name: netns-cluster
model: {layers: 4, heads: 4, d_model: 128, seq_len: 128}
data: {train: input.txt}
train: {steps: $STEPS, global_batch: 8, micro_batch: 2, lr: 3.0e-3, warmup: 5, seed: 7}
eval: {every: 0}
checkpoint: {every: 5, async: true}
resources: {device: cpu, workers: 2, min_workers: 1, threads: 1}
EOF
JOB=$(api submit "$WORK/job.yaml") || fail "submit failed"
log "submitted $JOB"
DEADLINE=$(( $(date +%s) + LIMIT_S ))

# Polls the job; sets STATE GEN STEP.
status() {
  read -r STATE GEN STEP <<< "$(api status "$JOB" --json 2>/dev/null |
    json "d.get('state',''), d.get('generation',0), d.get('step',0)" 2>/dev/null | tr -d "(),'")"
}
# wait_for DESCRIPTION CONDITION: polls until the Python condition on (state, gen, step) holds;
# fails the test at the deadline or when the job ends first.
wait_for() {
  local what=$1 cond=$2
  while [ "$(date +%s)" -lt "$DEADLINE" ]; do
    status
    if [ -n "$STATE" ] && /usr/bin/python3 -c "
import sys; state, gen, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.exit(0 if ($cond) else 1)" "$STATE" "$GEN" "$STEP"; then
      return 0
    fi
    case $STATE in
      SUCCEEDED | FAILED | CANCELLED) fail "job ended ($STATE at step $STEP) while waiting for: $what" ;;
    esac
    sleep 0.2
  done
  fail "timed out waiting for: $what (last: $STATE generation $GEN step $STEP)"
}
worker_state() {  # worker_state ID: "<state> <heartbeat lag>" or "gone"
  api workers --json | json "' '.join(str(x) for w in d.get('workers', []) if w['id'] == '$1'
                                     for x in (w['state'], w['heartbeat_lag_seconds'])) or 'gone'"
}
busy_worker() {  # a worker running the job, other than $1
  api workers --json | json "' '.join(w['id'] for w in d.get('workers', [])
                               if w['job_id'] == '$JOB')" |
    tr ' ' '\n' | grep -v "^${1:-none}\$" | grep . | head -1
}

wait_for "step >= 10" "state == 'RUNNING' and step >= 10"
GEN1=$GEN
T_RUN=$(date +%s.%N)
VICTIM=$(busy_worker)
[ -n "$VICTIM" ] || fail "no busy worker found"
log "step $STEP, generation $GEN1: kill -9 $VICTIM (pid ${WPID[$VICTIM]})"
kill -9 "${WPID[$VICTIM]}"
T_KILL=$(date +%s.%N)
wait_for "RUNNING after the kill" "state == 'RUNNING' and gen > $GEN1"
GEN2=$GEN
T_REC1=$(date +%s.%N)
log "recovered from kill -9: RUNNING, generation $GEN2, step $STEP"
# Let the new generation make progress before cutting the next one off.
wait_for "progress after the kill" "gen == $GEN2 and step >= $STEP + 2"

CUT=$(busy_worker "$VICTIM")
[ -n "$CUT" ] || fail "no second busy worker found"
log "step $STEP, generation $GEN2: partition $CUT (veth v-$CUT down on the bridge)"
ip -n "$P-br" link set "v-$CUT" down
T_CUT=$(date +%s.%N)
wait_for "RUNNING after the partition" "state == 'RUNNING' and gen > $GEN2"
T_REC2=$(date +%s.%N)
log "recovered from the partition: RUNNING, generation $GEN, step $STEP"
read -r wstate _ <<< "$(worker_state "$CUT")"
log "$CUT as the coordinator sees it: $wstate"
[ "$(busy_worker | grep -c "^$CUT\$")" = 0 ] || fail "the partitioned $CUT was given a rank again"
wait_for "SUCCEEDED" "state == 'SUCCEEDED'"
T_DONE=$(date +%s.%N)
[ "$STEP" = "$STEPS" ] || fail "SUCCEEDED at step $STEP, expected $STEPS"
RESTARTS=$(api status "$JOB" --json | json "d['restarts']")
[ "$RESTARTS" = 2 ] || fail "restarts = $RESTARTS, expected 2 (one per failure)"
log "job $JOB SUCCEEDED at step $STEP, generation $GEN, $RESTARTS restarts"

# The cable goes back in: the partitioned worker must be registered and alive again.
ip -n "$P-br" link set "v-$CUT" up
T_UP=$(date +%s.%N)
ok=0
for _ in $(seq 150); do
  read -r wstate lag <<< "$(worker_state "$CUT")"
  if [ "$wstate" = idle ] && awk -v l="$lag" 'BEGIN { exit !(l < 1) }'; then
    ok=1
    break
  fi
  sleep 0.2
done
[ $ok = 1 ] || fail "$CUT did not come back after its link came up (state: $wstate $lag)"
T_BACK=$(date +%s.%N)
log "$CUT registered again: $wstate, heartbeat lag ${lag}s"
api workers
api status "$JOB" | head -9

echo "netns_cluster: timings (s): step 10 reached $(dt "$T0" "$T_RUN") after start;" \
  "kill -9 -> RUNNING again $(dt "$T_KILL" "$T_REC1");" \
  "partition -> RUNNING again $(dt "$T_CUT" "$T_REC2");" \
  "-> SUCCEEDED $(dt "$T_REC2" "$T_DONE"); link up -> worker back $(dt "$T_UP" "$T_BACK");" \
  "total $(dt "$T0" "$T_BACK")"
echo "netns_cluster: PASSED"
