#!/usr/bin/env bash
# Configures and builds Strata into build/ (Release, Ninja). Extra arguments go to cmake.
# STRATA_BUILD_DIR overrides the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${STRATA_BUILD_DIR:-build}"
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
ninja -C "$dir"
