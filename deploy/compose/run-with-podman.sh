#!/usr/bin/env bash
# docker-compose.yml's containers run by hand with podman, in compose's order, for machines
# without Docker Compose (like this project's CI): certs (one-shot, must exit 0) -> upstream
# -> tlsproxy (must become healthy) -> client (its exit code is this script's).
#
# Differences from compose, forced by the host network (the only one that works everywhere
# here): everything listens on 127.0.0.1 on free ports, passed in through the same
# ${VAR:-default} hooks proxy.yaml has, and the client reaches the proxy by the name
# `tlsproxy` through --add-host. Volumes, files, commands and images are compose's.
#
# Use: deploy/compose/run-with-podman.sh           (builds the image; ~20 s when cached)
#      IMAGE=localhost/tlsproxy:test SKIP_BUILD=1 deploy/compose/run-with-podman.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=deploy/podman-here.sh
source "$repo/deploy/podman-here.sh"

image=${IMAGE:-localhost/tlsproxy:local}
project=tlsproxy-example-$$
health_deadline=${HEALTH_DEADLINE:-30}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
tls_port=$(free_port); admin_port=$(free_port); upstream_port=$(free_port)

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    for name in certs upstream tlsproxy client; do
      podman logs "$project-$name" >/dev/null 2>&1 || continue
      echo "--- logs: $name ---" >&2; podman logs "$project-$name" >&2 2>&1 || true
    done
  fi
  for name in client tlsproxy upstream certs; do podman rm -f -t 0 "$project-$name" >/dev/null 2>&1 || true; done
  podman volume rm -f "$project-pki" >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

if [ -z "${SKIP_BUILD:-}" ]; then
  step "build $image"
  podman build --pull=never --format docker --network host -t "$image" "$repo"
fi

podman volume create "$project-pki" >/dev/null

step "certs (one-shot): CA + client certificate into the pki volume"
podman run --name "$project-certs" --network host --no-healthcheck \
  -v "$here/make-certs.sh:/deploy/make-certs.sh:ro" -v "$project-pki:/certs" \
  --entrypoint /bin/sh "$image" /deploy/make-certs.sh

step "upstream: tlsproxy echo on 127.0.0.1:$upstream_port"
podman run -d --name "$project-upstream" --network host --no-healthcheck \
  "$image" echo --listen "127.0.0.1:$upstream_port" >/dev/null

step "tlsproxy: mTLS on 127.0.0.1:$tls_port (admin 127.0.0.1:$admin_port)"
podman run -d --name "$project-tlsproxy" --network host \
  -v "$here/proxy.yaml:/config/proxy.yaml:ro" -v "$project-pki:/certs" \
  -e "UPSTREAM_URL=http://127.0.0.1:$upstream_port" \
  -e "TLSPROXY_LISTEN=127.0.0.1:$tls_port" \
  -e "TLSPROXY_ADMIN=127.0.0.1:$admin_port" \
  "$image" >/dev/null 2> >(grep -v systemd >&2)

# depends_on: {condition: service_healthy} -- no systemd here runs health checks on a timer
deadline=$((SECONDS + health_deadline))
until podman healthcheck run "$project-tlsproxy" >/dev/null 2>&1; do
  if [ "$(podman inspect --format '{{.State.Running}}' "$project-tlsproxy")" != true ] || [ "$SECONDS" -ge "$deadline" ]; then
    echo "tlsproxy did not become healthy within ${health_deadline}s" >&2
    exit 1
  fi
  sleep 0.5  # polling interval of a bounded wait
done
echo "healthy"

step "client: with and without its certificate"
podman run --name "$project-client" --network host --no-healthcheck \
  --add-host "tlsproxy:127.0.0.1" \
  -v "$here/client-check.py:/deploy/client-check.py:ro" -v "$project-pki:/certs:ro" \
  -e "PROXY_URL=https://tlsproxy:$tls_port/" \
  --entrypoint python3 "$image" /deploy/client-check.py

step "stop tlsproxy (SIGTERM: drain, exit 0)"
start=$EPOCHREALTIME
podman stop -t 10 "$project-tlsproxy" >/dev/null 2> >(grep -v systemd >&2)
code=$(podman inspect --format '{{.State.ExitCode}}' "$project-tlsproxy")
awk -v a="$start" -v b="$EPOCHREALTIME" -v c="$code" 'BEGIN { printf "stopped in %.1f s, exit code %s\n", b - a, c }'
[ "$code" = 0 ]
echo "compose example OK"
