#!/usr/bin/env bash
# Makes podman usable on a Debian machine without a container registry (like this project's
# CI) and provides a local `python:3.11-slim` base image, built from Debian packages.
#
# Provision once (as root: installs podman buildah runc mmdebstrap uidmap fuse-overlayfs with
# apt, then builds the base image; ~2 min, ~550 MB under $PODMAN_HOME, default /tmp/podman-here):
#        bash deploy/podman-here.sh
# Then, in each shell that runs podman (sets the environment below; idempotent, quick):
#        source deploy/podman-here.sh
#        podman build -t tlsproxy .
#        podman run -d --init --network host --name tp tlsproxy ...
#        podman healthcheck run tp                       # no systemd here: run health checks by hand
# PODMAN_HERE_INSTALL=0 only checks and says what is missing (the test suite sources it that
# way: tests install nothing). Why each setting: deploy/README.md, "Podman on Debian".
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
# BUILDAH_FORMAT=docker: podman's default OCI format silently drops HEALTHCHECK.
export CONTAINERS_STORAGE_CONF="$PODMAN_HOME/storage.conf" CONTAINERS_CONF="$PODMAN_HOME/containers.conf" \
  BUILDAH_ISOLATION=chroot BUILDAH_FORMAT=docker

_podman_here_setup() {
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then
    if [ "${PODMAN_HERE_INSTALL:-1}" = 0 ]; then
      echo "podman-here: podman, runc or mmdebstrap not installed (provision with: sudo bash deploy/podman-here.sh)" >&2
      return 1
    fi
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
      podman buildah runc mmdebstrap uidmap fuse-overlayfs >/dev/null || return 1
  fi
  if podman image exists docker.io/library/python:3.11-slim 2>/dev/null; then return 0; fi
  if [ "${PODMAN_HERE_INSTALL:-1}" = 0 ]; then
    echo "podman-here: no local python:3.11-slim base image (make it with: sudo bash deploy/podman-here.sh)" >&2
    return 1
  fi
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
