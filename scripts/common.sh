# Shared by the scripts: the repository root, the image name and the compose command.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${MESHLAB_IMAGE:-meshlab-peer:latest}"

# `docker compose` (v2) where it exists, else `docker-compose` (v1).
compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -f "$ROOT/docker-compose.yml" "$@"
  else
    docker-compose -f "$ROOT/docker-compose.yml" "$@"
  fi
}
