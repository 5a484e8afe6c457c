#!/usr/bin/env bash
# Installs Strata's build and test dependencies from Debian 12's packages.
# Idempotent: when every package is already installed it does nothing and needs no network.
set -euo pipefail

# STRATA_DEPS=build installs only what building the binaries needs (the Docker images' build
# stage: docker/Dockerfile*); the default adds the tests', benchmarks' and tooling's packages.
PKGS=(
  build-essential cmake ninja-build pkg-config
  libopenblas-openmp-dev
  protobuf-compiler libprotobuf-dev
  libyaml-cpp-dev libspdlog-dev libfmt-dev
  librocksdb-dev
  libxxhash-dev
  libboost-dev libboost-program-options-dev
  libopenmpi-dev openmpi-bin
  libgloo-dev
)
if [ "${STRATA_DEPS:-all}" != "build" ]; then
  PKGS+=(
    clang-format
    libgtest-dev libgmock-dev libbenchmark-dev
    python3 python3-torch python3-numpy
    fortunes fortunes-min
    iproute2         # tests/netns_*.sh: network namespaces, veth pairs, a bridge
    docker-compose   # tests/CMakeLists.txt compose_config: validates docker/compose.yaml
  )
fi

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
