#!/usr/bin/env bash
# Installs Strata's build and test dependencies from Debian 12's packages.
# Idempotent: when every package is already installed it does nothing and needs no network.
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build pkg-config clang-format
  libopenblas-openmp-dev
  protobuf-compiler libprotobuf-dev
  libyaml-cpp-dev libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  librocksdb-dev
  libxxhash-dev
  libboost-dev libboost-program-options-dev
  libopenmpi-dev openmpi-bin
  libgloo-dev
  python3 python3-torch python3-numpy
  fortunes fortunes-min
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
