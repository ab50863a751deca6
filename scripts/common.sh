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

# The running container of a service of the demo: the compose project's, else the task of the
# stack `${MESHLAB_STACK:-meshlab}` (docker stack deploy -c docker-compose.yml meshlab) that runs
# on this node. Prints nothing when there is neither.
container_of() {
  local id
  id=$(compose ps -q "$1" 2>/dev/null || true)
  if [ -z "$id" ]; then
    id=$(docker ps --quiet --filter "label=com.docker.swarm.service.name=${MESHLAB_STACK:-meshlab}_$1" | head -1)
  fi
  printf '%s' "$id"
}
