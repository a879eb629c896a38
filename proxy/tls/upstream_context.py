"""Client-side SSLContexts for ``https://`` upstreams (``services[].upstream_tls``).

Built once per config generation (``proxy.server.generation``), one per service with
https:// upstreams, from the same file verdicts the server side uses
(``proxy.tls.loading``), so a bad file is a ConfigError naming its key at start, on
reload and in ``tlsproxy check``. Each context:

* TLS 1.2 or 1.3 only, no compression, no renegotiation; OpenSSL's default client
  ciphers (its security level already refuses the weak ones);
* verifies the upstream's chain against ``upstream_tls.ca``, or the system's trust store
  (OpenSSL's default verify paths: no bundled CA list) when it is not set, and the name
  ``server_name`` (default: the URL's host; an IP address is matched against IP SANs).
  There is no switch to turn verification off: a proxy that adds mTLS must not
  quietly talk to whoever answers;
* presents ``upstream_tls.cert`` / ``key`` when set (mTLS on the way out);
* offers ``http/1.1`` by ALPN, or with ``http2: true`` only ``h2`` (the service's
  requests then go as HTTP/2 streams, ``proxy.server.h2_upstream``; an upstream that
  does not select h2 gets no request — 502 saying so).

``UpstreamTLS.pool_key`` keeps pooled connections apart: a connection made with one
context (one service's settings, in one generation) is never lent to a request that
would have used another — so a reload that changes ``upstream_tls`` (or a certificate
file) makes the next request connect afresh with the new certificate.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Mapping
from pathlib import Path

from proxy.config.model import CertificatePair, ProxyConfig, Service, Upstream, UpstreamTLSSettings
from proxy.errors import ConfigError, PKIError
from proxy.tls.loading import load_cert_chain, load_matching_key, load_pem_certificates

__all__ = ["ALPN", "UpstreamTLS", "build_upstream_tls", "upstream_tls_contexts"]

ALPN = ["http/1.1"]
ALPN_HTTP2 = ["h2"]
_tokens = itertools.count(1)  # one per UpstreamTLS built in this process


class UpstreamTLS:
    """One service's upstream TLS settings, as a built context (immutable once built)."""

    __slots__ = ("service", "context", "server_name", "trust", "certificate", "files", "_token")

    def __init__(
        self,
        service: str,
        context: ssl.SSLContext,
        server_name: str | None,
        trust: str,
        files: tuple[Path, ...],
        *,
        certificate: Path | None = None,
    ) -> None:
        self.service = service
        self.context = context
        self.certificate = certificate  # upstream_tls.cert, presented upstream (None: no client cert)
        self.server_name = server_name  # None: each upstream's own host
        self.trust = trust  # in words, for errors: "upstream_tls.ca (ca.pem)" or "the system trust store"
        self.files = files  # watched: a change reloads
        self._token = f"#tls{next(_tokens)}"

    @property
    def presents_certificate(self) -> bool:
        return self.certificate is not None

    def server_hostname(self, upstream: Upstream) -> str:
        """The name sent as SNI and verified (Python sends no SNI for an IP address)."""
        return self.server_name or upstream.host

    def pool_key(self, upstream: Upstream) -> str:
        """The pool key of connections to ``upstream`` made with this context."""
        return upstream.url + self._token


def build_upstream_tls(service: Service, key: str, error) -> UpstreamTLS:
    """The context for ``service`` (whose upstreams are https://); ``key`` is the config
    key path of its ``upstream_tls`` and ``error(key, reason)`` makes the ConfigError."""
    settings = service.upstream_tls or UpstreamTLSSettings()
    files: list[Path] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(ALPN_HTTP2 if settings.http2 else ALPN)
    if settings.ca is not None:
        files.append(settings.ca)
        try:
            load_pem_certificates(settings.ca)
            context.load_verify_locations(cafile=settings.ca)
        except PKIError as exc:
            raise error(f"{key}.ca", str(exc)) from None
        except (ssl.SSLError, OSError) as exc:
            raise error(f"{key}.ca", f"{settings.ca}: not a usable CA bundle ({exc})") from None
        trust = f"upstream_tls.ca ({settings.ca.name})"
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        trust = "the system trust store"
    if settings.cert is not None and settings.key is not None:
        pair = CertificatePair(settings.cert, settings.key)
        files += [pair.cert, pair.key]
        try:
            leaf = load_pem_certificates(pair.cert)[0]
        except PKIError as exc:
            raise error(f"{key}.cert", str(exc)) from None
        try:
            load_matching_key(pair, leaf)
        except PKIError as exc:
            raise error(f"{key}.key", str(exc)) from None
        try:
            load_cert_chain(context, pair)
        except PKIError as exc:
            raise error(f"{key}.cert", str(exc)) from None
    return UpstreamTLS(
        service.name, context, settings.server_name, trust, tuple(files),
        certificate=settings.cert if settings.key is not None else None,
    )


def upstream_tls_contexts(config: ProxyConfig) -> Mapping[str, UpstreamTLS]:
    """Service name -> UpstreamTLS, for every service with https:// upstreams."""
    source = str(config.source) if config.source is not None else "<command line>"

    def error(key: str, reason: str) -> ConfigError:
        return ConfigError(source, config.line_of(key), key, reason)

    return {
        service.name: build_upstream_tls(service, f"services[{index}].upstream_tls", error)
        for index, service in enumerate(config.services)
        if service.upstream_scheme == "https"
    }
