#!/usr/bin/env bash
# README command 1: installs dependencies, builds, and trains the example GPT on the CPU
# (examples/tiny.yaml: fortune(6) text, byte tokens). Extra arguments go to `strata train`,
# e.g. scripts/demo.sh --max-steps 50
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh
exec build/bin/strata train examples/tiny.yaml "$@"
