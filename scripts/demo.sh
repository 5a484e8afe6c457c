#!/usr/bin/env bash
# README command 1: installs dependencies, builds, starts a local coordinator and 2 CPU worker
# daemons on loopback, submits examples/tiny.yaml (fortune(6) text, byte tokens), follows its
# log (the loss falls) until it ends, prints its status and stops everything.
#   scripts/demo.sh [JOB.yaml] [N workers]      # the daemon demo (scripts/demo_daemon.sh)
#   scripts/demo.sh --single [strata train flags] # one process, no daemons: strata train
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--single" ]; then
  shift
  scripts/install_deps.sh
  scripts/build.sh
  exec build/bin/strata train examples/tiny.yaml "$@"
fi
exec scripts/demo_daemon.sh "$@"
