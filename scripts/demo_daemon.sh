#!/usr/bin/env bash
# Daemon mode on one machine: installs dependencies, builds, starts a coordinator and N CPU
# worker daemons on loopback, submits a job (default examples/tiny.yaml with
# resources.workers = N), follows its log until it ends, prints its status, and stops
# everything. Usage: scripts/demo_daemon.sh [JOB.yaml] [N (default 2)]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh
JOB=${1:-examples/tiny.yaml}
N=${2:-2}
WORK=$(mktemp -d /tmp/strata-demo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
build/bin/strata-coordinator --data-dir "$WORK/coordinator" --listen 127.0.0.1:0 \
  --control-listen 127.0.0.1:0 > "$WORK/coordinator.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  grep -q "strata-coordinator: listening on" "$WORK/coordinator.log" 2>/dev/null && break
  sleep 0.1
done
line=$(grep "strata-coordinator: listening on" "$WORK/coordinator.log")
API=$(echo "$line" | sed -E 's/.*listening on ([0-9.]+:[0-9]+).*/\1/')
CONTROL=$(echo "$line" | sed -E 's/.*workers connect to ([0-9.]+:[0-9]+).*/\1/')
echo "coordinator: API $API, control plane $CONTROL (log: $WORK/coordinator.log)"
THREADS=$(( $(nproc) / N )); [ "$THREADS" -ge 1 ] || THREADS=1
for i in $(seq 0 $((N - 1))); do
  build/bin/strata-worker --coordinator "$CONTROL" --worker-id "worker-$i" --threads "$THREADS" \
    --log-level warn > "$WORK/worker-$i.log" 2>&1 &
  PIDS+=($!)
done
export STRATA_COORDINATOR=$API
# The job with resources.workers = N: the spec's resources block is replaced (strata submit
# resolves relative paths against the original file's directory, so the copy stays beside it).
SPEC="$(dirname "$JOB")/.demo-daemon-$$.yaml"
awk '/^resources:/ {skip=1; next} skip && /^[^ #]/ {skip=0} !skip' "$JOB" > "$SPEC"
echo "resources: {device: cpu, workers: $N, min_workers: 1}" >> "$SPEC"
trap 'rm -f "$SPEC"; cleanup' EXIT
sleep 0.5
build/bin/strata workers
ID=$(build/bin/strata submit "$SPEC")
echo "submitted $ID"
build/bin/strata logs "$ID" -f
build/bin/strata status "$ID" | head -12
build/bin/strata status "$ID" | grep -q "SUCCEEDED"
