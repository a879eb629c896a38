"""Config generations (STYLE "Publish, don't mutate"): everything a request is decided
with, built from one config in one function and published with one assignment.

A ``Generation`` is frozen: the config, the TLS contexts (with the client CAs and CRLs
they verified; and the client contexts for https:// upstreams), the router and the
engine factory; it decides admissions and renders
identity headers. ``build_generation`` makes one (on a reload, off the event loop: it reads
certificate files and builds SSL contexts); ``ServerState.generation`` is the one
reference a reload replaces. Each request reads that reference once, at its start, and
decides everything with the generation it got. What a connection caches about its
client (authorization decisions, rendered identity headers) is kept per generation
(``ClientInfo.generation``), so a reload invalidates it by construction: the next
request on a connection opened before the reload is decided by the new rules — its
certificate checked again against the new client CAs and CRL (``still_trusts``), then
the new allow-lists.

Settings bound to sockets and processes (``FIXED``) cannot change without a restart:
a new config that changes them is published with the running values and the change is
logged (``pin_fixed_settings``), never silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from proxy.config.model import ProxyConfig, Service
from proxy.errors import PKIError
from proxy.forwarding.routing import Router
from proxy.http.engines import EngineFactory, engine_factory
from proxy.pki.verify import verify_certificate
from proxy.tls.authz import Decision, authorize_request
from proxy.tls.context import ServerTLS
from proxy.tls.crl import crl_for
from proxy.tls.identity import ClientIdentity, identity_headers
from proxy.tls.upstream_context import UpstreamTLS, upstream_tls_contexts

__all__ = ["FIXED", "Generation", "build_generation", "pin_fixed_settings"]

IdentityHeaders = tuple[tuple[bytes, bytes], ...]

# Settings a reload cannot change (dotted names into ProxyConfig).
FIXED: tuple[str, ...] = (
    "listen", "listen_plain", "redirect_http", "admin", "workers", "limits.max_connections",
)


@dataclass(frozen=True, slots=True, eq=False)
class Generation:
    """One published config and everything built from it (compared by identity)."""

    config: ProxyConfig
    tls: ServerTLS
    router: Router
    engines: EngineFactory
    upstream_tls: Mapping[str, UpstreamTLS]  # service name -> context, https:// upstreams only

    @property
    def files(self) -> tuple[Path, ...]:
        """Every certificate, key, CA and CRL file this generation read (a change reloads)."""
        return (*self.tls.files, *(path for tls in self.upstream_tls.values() for path in tls.files))

    def still_trusts(self, identity: ClientIdentity) -> str | None:
        """None when this generation's client CAs (and CRL) accept the certificate a
        connection verified in its handshake under an earlier generation; else why not
        (revoked, CA no longer trusted, expired since). Then the connection's client
        counts as presenting no certificate."""
        if self.config.client_auth.mode == "none":
            return None  # no client certificates in this generation: nothing to check
        leaf = x509.load_der_x509_certificate(identity.leaf_der)
        try:
            verify_certificate(
                leaf,
                list(self.tls.client_cas),
                intermediates=[x509.load_der_x509_certificate(der) for der in identity.chain_der],
                purpose="client",
                crl=crl_for(self.tls.client_crls, leaf),
            )
        except (PKIError, ValueError) as exc:
            return str(exc)
        return None

    def authorize(self, identity: ClientIdentity | None, service: Service) -> Decision:
        """Listener policy AND the policy of ``service`` (routed by this generation)."""
        return authorize_request(identity, self.config.client_auth, service.client_auth, service.name)

    def identity_headers(self, identity: ClientIdentity | None) -> IdentityHeaders:
        """The client's identity rendered in this generation's ``forward`` mode."""
        if identity is None:
            return ()
        return tuple(identity_headers(identity, self.config.client_auth.forward))


def build_generation(config: ProxyConfig) -> Generation:
    """Build everything that depends on ``config``; ConfigError (bad TLS files...) before
    anything is published. Blocking (files, SSL contexts): run it off the event loop."""
    return Generation(
        config=config,
        tls=ServerTLS.from_config(config),
        router=Router(config.services),
        engines=engine_factory(config.http_engine),
        upstream_tls=upstream_tls_contexts(config),
    )


def _get(config: ProxyConfig, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _put(config: ProxyConfig, dotted: str, value: object) -> ProxyConfig:
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: _put(getattr(config, head), rest, value)})  # type: ignore[arg-type]


def pin_fixed_settings(running: ProxyConfig, new: ProxyConfig) -> tuple[ProxyConfig, list[str]]:
    """``new`` with the ``FIXED`` settings of ``running`` kept, and the names of those
    that differed (to be logged: they take a restart)."""
    changed = [name for name in FIXED if _get(new, name) != _get(running, name)]
    for name in changed:
        new = _put(new, name, _get(running, name))
    return new, changed
