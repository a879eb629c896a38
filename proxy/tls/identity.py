"""Who the client is, from the certificate verified in this connection's handshake.

``client_identity`` turns the handshake's peer certificate into a ``ClientIdentity`` once
per connection (parsing is cached by DER, so a client that reconnects costs a dict
look-up). ``identity_headers`` renders that identity for the upstream in one of the
SPEC's forward modes, and ``is_identity_header`` tells the header rewriter which
incoming names to strip, because a client must never be able to forge its identity
by sending these headers itself.

Everything here is pure except ``client_identity``, which only calls
``ssl_object.getpeercert(binary_form=True)``.

Every string field that reaches a header or a log (subject, issuer, SANs) is made
printable ASCII at parse time: characters outside 0x20-0x7E become RFC 4514 ``\\XX``
escapes of their UTF-8 bytes, so a certificate cannot smuggle CR/LF into a header.
``common_names`` and ``organizational_units`` keep their raw text because
allow-lists compare them with what the operator typed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID

from proxy.errors import PKIError

__all__ = [
    "ClientIdentity",
    "client_identity",
    "identity_headers",
    "is_identity_header",
]

# A verified chain is never deeper than this; the bound only guards against a CA
# bundle whose names form a cycle.
_MAX_CHAIN = 8


class _PeerCertSource(Protocol):
    """``ssl.SSLObject`` or ``ssl.SSLSocket``: the part of them we use."""

    def getpeercert(self, binary_form: bool = ...) -> Any: ...


def _printable(text: str) -> str:
    """Escape everything but printable ASCII as RFC 4514 hex pairs (header-safe)."""
    if text.isascii() and text.isprintable():
        return text
    out = []
    for char in text:
        if " " <= char <= "~":
            out.append(char)
        else:
            out.extend(f"\\{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def _attribute_values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    return tuple(str(attr.value) for attr in name.get_attributes_for_oid(oid))


def _subject_alt_names(cert: x509.Certificate) -> tuple[tuple[str, str], ...]:
    """SANs in certificate order as (kind, value); kind is DNS, IP, URI or email."""
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return ()
    kinds = {
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.UniformResourceIdentifier: "URI",
        x509.RFC822Name: "email",
    }
    sans = []
    for general in ext.value:
        kind = kinds.get(type(general))
        if kind is not None:
            sans.append((kind, _printable(str(general.value))))
    return tuple(sans)


@dataclass(frozen=True)
class ClientIdentity:
    """A verified client certificate, parsed once.

    ``chain_der`` holds the issuers above the leaf (nearest first), possibly including
    the trust anchor; it is empty when the chain is unknown.
    """

    leaf_der: bytes
    chain_der: tuple[bytes, ...]
    subject: str  # RFC 4514, most specific first: "CN=alice,O=Example"
    issuer: str
    serial: str  # lowercase hex, even length
    fingerprint_sha256: str  # lowercase hex of sha256(leaf_der), no colons
    common_names: tuple[str, ...]
    organizational_units: tuple[str, ...]
    subject_alt_names: tuple[tuple[str, str], ...]  # (kind, value) in certificate order
    not_after: datetime  # timezone-aware UTC
    _rendered: dict[str, tuple[tuple[bytes, bytes], ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def from_der(cls, leaf_der: bytes, chain: Sequence[bytes] = ()) -> ClientIdentity:
        """Parse a DER leaf; PKIError if it is not a certificate cryptography can read."""
        return _parse(bytes(leaf_der), tuple(bytes(der) for der in chain))

    @property
    def dns_sans(self) -> tuple[str, ...]:
        return self._sans_of("DNS")

    @property
    def uri_sans(self) -> tuple[str, ...]:
        return self._sans_of("URI")

    @property
    def email_sans(self) -> tuple[str, ...]:
        return self._sans_of("email")

    @property
    def ip_sans(self) -> tuple[str, ...]:
        return self._sans_of("IP")

    def _sans_of(self, kind: str) -> tuple[str, ...]:
        return tuple(value for k, value in self.subject_alt_names if k == kind)

    def describe(self) -> str:
        """How a log line or a 403 body names this certificate (subject, else hash)."""
        return self.subject or f"with empty subject, sha256:{self.fingerprint_sha256}"


@functools.lru_cache(maxsize=1024)
def _parse(leaf_der: bytes, chain: tuple[bytes, ...]) -> ClientIdentity:
    try:
        cert = x509.load_der_x509_certificate(leaf_der)
        subject = cert.subject
        return ClientIdentity(
            leaf_der=leaf_der,
            chain_der=chain,
            subject=_printable(subject.rfc4514_string()),
            issuer=_printable(cert.issuer.rfc4514_string()),
            serial=_serial_hex(cert.serial_number),
            fingerprint_sha256=hashlib.sha256(leaf_der).hexdigest(),
            common_names=_attribute_values(subject, NameOID.COMMON_NAME),
            organizational_units=_attribute_values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
            subject_alt_names=_subject_alt_names(cert),
            not_after=cert.not_valid_after_utc,
        )
    except ValueError as exc:  # cryptography's parse errors (and bad extensions)
        raise PKIError(f"client certificate could not be parsed: {exc}") from exc


def _serial_hex(serial: int) -> str:
    digits = f"{serial:x}"
    return digits if len(digits) % 2 == 0 else "0" + digits


def client_identity(
    ssl_object: _PeerCertSource, trusted_cas: Sequence[x509.Certificate]
) -> ClientIdentity | None:
    """The identity of the handshake's verified peer, or None when it sent no certificate.

    Call it once per connection, after the handshake. Python 3.11 has no API for the
    verified chain, so the issuers above the leaf are looked up in ``trusted_cas`` (the
    listener's client CA bundle) by issuer name, AKI/SKI and signature. An intermediate
    the client sent itself but that is not in the bundle ends the chain there.
    Raises PKIError if OpenSSL accepted a certificate cryptography cannot parse.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return _identity_with_chain(der, tuple(trusted_cas))


@functools.lru_cache(maxsize=1024)
def _identity_with_chain(
    leaf_der: bytes, trusted_cas: tuple[x509.Certificate, ...]
) -> ClientIdentity:
    ClientIdentity.from_der(leaf_der)  # PKIError here, before any chain work
    chain = _chain_above(x509.load_der_x509_certificate(leaf_der), trusted_cas)
    return ClientIdentity.from_der(leaf_der, [cert.public_bytes(Encoding.DER) for cert in chain])


def _chain_above(
    cert: x509.Certificate, trusted_cas: tuple[x509.Certificate, ...]
) -> list[x509.Certificate]:
    chain: list[x509.Certificate] = []
    current = cert
    while len(chain) < _MAX_CHAIN and current.issuer != current.subject:
        issuer = _find_issuer(current, trusted_cas)
        if issuer is None or issuer in chain:
            break
        chain.append(issuer)
        current = issuer
    return chain


def _find_issuer(
    cert: x509.Certificate, candidates: tuple[x509.Certificate, ...]
) -> x509.Certificate | None:
    """The CA that signed ``cert``: same name, matching key id, and a valid signature."""
    wanted_key_id = _authority_key_id(cert)
    for ca in candidates:
        if ca.subject != cert.issuer:
            continue
        if wanted_key_id is not None and _subject_key_id(ca) not in (None, wanted_key_id):
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    return None


def _authority_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def _subject_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


# --- headers for the upstream ------------------------------------------------------

XFCC = b"X-Forwarded-Client-Cert"
CLIENT_CERT = b"Client-Cert"
CLIENT_CERT_CHAIN = b"Client-Cert-Chain"
_HEADERS_PREFIX = "X-Client-Cert-"


def identity_headers(identity: ClientIdentity | None, mode: str) -> list[tuple[bytes, bytes]]:
    """The headers that carry ``identity`` upstream in forward ``mode``.

    Modes (SPEC section 4):

    ``xfcc``
        ``X-Forwarded-Client-Cert: Hash=<hex>;Subject="<RFC 4514 DN>";URI=<uri>;DNS=<dns>``
        as Envoy writes it: one ``URI=`` per URI SAN, then one ``DNS=`` per DNS SAN.
        Subject is always quoted; any other value is quoted when it contains
        ``, ; = "`` or ``\\``, and inside quotes ``"`` and ``\\`` get a backslash.
    ``rfc9440``
        ``Client-Cert: :<base64 DER>:`` and, when the chain is known,
        ``Client-Cert-Chain: :<b64>:, :<b64>:`` (issuers, nearest first).
    ``headers``
        ``X-Client-Cert-Subject`` / ``-Issuer`` (RFC 4514), ``-Serial`` (lowercase hex),
        ``-Fingerprint`` (``sha256:`` + lowercase hex), ``-SAN`` and ``-Not-After``
        (RFC 3339 UTC, ``2027-01-31T12:00:00Z``). ``-SAN`` lists every SAN in
        certificate order as ``KIND:value`` joined by ``", "`` with KIND one of
        ``DNS``, ``IP``, ``URI``, ``email`` (OpenSSL's spelling, e.g.
        ``DNS:api.example.com, URI:spiffe://corp/api, email:ops@example.com``); a comma
        or backslash inside a value gets a backslash in front. Omitted when there are
        no SANs.
    ``none``
        nothing.

    No identity gives no headers in every mode. The result is a new list (callers may
    extend it); the rendering itself is cached on the identity.
    """
    if identity is None or mode == "none":
        return []
    rendered = identity._rendered.get(mode)
    if rendered is None:
        render = _RENDERERS.get(mode)
        if render is None:
            raise ValueError(f"unknown forward mode {mode!r}")
        rendered = tuple((name, value.encode("ascii")) for name, value in render(identity))
        identity._rendered[mode] = rendered
    return list(rendered)


def _xfcc_value(value: str, *, always_quote: bool = False) -> str:
    if not always_quote and not any(char in value for char in ',;="\\'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_xfcc(identity: ClientIdentity) -> list[tuple[bytes, str]]:
    parts = [
        f"Hash={identity.fingerprint_sha256}",
        f"Subject={_xfcc_value(identity.subject, always_quote=True)}",
    ]
    parts += [f"URI={_xfcc_value(uri)}" for uri in identity.uri_sans]
    parts += [f"DNS={_xfcc_value(dns)}" for dns in identity.dns_sans]
    return [(XFCC, ";".join(parts))]


def _sf_binary(der: bytes) -> str:
    """An RFC 8941 byte sequence, as RFC 9440 carries certificates."""
    return ":" + base64.b64encode(der).decode("ascii") + ":"


def _render_rfc9440(identity: ClientIdentity) -> list[tuple[bytes, str]]:
    headers = [(CLIENT_CERT, _sf_binary(identity.leaf_der))]
    if identity.chain_der:
        headers.append((CLIENT_CERT_CHAIN, ", ".join(_sf_binary(der) for der in identity.chain_der)))
    return headers


def _san_list(identity: ClientIdentity) -> str:
    return ", ".join(
        f"{kind}:" + value.replace("\\", "\\\\").replace(",", "\\,")
        for kind, value in identity.subject_alt_names
    )


def _render_headers(identity: ClientIdentity) -> list[tuple[bytes, str]]:
    fields = [
        ("Subject", identity.subject),
        ("Issuer", identity.issuer),
        ("Serial", identity.serial),
        ("Fingerprint", f"sha256:{identity.fingerprint_sha256}"),
        ("SAN", _san_list(identity)),
        ("Not-After", identity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")),
    ]
    return [(f"{_HEADERS_PREFIX}{name}".encode("ascii"), value) for name, value in fields if value]


_RENDERERS = {"xfcc": _render_xfcc, "rfc9440": _render_rfc9440, "headers": _render_headers}


# --- which incoming headers to strip --------------------------------------------------

# SPEC section 4's list, lowercase, with "_" already turned into "-". Bare
# "x-client-cert" is included too: it is what many nginx setups forward the PEM as, so
# an app may trust it. The other proxies' names are here because an upstream built
# behind nginx (X-SSL-Client-*, X-SSL-Cert, X-Client-Verify, X-Client-DN), Traefik
# (X-Forwarded-Tls-Client-Cert*), IIS/Azure (X-ARR-ClientCert), AWS
# (X-Amzn-Mtls-Clientcert*) or Apache/CGI (SSL_CLIENT_*) takes them as the proxy's word.
_EXACT_NAMES = frozenset(
    {
        b"x-forwarded-client-cert",
        b"client-cert",
        b"client-cert-chain",
        b"x-client-cert",
        b"x-ssl-cert",
        b"x-client-verify",
        b"x-client-dn",
        b"x-arr-clientcert",
    }
)
_PREFIXES = (
    b"x-client-cert-",
    b"x-ssl-client-",
    b"x-forwarded-tls-client-cert",
    b"x-amzn-mtls-clientcert",
    b"ssl-client-",
)
_FIRST_BYTES = b"xXcCsS"  # every name above starts with one of these


def is_identity_header(name: bytes) -> bool:
    """True for a name that claims a client identity and must never come from the client.

    The SPEC's list: X-Forwarded-Client-Cert, Client-Cert, Client-Cert-Chain,
    X-Client-Cert and every X-Client-Cert-*, and the names other proxies use
    (X-SSL-Client-*, X-SSL-Cert, X-Client-Verify, X-Client-DN,
    X-Forwarded-Tls-Client-Cert*, X-ARR-ClientCert, X-Amzn-Mtls-Clientcert*,
    SSL_CLIENT_*), compared case-insensitively with ``_`` equal to ``-`` (WSGI/CGI
    servers read ``X_Client_Cert_Subject`` as ``X-Client-Cert-Subject``).
    """
    if not name or name[0] not in _FIRST_BYTES:  # most request headers leave here, without copying
        return False
    normal = name.lower().replace(b"_", b"-")
    return normal in _EXACT_NAMES or normal.startswith(_PREFIXES)
