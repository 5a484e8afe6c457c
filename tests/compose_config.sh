#!/usr/bin/env bash
# docker/compose.yaml must be a valid Compose file, with every profile (gpu, cli) enabled.
# Needs docker-compose (Debian's v1 package, scripts/install_deps.sh) but no Docker engine.
# Exit 0 valid, 1 invalid (docker-compose says why), 77 skipped (no docker-compose).
set -euo pipefail
compose_file="$(cd "$(dirname "$0")/.." && pwd)/docker/compose.yaml"
if ! command -v docker-compose > /dev/null 2>&1; then
  echo "compose_config: SKIPPED: docker-compose is not installed (scripts/install_deps.sh installs it)"
  exit 77
fi
docker-compose -f "$compose_file" config -q
docker-compose -f "$compose_file" --profile gpu --profile cli config -q
services=$(docker-compose -f "$compose_file" --profile gpu --profile cli config --services | sort |
  tr '\n' ' ')
[ "$services" = "cli coordinator worker worker-gpu " ] || {
  echo "compose_config: services are '$services', expected cli coordinator worker worker-gpu"
  exit 1
}
echo "compose_config: $compose_file is valid (services: $services)"
