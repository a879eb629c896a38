#!/usr/bin/env bash
# docker-compose.yml's containers run by hand with podman, in compose's order, for machines
# without Docker Compose (like this project's CI): certs (one-shot, must exit 0) ->
# component-b -> ingress (must become healthy) -> egress (must become healthy) -> component-a
# (its exit code is this script's).
#
# Differences from compose, forced by the host network (the only one that works everywhere
# here): everything listens on 127.0.0.1 on free ports, passed in through the same
# ${VAR:-default} hooks the two configs have, and the egress reaches the ingress at
# https://127.0.0.1:PORT (its auto certificate names 127.0.0.1). Volumes, files, commands and
# images are compose's.
#
# Use: deploy/compose-sidecar/run-with-podman.sh           (builds the image; ~20 s when cached)
#      IMAGE=localhost/tlsproxy:test SKIP_BUILD=1 deploy/compose-sidecar/run-with-podman.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=deploy/podman-here.sh
source "$repo/deploy/podman-here.sh"

image=${IMAGE:-localhost/tlsproxy:local}
project=tlsproxy-sidecar-$$
health_deadline=${HEALTH_DEADLINE:-30}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
b_port=$(free_port); ingress_port=$(free_port); ingress_admin=$(free_port)
egress_tls=$(free_port); egress_plain=$(free_port); egress_admin=$(free_port)
containers=(certs component-b ingress egress component-a)

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    for name in "${containers[@]}"; do
      podman logs "$project-$name" >/dev/null 2>&1 || continue
      echo "--- logs: $name ---" >&2; podman logs "$project-$name" >&2 2>&1 || true
    done
  fi
  for name in component-a egress ingress component-b certs; do podman rm -f -t 0 "$project-$name" >/dev/null 2>&1 || true; done
  podman volume rm -f "$project-pki" >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

wait_healthy() {  # depends_on: {condition: service_healthy} -- no systemd runs health checks here
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

if [ -z "${SKIP_BUILD:-}" ]; then
  step "build $image"
  podman build --pull=never --format docker --network host -t "$image" "$repo"
fi

podman volume create "$project-pki" >/dev/null

step "certs (one-shot): CA + client certificates into the pki volume"
podman run --name "$project-certs" --network host --no-healthcheck \
  -v "$here/make-certs.sh:/deploy/make-certs.sh:ro" -v "$project-pki:/certs" \
  --entrypoint /bin/sh "$image" /deploy/make-certs.sh

step "component-b: tlsproxy echo (plain HTTP) on 127.0.0.1:$b_port"
podman run -d --name "$project-component-b" --network host --no-healthcheck \
  "$image" echo --listen "127.0.0.1:$b_port" >/dev/null

step "ingress: mTLS required on 127.0.0.1:$ingress_port (admin 127.0.0.1:$ingress_admin)"
podman run -d --name "$project-ingress" --network host \
  -v "$here/ingress.yaml:/config/proxy.yaml:ro" -v "$project-pki:/certs" \
  -e "INGRESS_LISTEN=127.0.0.1:$ingress_port" \
  -e "COMPONENT_B_URL=http://127.0.0.1:$b_port" \
  -e "TLSPROXY_ADMIN=127.0.0.1:$ingress_admin" \
  "$image" >/dev/null 2> >(grep -v systemd >&2)
wait_healthy ingress

step "egress: plain HTTP on 127.0.0.1:$egress_plain -> https://127.0.0.1:$ingress_port with component A's certificate"
podman run -d --name "$project-egress" --network host \
  -v "$here/egress.yaml:/config/proxy.yaml:ro" -v "$project-pki:/certs:ro" \
  -e "EGRESS_LISTEN=127.0.0.1:$egress_tls" \
  -e "EGRESS_PLAIN=127.0.0.1:$egress_plain" \
  -e "INGRESS_URL=https://127.0.0.1:$ingress_port" \
  -e "TLSPROXY_ADMIN=127.0.0.1:$egress_admin" \
  "$image" >/dev/null 2> >(grep -v systemd >&2)
wait_healthy egress

step "component-a: plain HTTP to its egress; with its own identity, and as the impostor"
podman run --name "$project-component-a" --network host --no-healthcheck \
  -v "$here/component-a-check.py:/deploy/component-a-check.py:ro" \
  -e "EGRESS=127.0.0.1:$egress_plain" \
  --entrypoint python3 "$image" /deploy/component-a-check.py

step "stop egress and ingress (SIGTERM: drain, exit 0)"
for name in egress ingress; do
  podman stop -t 10 "$project-$name" >/dev/null 2> >(grep -v systemd >&2)
  code=$(podman inspect --format '{{.State.ExitCode}}' "$project-$name")
  echo "$name exit code $code"
  [ "$code" = 0 ]
done
echo "sidecar example OK"
