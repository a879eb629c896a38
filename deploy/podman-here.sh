#!/usr/bin/env bash
# Vendored copy of the machine notes' shared/container/podman-here.sh, so a fresh checkout sets
# podman up by itself: tests/test_container.py and deploy/*.sh source this file.
# Makes podman usable on this kind of machine, and provides a local `python:3.11-slim` base image
# (no container registry is reachable here, so the base is built from Debian packages).
#
# Use:   source ../shared/container/podman-here.sh      # from the project root; sets the env below
#        podman build --pull=never --format docker --network host -t tlsproxy:test .
#        podman run -d --init --network host --name tp tlsproxy:test ...
#        podman healthcheck run tp                       # no systemd here: run health checks by hand
# Facts behind each setting are in ../shared/CONTAINER.md. Idempotent; the first run takes ~2 min.
PODMAN_HOME=${PODMAN_HOME:-/tmp/podman-here}
mkdir -p "$PODMAN_HOME"
cat > "$PODMAN_HOME/storage.conf" <<EOC
[storage]
driver = "overlay"
runroot = "$PODMAN_HOME/run"
graphroot = "$PODMAN_HOME/storage"
EOC
cat > "$PODMAN_HOME/containers.conf" <<'EOC'
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=16384:16384"]
volumes = ["/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOC
export CONTAINERS_STORAGE_CONF="$PODMAN_HOME/storage.conf" CONTAINERS_CONF="$PODMAN_HOME/containers.conf" BUILDAH_ISOLATION=chroot

_podman_here_setup() {
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
      podman buildah runc mmdebstrap uidmap fuse-overlayfs >/dev/null || return 1
  fi
  if podman image exists docker.io/library/python:3.11-slim 2>/dev/null; then return 0; fi
  local cache="$PODMAN_HOME/base-rootfs.tar"
  if [ ! -s "$cache" ]; then
    # the same Debian mirror this machine's apt uses
    local mirror
    mirror=$(sed -n 's/^URIs: *\(\S*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    [ -n "$mirror" ] || mirror=$(sed -n 's/^deb \(\S*\/debian\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n1)
    local root="$PODMAN_HOME/rootfs"
    rm -rf "$root"
    mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$root" "$mirror" >"$PODMAN_HOME/mmdebstrap.log" 2>&1 || { echo "podman-here: base rootfs failed, see $PODMAN_HOME/mmdebstrap.log" >&2; return 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
    rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
    ln -sf python3 "$root/usr/bin/python"; ln -sf pip3 "$root/usr/bin/pip"
    tar -C "$root" -cf "$cache" . && rm -rf "$root"
  fi
  podman import -q --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' "$cache" localhost/python:3.11-slim >/dev/null || return 1
  podman tag localhost/python:3.11-slim docker.io/library/python:3.11-slim
}
_podman_here_setup || echo "podman-here: setup failed" >&2
