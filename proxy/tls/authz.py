"""Client-certificate authorization: plain data in, a Decision out, no I/O.

Allow-lists grant when ANY entry matches and deny by default; every decision carries
a reason in words, and a refusal's reason is the 403 body (it names the certificate
and the service). The handshake has already verified the certificate against the
trusted CAs; this module only decides whether that verified identity may reach a
service.

Two rules beyond the SPEC's table, both fail-safe:

* a non-empty allow list can only admit a certificate, so it refuses a client that
  sent none even when ``require`` is false (otherwise omitting the certificate would
  get more access than presenting an unlisted one);
* ``misdirected`` compares the *effective* policies, so an empty ``client_auth`` and
  no ``client_auth`` count as the same policy and entry order does not matter.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from proxy.config.model import AllowEntry, ClientAuthSettings, Service, ServiceClientAuth
from proxy.tls.identity import ClientIdentity

__all__ = ["Decision", "authorize", "authorize_request", "policy_key", "misdirected"]


@dataclass(frozen=True)
class Decision:
    """Whether a request may pass, and why (the refusal reason is the 403 body)."""

    allowed: bool
    reason: str


@dataclass(frozen=True)
class _CompiledAllow:
    """An allow list as sets, so a check is a few set look-ups whatever its length."""

    cns: frozenset[str]
    ous: frozenset[str]
    dns_exact: frozenset[str]
    dns_parents: frozenset[str]  # "*.example.com" stored as "example.com"
    uris: frozenset[str]
    emails: frozenset[str]
    fingerprints: frozenset[str]


def _dns_key(name: str) -> str:
    return name.lower().rstrip(".")


@functools.lru_cache(maxsize=256)
def _compile(allow: tuple[AllowEntry, ...]) -> _CompiledAllow:
    def values(kind: str) -> list[str]:
        return [entry.value for entry in allow if entry.kind == kind]

    dns = [_dns_key(value) for value in values("dns")]
    return _CompiledAllow(
        cns=frozenset(values("cn")),
        ous=frozenset(values("ou")),
        dns_exact=frozenset(name for name in dns if not name.startswith("*.")),
        dns_parents=frozenset(name[2:] for name in dns if name.startswith("*.")),
        uris=frozenset(values("uri")),
        emails=frozenset(value.lower() for value in values("email")),
        fingerprints=frozenset(value.lower() for value in values("fingerprint")),
    )


def _first_match(identity: ClientIdentity, rules: _CompiledAllow) -> str | None:
    """The allow entry (as ``kind=value``) that admits ``identity``, or None."""
    for cn in identity.common_names:
        if cn in rules.cns:
            return f"cn={cn}"
    for ou in identity.organizational_units:
        if ou in rules.ous:
            return f"ou={ou}"
    for dns in identity.dns_sans:
        name = _dns_key(dns)
        if name in rules.dns_exact:
            return f"dns={name}"
        label, dot, parent = name.partition(".")
        if label and dot and parent in rules.dns_parents:  # "*." spans exactly one label
            return f"dns=*.{parent}"
    for uri in identity.uri_sans:
        if uri in rules.uris:
            return f"uri={uri}"
    for email in identity.email_sans:
        if email.lower() in rules.emails:
            return f"email={email.lower()}"
    if identity.fingerprint_sha256 in rules.fingerprints:
        return f"fingerprint=sha256:{identity.fingerprint_sha256}"
    return None


@functools.lru_cache(maxsize=256)
def _not_required(service: str) -> Decision:
    """The one decision every connection without a certificate to a service without
    client_auth gets, made once (connections keep their decision: ~0.2 KiB each)."""
    return Decision(True, f"service '{service}' does not require a client certificate")


def authorize(
    identity: ClientIdentity | None,
    allow: Sequence[AllowEntry],
    *,
    require: bool,
    service: str,
) -> Decision:
    """Decide one policy: ``require`` a certificate, and/or admit only ``allow``.

    No certificate: refused when ``require`` or a non-empty ``allow``, else admitted.
    A certificate: admitted when ``allow`` is empty (any verified certificate) or any
    entry matches (cn, ou exact; dns exact or ``*.parent`` for exactly one label,
    case-insensitive; uri exact; email case-insensitive; fingerprint lowercase hex).
    """
    if identity is None:
        if require:
            return Decision(False, f"no client certificate was presented; service '{service}' requires one")
        if allow:
            return Decision(
                False,
                f"no client certificate was presented; service '{service}' admits only listed certificates",
            )
        return _not_required(service)
    certificate = f"certificate {identity.describe()}"
    if not allow:
        return Decision(True, f"{certificate} is verified; service '{service}' has no allow list")
    matched = _first_match(identity, _compile(tuple(allow)))
    if matched is None:
        return Decision(False, f"{certificate} is not allowed for service '{service}'")
    return Decision(True, f"{certificate} is allowed for service '{service}' by {matched}")


_NO_SERVICE_POLICY = ServiceClientAuth()


def authorize_request(
    identity: ClientIdentity | None,
    listener: ClientAuthSettings,
    service_auth: ServiceClientAuth | None,
    service_name: str,
) -> Decision:
    """Listener policy AND service policy; the first refusal wins.

    The listener's allow list applies to every service when its mode is not ``none``
    (with mode ``require`` a missing certificate is refused here too, although the
    handshake normally refused it already).
    """
    listener_requires = listener.mode == "require"
    if listener.mode != "none" and (listener.allow or listener_requires):
        decision = authorize(identity, listener.allow, require=listener_requires, service=service_name)
        if not decision.allowed:
            return decision
    if service_auth is None:
        service_auth = _NO_SERVICE_POLICY
    return authorize(identity, service_auth.allow, require=service_auth.require, service=service_name)


def policy_key(listener: ClientAuthSettings, service_auth: ServiceClientAuth | None) -> Hashable:
    """A value equal for two services exactly when they admit the same clients.

    Normalised: no ``client_auth`` equals an empty one, a non-empty allow list implies
    ``require`` (see the module docstring), entry order and duplicates do not matter.
    """
    listener_part = (
        (listener.mode, frozenset(listener.allow)) if listener.mode != "none" else ("none", frozenset())
    )
    allow = frozenset(service_auth.allow) if service_auth else frozenset()
    require = bool(service_auth and service_auth.require) or bool(allow)
    return (listener_part, require, allow)


def misdirected(
    sni_service: Service | None, host_service: Service | None, listener: ClientAuthSettings
) -> bool:
    """True when Host reaches a service with another client-auth policy than SNI chose.

    The proxy answers such a request with 421 (SPEC section 4): the handshake was
    negotiated for the SNI's service, so a lax SNI must not open a strict service.
    False when either side is unknown (no SNI, or no service matched) or the
    policies are equal.
    """
    if sni_service is None or host_service is None or sni_service is host_service:
        return False
    return policy_key(listener, sni_service.client_auth) != policy_key(listener, host_service.client_auth)
