"""Would a TLS client accept this certificate? If not, say why in one phrase.

Chain building is ``cryptography.x509.verification`` (the same web-PKI rules as browsers);
this module only orders the checks so the reason is the precise one. The verifier reports
every time fault as "not valid at validation time" and every path failure as "candidates
exhausted", so we look at the leaf first: self-signed? outside its validity window? does
it fit the host and purpose on its own (verified with itself as the only anchor)? Only
then is the chain to the trusted CAs built, and a failure there is about the issuer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from proxy.errors import PKIError, VerificationFailed
from proxy.pki.names import name_text, parse_name

PURPOSES = ("server", "client")
EXPIRED = "expired"
NOT_YET_VALID = "not yet valid"
HOSTNAME_MISMATCH = "hostname mismatch"
WRONG_EKU = "wrong EKU"
UNKNOWN_ISSUER = "unknown issuer"
SELF_SIGNED = "self-signed"
REVOKED = "revoked"
REVOCATION_UNKNOWN = "revocation status unknown"
UNSUPPORTED_ALGORITHM = "unsupported algorithm"
INVALID = "invalid certificate"

_PURPOSE_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


@dataclass(frozen=True)
class Verified:
    """A certificate a TLS client would accept: the chain from leaf to trust anchor."""

    chain: list[x509.Certificate]
    purpose: str
    host: str | None


def verify_certificate(
    leaf: x509.Certificate,
    roots: list[x509.Certificate],
    *,
    intermediates: Iterable[x509.Certificate] = (),
    host: str | None = None,
    purpose: str = "server",
    crl: x509.CertificateRevocationList | None = None,
    at: dt.datetime | None = None,
) -> Verified:
    """Verify LEAF against ROOTS as a TLS client (server purpose) or server (client
    purpose) would; raise VerificationFailed(reason, detail) naming the first fault.

    ``host`` is the name the client connects to; without it a server certificate is
    checked against its own first DNS/IP name (chain and purpose only).
    """
    if purpose not in PURPOSES:
        raise PKIError(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
    if not roots:
        raise PKIError("no trusted CA certificate given")
    moment = at or dt.datetime.now(dt.timezone.utc)
    # A root sent along in the chain (as our own PREFIX.pem files do) is never an
    # intermediate; offering it to the path builder only muddles the error.
    intermediates = [cert for cert in intermediates if not is_self_signed(cert)]
    if is_self_signed(leaf) and leaf not in roots:
        raise VerificationFailed(
            SELF_SIGNED, f"{_who(leaf)} is its own issuer and is not among the trusted CAs"
        )
    check_validity(leaf, moment)
    check_purpose(leaf, purpose)
    target = _target(leaf, host) if purpose == "server" else None
    _run(leaf, [leaf], [], target, moment, host=host, purpose=purpose)  # the leaf alone: names, EKU
    if isinstance(target, x509.DNSName):
        check_wildcard_depth(leaf, target.value)
    chain = _run(leaf, roots, intermediates, target, moment, host=host, purpose=purpose)
    if crl is not None:
        check_not_revoked(leaf, crl, chain)
    return Verified(chain=chain, purpose=purpose, host=host)


def check_validity(cert: x509.Certificate, moment: dt.datetime) -> None:
    """Raise ``expired`` / ``not yet valid`` with the date, before the verifier blurs them."""
    if moment < cert.not_valid_before_utc:
        raise VerificationFailed(NOT_YET_VALID, f"{_who(cert)} is valid from {_date(cert.not_valid_before_utc)}")
    if moment > cert.not_valid_after_utc:
        raise VerificationFailed(EXPIRED, f"{_who(cert)} expired on {_date(cert.not_valid_after_utc)}")


def check_not_revoked(
    leaf: x509.Certificate, crl: x509.CertificateRevocationList, chain: list[x509.Certificate]
) -> None:
    """Raise ``revoked`` when the CRL lists the leaf's serial, and ``revocation status
    unknown`` when the CRL is not the issuer's (it cannot vouch for this certificate)."""
    issuer = chain[1] if len(chain) > 1 else chain[0]
    if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):
        # OpenSSL's CRL check refuses too ("unable to get certificate CRL").
        raise VerificationFailed(
            REVOCATION_UNKNOWN, f"the CRL was not issued by {issuer.subject.rfc4514_string()}, the certificate's issuer"
        )
    entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
    if entry is not None:
        raise VerificationFailed(REVOKED, f"{_who(leaf)} was revoked on {_date(entry.revocation_date_utc)}")


