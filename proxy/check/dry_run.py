"""``tlsproxy check --client-cert F --url URL``: would this certificate reach this URL?

The same three steps the proxy takes for a real request, without a socket:

1. routing (``proxy.forwarding.paths`` then ``proxy.forwarding.routing``): the path read
   as the proxy reads it (a spelling it refuses is a 400), then the service the URL's
   host and that path reach;
2. the handshake: when the listener asks for client certificates, the certificate must
   verify against ``client_auth.ca`` (and the CRL) for the clientAuth purpose, or the
   handshake fails before any HTTP (``proxy.pki.verify``);
3. authorization (``proxy.tls.authz``): listener allow-list, then the service's policy.

The answer is a verdict plus the lines that explain it; the command prints them and
exits 0 (admitted) or 1 (refused).
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import Encoding

from proxy.config.model import ProxyConfig
from proxy.errors import BadRequest, UsageError, VerificationFailed
from proxy.forwarding.paths import normalize_target
from proxy.forwarding.routing import Router
from proxy.pki import store
from proxy.pki.verify import verify_certificate
from proxy.tls.authz import authorize_request
from proxy.tls.crl import crl_for, load_client_crls
from proxy.tls.identity import ClientIdentity
from proxy.tls.loading import client_verify_mode, load_pem_certificates


@dataclass(frozen=True)
class AccessVerdict:
    admitted: bool
    lines: tuple[str, ...]  # what happened at each step, for a person to read


def handshake_asks_for_certificate(config: ProxyConfig) -> bool:
    """Whether the TLS handshake requests a client certificate at all: the listener's
    mode, or any service with a per-request policy (SPEC section 3: such a service makes
    the handshake ask, as ``optional``). The same decision ``proxy.tls.context`` makes."""
    return client_verify_mode(config.client_auth, config.services) != ssl.CERT_NONE


def split_url(url: str) -> tuple[str, str]:
    """``https://host[:port]/path?q`` -> (Host header value, request target). The
    fragment is left out, as HTTP clients leave it out of what they send."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.netloc:
        raise UsageError(f"--url: '{url}' is not an https:// URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.netloc.rpartition("@")[2], target


def explain_access(
    config: ProxyConfig, client_cert: Path, url: str, *, now: dt.datetime | None = None
) -> AccessVerdict:
    """Route the URL, verify the certificate as the handshake would, then authorize."""
    host, target = split_url(url)
    try:
        path = normalize_target(target.encode("utf-8"))
    except BadRequest as exc:
        return AccessVerdict(False, (f"refused: {exc} (400)",))
    service = Router(config.services).route(host, path)
    if service is None:
        return AccessVerdict(False, (f"refused: no service matches host '{host}' and path '{path.path}' (404)",))
    upstreams = ", ".join(u.url for u in service.upstreams)
    lines = [f"{url} -> service '{service.name}' ({upstreams})"]

    certs = store.load_certificates(client_cert)
    leaf, presented_chain = certs[0], certs[1:]
    identity = None
    if not handshake_asks_for_certificate(config):
        lines.append("handshake: no client certificate is asked for, so none is sent")
    else:
        assert config.client_auth.ca is not None  # the loader requires it whenever the handshake asks
        roots = load_pem_certificates(config.client_auth.ca)
        crls = load_client_crls(config.client_auth.crl, roots, now=now) if config.client_auth.crl is not None else []
        crl = crl_for(crls, leaf)
        try:
            verified = verify_certificate(
                leaf, roots, intermediates=presented_chain, purpose="client", crl=crl, at=now
            )
        except VerificationFailed as exc:
            lines.append(f"refused: the TLS handshake fails: {exc}")
            return AccessVerdict(False, tuple(lines))
        identity = ClientIdentity.from_der(
            leaf.public_bytes(Encoding.DER), [cert.public_bytes(Encoding.DER) for cert in verified.chain[1:]]
        )
        lines.append(f"handshake: {identity.describe()} verifies against client_auth.ca")

    decision = authorize_request(identity, config.client_auth, service.client_auth, service.name)
    lines.append(f"{'admitted' if decision.allowed else 'refused'}: {decision.reason}")
    return AccessVerdict(decision.allowed, tuple(lines))
