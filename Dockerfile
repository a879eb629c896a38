# tlsproxy: TLS-terminating reverse proxy with mutual TLS.
#
#   docker build -t tlsproxy .
#   docker run -p 8443:8443 -e TLSPROXY_UPSTREAM=http://app:8080 -v tlsproxy-ca:/certs/ca tlsproxy
#
# Layout inside the image (see deploy/README.md):
#   /config/proxy.yaml   the config (a default is baked in; mount your own /config to replace it)
#   /certs               certificates (mount read-only); /certs/ca is the CA directory that
#                        tls.auto issues from (a writable volume: the CA is created if missing)
#   /opt/tlsproxy        the installed package in a virtualenv (no source tree in the image)

# --- build: every wheel, then a venv holding only tlsproxy and its dependencies -----------------
FROM python:3.11-slim AS build
WORKDIR /src
# Only what the wheel needs (.dockerignore allows nothing else into the context).
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# The base image's own pip (which trusts the system CA store) fetches and builds the wheels;
# the venv then installs them offline, and loses pip and setuptools: nothing installs at run time.
RUN python3 -m pip wheel --no-cache-dir --wheel-dir /wheels . \
 && python3 -m venv /opt/tlsproxy \
 && /opt/tlsproxy/bin/pip install --no-cache-dir --no-index --find-links /wheels tlsproxy \
 && /opt/tlsproxy/bin/pip uninstall --yes pip setuptools \
 && /opt/tlsproxy/bin/tlsproxy --version

# --- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim
# A fixed uid/gid, so volume permissions (and Kubernetes runAsUser / fsGroup) can name it.
RUN groupadd --gid 10001 tlsproxy \
 && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin tlsproxy \
 && mkdir -p /config /certs/ca \
 && chown 10001:10001 /certs /certs/ca \
 && chmod 0700 /certs/ca
COPY --from=build /opt/tlsproxy /opt/tlsproxy
COPY deploy/container/proxy.yaml /config/proxy.yaml

# CMD is just `serve` and the config path comes from TLSPROXY_CONFIG, so `-e TLSPROXY_CONFIG=...`
# works without restating the command; `serve -c FILE` still overrides it.
# TLSPROXY_ADMIN is where the default config puts the admin listener.
ENV PATH=/opt/tlsproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TLSPROXY_CONFIG=/config/proxy.yaml \
    TLSPROXY_ADMIN=127.0.0.1:9901

# WORKDIR / makes the zero-config form's CA (`certs/ca`, relative) land in the /certs/ca volume.
WORKDIR /
USER 10001:10001
EXPOSE 8443

# The proxy runs as PID 1 and installs its own SIGTERM/SIGINT handlers (PID 1 has no default
# action for them): `docker stop` drains in-flight requests for up to timeouts.shutdown_grace
# (default 30 s) and exits 0, with or without `--init`.
STOPSIGNAL SIGTERM

# `tlsproxy health` reads the same config `serve` does ($TLSPROXY_CONFIG) and asks what it
# names: GET /healthz on admin.listen, whatever its port, or, with no admin listener, a TLS
# handshake on the first listen address. One line says what it checked (podman/docker inspect).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["tlsproxy", "health", "--timeout", "2"]

ENTRYPOINT ["tlsproxy"]
CMD ["serve"]
