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
image=${IMAGE:-localhost/tlsproxy:local}
project=tlsproxy-example-$$
containers=(certs upstream tlsproxy client)
# shellcheck source=deploy/compose-podman.sh
source "$repo/deploy/compose-podman.sh"

tls_port=$(free_port); admin_port=$(free_port); upstream_port=$(free_port)

build_and_make_certs "CA + client certificate"

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

wait_healthy tlsproxy

step "client: with and without its certificate"
podman run --name "$project-client" --network host --no-healthcheck \
  --add-host "tlsproxy:127.0.0.1" \
  -v "$here/client-check.py:/deploy/client-check.py:ro" -v "$project-pki:/certs:ro" \
  -e "PROXY_URL=https://tlsproxy:$tls_port/" \
  --entrypoint python3 "$image" /deploy/client-check.py

step "stop tlsproxy (SIGTERM: drain, exit 0)"
stop_expecting_exit_0 tlsproxy
echo "compose example OK"
