#!/usr/bin/env bash
# docker-compose.yml's containers run by hand with podman, in compose's order, for machines
# without Docker Compose (like this project's CI): certs (one-shot, must exit 0) ->
# component-b + component-b-grpc -> ingress (must become healthy) -> egress (must become
# healthy) -> component-a (its exit code is this script's).
#
# The gRPC half needs grpcio in the image: Dockerfile.grpc builds it FROM the tlsproxy image
# (pip, so PyPI or the configured index must be reachable). If that build fails, the script
# says so ("gRPC half skipped: ...") and runs the REST half alone.
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
image=${IMAGE:-localhost/tlsproxy:local}
project=tlsproxy-sidecar-$$
containers=(certs component-b component-b-grpc ingress egress component-a)
# shellcheck source=deploy/compose-podman.sh
source "$repo/deploy/compose-podman.sh"

b_port=$(free_port); b_grpc_port=$(free_port); ingress_port=$(free_port); ingress_admin=$(free_port)
egress_tls=$(free_port); egress_plain=$(free_port); egress_admin=$(free_port)

build_and_make_certs "CA + client certificates"

step "build localhost/tlsproxy-grpc:local: $image + grpcio (Dockerfile.grpc), for the gRPC half"
# Used by its id: the tag may move under a concurrent build from another checkout.
grpc_build=$(mktemp -d)
if podman build --pull=never --format docker --network host --build-arg "TLSPROXY_IMAGE=$image" \
    --iidfile "$grpc_build/iid" -t localhost/tlsproxy-grpc:local -f "$here/Dockerfile.grpc" "$here" \
    >"$grpc_build/log" 2>&1; then
  grpc_image=$(cat "$grpc_build/iid")
  grep '^grpcio ' "$grpc_build/log" || true
else
  tail -n 5 "$grpc_build/log" >&2
  echo "gRPC half skipped: could not build the grpcio image (is PyPI reachable from podman builds?)"
  grpc_image=
fi
rm -rf "$grpc_build"

step "component-b: tlsproxy echo (plain HTTP) on 127.0.0.1:$b_port"
podman run -d --name "$project-component-b" --network host --no-healthcheck \
  "$image" echo --listen "127.0.0.1:$b_port" >/dev/null

if [ -n "$grpc_image" ]; then
  step "component-b-grpc: examples/grpc_echo_server.py (insecure gRPC) on 127.0.0.1:$b_grpc_port"
  podman run -d --name "$project-component-b-grpc" --network host --no-healthcheck \
    -v "$repo/examples/grpc_echo_server.py:/deploy/grpc_echo_server.py:ro" \
    --entrypoint python3 "$grpc_image" /deploy/grpc_echo_server.py --listen "127.0.0.1:$b_grpc_port" >/dev/null
  wait_logged component-b-grpc "grpc echo server listening"
fi

step "ingress: mTLS required on 127.0.0.1:$ingress_port (admin 127.0.0.1:$ingress_admin)"
podman run -d --name "$project-ingress" --network host \
  -v "$here/ingress.yaml:/config/proxy.yaml:ro" -v "$project-pki:/certs" \
  -e "INGRESS_LISTEN=127.0.0.1:$ingress_port" \
  -e "COMPONENT_B_URL=http://127.0.0.1:$b_port" \
  -e "COMPONENT_B_GRPC_URL=h2c://127.0.0.1:$b_grpc_port" \
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

step "component-a: plain HTTP and insecure gRPC to its egress; with its own identity, and as the impostor"
podman run --name "$project-component-a" --network host --no-healthcheck \
  -v "$here/component-a-check.py:/deploy/component-a-check.py:ro" \
  -v "$repo/examples/grpc_echo_client.py:/deploy/grpc_echo_client.py:ro" \
  -e "EGRESS=127.0.0.1:$egress_plain" \
  --entrypoint python3 "${grpc_image:-$image}" /deploy/component-a-check.py

step "stop egress and ingress (SIGTERM: drain, exit 0)"
stop_expecting_exit_0 egress
stop_expecting_exit_0 ingress
echo "sidecar example OK"
