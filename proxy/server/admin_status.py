"""The status page's data, gathered from a running proxy (``proxy.ops.status_page``
renders it). Reads the current generation (config, server certificates, client CAs, the
client certificates presented to https:// upstreams) and the events merged over every
worker; the certificate files are read again per page view (a few small files, only when
someone looks) for subjects and SANs."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence

from cryptography import x509

from proxy import __version__
from proxy.config.model import AllowEntry, ProxyConfig, Service
from proxy.ops.status_page import CertificateRow, ServiceRow, StatusView, render_status_page
from proxy.server.expiry import certificates_in_files, subject_of
from proxy.server.state import ServerState

__all__ = ["status_page"]

log = logging.getLogger("tlsproxy")


def status_page(state: ServerState, events: Callable[[], dict], bound: Sequence[str] = ()) -> bytes:
    """The HTML of ``GET /`` for ``state``; ``events``: every worker's events, merged;
    ``bound``: the TLS listeners' real addresses (port 0 in the config is a real port here)."""
    config = state.config
    tls = state.tls
    certificates = [
        CertificateRow("server", path, subject_of(cert), _sans(cert), cert.not_valid_after_utc)
        for path, cert in certificates_in_files([loaded.path for loaded in tls.certificates], log)
    ]
    upstream_clients = {str(tls.certificate): name for name, tls in state.generation.upstream_tls.items() if tls.certificate}
    certificates += [
        CertificateRow(f"client, to {upstream_clients[path]}'s upstream", path, subject_of(cert), _sans(cert),
                       cert.not_valid_after_utc)
        for path, cert in certificates_in_files(list(upstream_clients), log)
    ]
    ca_path = str(config.client_auth.ca) if config.client_auth.ca is not None else ""
    certificates += [
        CertificateRow("client CA", ca_path, subject_of(ca), _sans(ca), ca.not_valid_after_utc) for ca in tls.client_cas
    ]
    view = StatusView(
        now=dt.datetime.now(dt.timezone.utc),
        version=__version__,
        workers=config.workers,
        listeners=_listeners(config, bound),
        client_auth=_listener_policy(config),
        services=tuple(_service_row(service) for service in config.services),
        certificates=tuple(certificates),
        events=events(),
    )
    return render_status_page(view)


def _listeners(config: ProxyConfig, bound: Sequence[str]) -> tuple[tuple[str, str], ...]:
    tls = config.tls
    alpn = ", ".join(getattr(tls, "alpn", ("http/1.1",)))
    addresses = bound if len(bound) == len(config.listen) else [str(address) for address in config.listen]
    rows = [(address, f"HTTPS: TLS {tls.min_version}+, ALPN {alpn}") for address in addresses]
    rows += [(str(address), "plain HTTP and h2c (listen_plain)") for address in getattr(config, "listen_plain", ())]
    if config.redirect_http is not None:
        rows.append((str(config.redirect_http), "plain HTTP: 308 to https://"))
    if config.admin.listen is not None:
        rows.append((str(config.admin.listen), "admin (plain HTTP): / /healthz /readyz /metrics /ca.pem /trust"))
    return tuple(rows)


def _allow(entries: tuple[AllowEntry, ...]) -> str:
    return " or ".join(f"{entry.kind}={entry.value}" for entry in entries)


def _listener_policy(config: ProxyConfig) -> str:
    auth = config.client_auth
    words = f"mode {auth.mode}"
    if auth.mode != "none":
        words += f", CA {auth.ca}" + (f", CRL {auth.crl}" if auth.crl else "")
        words += f", allow {_allow(auth.allow)}" if auth.allow else ", any certificate from the CA"
        words += f", forwarded as {auth.forward}"
    return words


def _service_row(service: Service) -> ServiceRow:
    hosts = ", ".join(service.hosts) if service.hosts else "any host"
    policy = service.client_auth
    if policy is None:
        words = "listener's policy only"
    else:
        words = "required" if policy.require else "optional"
        if policy.allow:
            words += f"; allow {_allow(policy.allow)}"
    return ServiceRow(
        name=service.name,
        routes=f"{hosts}, path {service.path_prefix}" + (" (prefix stripped)" if service.strip_prefix else ""),
        upstreams=tuple(upstream.url for upstream in service.upstreams),
        client_auth=words,
    )


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(getattr(name, "value", name)) for name in extension)
