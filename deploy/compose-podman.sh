#!/usr/bin/env bash
# What deploy/compose*/run-with-podman.sh share: they run a docker-compose.yml's containers by
# hand with podman, in compose's order, on the host network. Sourced after setting
#   repo, here      the repository and the recipe's folder
#   image, project  the image to run and the prefix of every container / volume name
#   containers      the compose services' names, in start order (logs on failure, removal)
# It sets podman up (deploy/podman-here.sh) and removes what the run made when it exits.
# shellcheck disable=SC2154  # repo, here, image, project and containers come from the sourcing script
# shellcheck source=deploy/podman-here.sh
source "$repo/deploy/podman-here.sh"

health_deadline=${HEALTH_DEADLINE:-30}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

step() { printf '\n== %s\n' "$*"; }

cleanup() {
  status=$?
  local name index
  if [ "$status" -ne 0 ]; then
    for name in "${containers[@]}"; do
      podman logs "$project-$name" >/dev/null 2>&1 || continue
      echo "--- logs: $name ---" >&2; podman logs "$project-$name" >&2 2>&1 || true
    done
  fi
  for ((index = ${#containers[@]} - 1; index >= 0; index--)); do
    podman rm -f -t 0 "$project-${containers[index]}" >/dev/null 2>&1 || true
  done
  podman volume rm -f "$project-pki" >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT

# depends_on: {condition: service_healthy} -- no systemd here runs health checks on a timer
wait_healthy() {
  local deadline=$((SECONDS + health_deadline))
  until podman healthcheck run "$project-$1" >/dev/null 2>&1; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$project-$1")" != true ] || [ "$SECONDS" -ge "$deadline" ]; then
      echo "$1 did not become healthy within ${health_deadline}s" >&2
      exit 1
    fi
    sleep 0.5  # polling interval of a bounded wait
  done
  echo "$1 healthy"
}

# Until container $1's output holds $2 (a server that says when it listens), bounded.
wait_logged() {
  local deadline=$((SECONDS + health_deadline))
  until podman logs "$project-$1" 2>&1 | grep -q "$2"; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$project-$1")" != true ] || [ "$SECONDS" -ge "$deadline" ]; then
      echo "$1 did not log '$2' within ${health_deadline}s" >&2
      exit 1
    fi
    sleep 0.2  # polling interval of a bounded wait
  done
}

# The image (unless SKIP_BUILD), the pki volume, and the one-shot `certs` service
# (the recipe's make-certs.sh into the volume; must exit 0).
build_and_make_certs() {
  if [ -z "${SKIP_BUILD:-}" ]; then
    step "build $image"
    podman build --pull=never --format docker --network host -t "$image" "$repo"
  fi
  podman volume create "$project-pki" >/dev/null
  step "certs (one-shot): $1 into the pki volume"
  podman run --name "$project-certs" --network host --no-healthcheck \
    -v "$here/make-certs.sh:/deploy/make-certs.sh:ro" -v "$project-pki:/certs" \
    --entrypoint /bin/sh "$image" /deploy/make-certs.sh
}

# SIGTERM (podman stop): the proxy drains and must exit 0.
stop_expecting_exit_0() {
  local start=$EPOCHREALTIME code
  podman stop -t 10 "$project-$1" >/dev/null 2> >(grep -v systemd >&2)
  code=$(podman inspect --format '{{.State.ExitCode}}' "$project-$1")
  awk -v n="$1" -v a="$start" -v b="$EPOCHREALTIME" -v c="$code" 'BEGIN { printf "%s stopped in %.1f s, exit code %s\n", n, b - a, c }'
  [ "$code" = 0 ]
}