def check_purpose(cert: x509.Certificate, purpose: str) -> None:
    """Raise ``wrong EKU`` when an EKU extension is present without the purpose's usage
    (checked before names, so a client certificate offered as a server's says so)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if _PURPOSE_EKU[purpose] not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        raise _wrong_eku(cert, purpose)


def check_wildcard_depth(cert: x509.Certificate, host: str) -> None:
    """OpenSSL (so curl, Python, most non-browser clients) refuses a wildcard directly
    above a single label (``*.localhost``), although the web-PKI verifier allows it: a
    host reached only through such a wildcard is a mismatch for those clients."""
    dns = [str(name.value).lower() for name in hostname_sans(cert) if isinstance(name, x509.DNSName)]
    host = host.lower().rstrip(".")
    if host in dns or "." not in host:
        return
    parent = host.split(".", 1)[1]
    if f"*.{parent}" in dns and "." not in parent:
        raise VerificationFailed(
            HOSTNAME_MISMATCH,
            f"{host!r} matches only the wildcard '*.{parent}', which OpenSSL-based clients refuse "
            "(a wildcard needs two labels after it); list the name explicitly",
        )


def shallow_wildcards(names: list[str]) -> list[str]:
    """NAMEs like ``*.localhost`` that OpenSSL-based clients will never match."""
    return [n for n in names if n.startswith("*.") and "." not in n[2:].rstrip(".")]


def is_self_signed(cert: x509.Certificate) -> bool:
    """Issuer == subject and the certificate's own key verifies its signature."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def eku_names(cert: x509.Certificate) -> list[str]:
    """EKU as short names (serverAuth, clientAuth, or the dotted OID); [] when absent."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [_EKU_NAMES.get(oid, oid.dotted_string) for oid in usages]


def hostname_sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name for name in sans if isinstance(name, (x509.DNSName, x509.IPAddress))]


def _target(leaf: x509.Certificate, host: str | None) -> x509.GeneralName:
    if host is not None:
        target = parse_name(host)
        wildcard = isinstance(target, x509.DNSName) and target.value.startswith("*")
        if not isinstance(target, (x509.DNSName, x509.IPAddress)) or wildcard:
            raise PKIError(f"--host {host!r} is not a hostname or IP address")
        return target
    names = hostname_sans(leaf)
    if not names:
        raise VerificationFailed(
            HOSTNAME_MISMATCH, f"{_who(leaf)} has no DNS or IP subjectAltName, so no hostname can match"
        )
    exact = [name for name in names if not str(name.value).startswith("*.")]
    if exact:
        return exact[0]
    return x509.DNSName("x" + names[0].value[1:])


def _run(
    leaf: x509.Certificate,
    roots: list[x509.Certificate],
    intermediates: list[x509.Certificate],
    target: x509.GeneralName | None,
    moment: dt.datetime,
    *,
    host: str | None,
    purpose: str,
) -> list[x509.Certificate]:
    builder = PolicyBuilder().store(Store(roots)).time(moment)
    try:
        if purpose == "server":
            return builder.build_server_verifier(target).verify(leaf, intermediates)
        return builder.build_client_verifier().verify(leaf, intermediates).chain
    except VerificationError as exc:
        raise _explain(str(exc), leaf, roots, intermediates, moment, host=host, purpose=purpose) from None


def _explain(
    message: str,
    leaf: x509.Certificate,
    roots: list[x509.Certificate],
    intermediates: list[x509.Certificate],
    moment: dt.datetime,
    *,
    host: str | None,
    purpose: str,
) -> VerificationFailed:
    """Map the verifier's message to one of our reasons (plain words, with the detail)."""
    text = message.removeprefix("validation failed: ").split(" (encountered processing")[0]
    if "matching subjectAltName" in text:
        names = ", ".join(name_text(n) for n in hostname_sans(leaf)) or "none"
        return VerificationFailed(HOSTNAME_MISMATCH, f"{host!r} is not among the certificate's names ({names})")
    if "subjectAltName" in text:
        return VerificationFailed(HOSTNAME_MISMATCH, f"{_who(leaf)} has no subjectAltName (clients ignore the CN)")
    if "EKU" in text:
        return _wrong_eku(leaf, purpose)
    if "Forbidden public key algorithm" in text or "Forbidden signature algorithm" in text:
        return VerificationFailed(
            UNSUPPORTED_ALGORITHM, "TLS clients following the web PKI rules refuse this key or signature algorithm"
        )
    if "not valid at validation time" in text:
        for cert in [*intermediates, *roots]:
            check_validity(cert, moment)
        return VerificationFailed(EXPIRED, text)
    if "candidates exhausted" in text:
        return _unknown_issuer(text, leaf, roots, intermediates, moment)
    return VerificationFailed(INVALID, text)


def _unknown_issuer(
    text: str,
    leaf: x509.Certificate,
    roots: list[x509.Certificate],
    intermediates: list[x509.Certificate],
    moment: dt.datetime,
) -> VerificationFailed:
    issuer = leaf.issuer.rfc4514_string()
    known = {cert.subject for cert in [*roots, *intermediates]}
    if leaf.issuer not in known:
        return VerificationFailed(
            UNKNOWN_ISSUER,
            f"issued by '{issuer}', which is not a trusted CA (an untrusted CA, or an intermediate missing from the chain)",
        )
    for cert in intermediates:
        if cert.subject == leaf.issuer:
            check_validity(cert, moment)
    detail = text.split(": ", 1)[1] if ": " in text else text
    if "signature does not match" in detail or "no interior errors" in detail:
        detail = (
            f"issued by '{issuer}', but not by the trusted CA of that name "
            "(a different CA with the same name, or a missing intermediate)"
        )
    return VerificationFailed(UNKNOWN_ISSUER, detail)


def _wrong_eku(cert: x509.Certificate, purpose: str) -> VerificationFailed:
    have = ", ".join(eku_names(cert)) or "none"
    need = _EKU_NAMES[_PURPOSE_EKU[purpose]]
    return VerificationFailed(WRONG_EKU, f"a {purpose} certificate needs EKU {need}; this one has {have}")


def _who(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    return f"'{subject}'" if subject else "the certificate"


def _date(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
