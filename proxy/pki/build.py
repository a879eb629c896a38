"""Certificates as pure functions over ``cryptography`` objects (no files here).

Profiles follow what browsers, OpenSSL and ``cryptography.x509.verification`` demand:

* CA: BasicConstraints CA:TRUE pathlen 0 (critical), KeyUsage keyCertSign + cRLSign
  (critical), SKI. pathlen 0 because this CA only ever signs leaves.
* Leaf: BasicConstraints CA:FALSE, KeyUsage digitalSignature (+ keyEncipherment for RSA,
  which RSA key transport in TLS 1.2 needs), EKU serverAuth or clientAuth, SAN always
  (modern clients ignore the CN), SKI, and AKI copied from the issuer's SKI so chain
  building picks the right issuer when several share a name.
* Random 159-bit serials; notBefore five minutes in the past to tolerate clock skew.
"""

from __future__ import annotations

import datetime as dt
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import PKIError
from proxy.pki.names import parse_names

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]

KEY_TYPES = ("ec", "rsa2048", "rsa4096", "ed25519")
DEFAULT_CA_NAME = "tlsproxy local CA"
BACKDATE = dt.timedelta(minutes=5)
CN_MAX = 64  # X.520 ub-common-name; longer names stay in the SAN only


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def generate_key(key_type: str = "ec") -> PrivateKey:
    """A fresh private key of one of KEY_TYPES (``ec`` = P-256)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa2048", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise PKIError(f"unknown key type {key_type!r} (choose from {', '.join(KEY_TYPES)})")


def validity_window(
    days: int, *, expired: bool = False, not_yet_valid: bool = False, start: dt.datetime | None = None
) -> tuple[dt.datetime, dt.datetime]:
    """(notBefore, notAfter) for DAYS of validity; ``expired`` ended a day ago,
    ``not_yet_valid`` starts in a day (deliberately broken certs for negative tests)."""
    if days < 1:
        raise PKIError(f"validity must be at least 1 day, not {days}")
    if expired and not_yet_valid:
        raise PKIError("a certificate cannot be both expired and not yet valid")
    current = start or now()
    if expired:
        not_after = current - dt.timedelta(days=1)
        return not_after - dt.timedelta(days=days), not_after
    if not_yet_valid:
        not_before = current + dt.timedelta(days=1)
        return not_before, not_before + dt.timedelta(days=days)
    return current - BACKDATE, current + dt.timedelta(days=days)


def create_ca(
    name: str = DEFAULT_CA_NAME, *, days: int = 3650, key_type: str = "ec", path_length: int = 0
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed root CA; pathlen 0 (the default) lets it sign leaves only."""
    key = generate_key(key_type)
    subject = _ca_subject(name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return _ca_cert(subject, key.public_key(), subject, key, ski, days, path_length), key


def issue_intermediate(
    ca_cert: x509.Certificate, ca_key: PrivateKey, name: str, *, days: int = 1825, key_type: str = "ec"
) -> tuple[x509.Certificate, PrivateKey]:
    """A CA (pathlen 0) signed by another CA whose pathlen allows it; for chains of three."""
    _check_issuer(ca_cert, ca_key)
    key = generate_key(key_type)
    cert = _ca_cert(_ca_subject(name), key.public_key(), ca_cert.subject, ca_key, _ski_of(ca_cert), days, 0)
    return cert, key


def issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    names: list[str],
    *,
    client: bool = False,
    cn: str | None = None,
    ou: str | None = None,
    days: int = 365,
    key_type: str = "ec",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A leaf signed by the CA; NAMEs become SANs by shape, CN defaults to the first NAME.

    ``not_before`` / ``not_after`` override the window computed from ``days`` (used for
    deliberately expired or future certificates).
    """
    sans = _require_sans(names)
    _check_issuer(ca_cert, ca_key)
    key = generate_key(key_type)
    window = validity_window(days)
    cert = _leaf(
        issuer=ca_cert.subject,
        signer=ca_key,
        issuer_ski=_ski_of(ca_cert),
        subject=_subject_for(names, cn, ou),
        public_key=key.public_key(),
        sans=sans,
        client=client,
        not_before=not_before or window[0],
        not_after=not_after or window[1],
    )
    return cert, key


def self_signed(
    names: list[str], *, cn: str | None = None, days: int = 365, key_type: str = "ec", client: bool = False
) -> tuple[x509.Certificate, PrivateKey]:
    """One self-signed leaf (the ``openssl req -x509`` case): trust it directly, not as a CA."""
    sans = _require_sans(names)
    key = generate_key(key_type)
    subject = _subject_for(names, cn, None)
    not_before, not_after = validity_window(days)
    cert = _leaf(
        issuer=subject,
        signer=key,
        issuer_ski=x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
        subject=subject,
        public_key=key.public_key(),
        sans=sans,
        client=client,
        not_before=not_before,
        not_after=not_after,
    )
    return cert, key


def make_csr(
    names: list[str], *, cn: str | None = None, ou: str | None = None, key_type: str = "ec"
) -> tuple[x509.CertificateSigningRequest, PrivateKey]:
    """A key and a CSR carrying the subject and the SANs, for a real CA to sign."""
    sans = _require_sans(names)
    key = generate_key(key_type)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject_for(names, cn, ou))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    return builder.sign(key, _hash_for(key)), key


def sign_csr(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    csr: x509.CertificateSigningRequest,
    *,
    client: bool = False,
    days: int = 365,
) -> x509.Certificate:
    """The CA signs a CSR, keeping its subject and SANs; our profile decides the rest
    (the CSR's own requested extensions other than SAN are ignored, as a real CA would)."""
    if not csr.is_signature_valid:
        raise PKIError("the CSR's signature does not verify (corrupted or tampered request)")
    _check_issuer(ca_cert, ca_key)
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cns:
            raise PKIError("the CSR has neither subjectAltName nor a CN to take a name from") from None
        sans = _require_sans([str(cns[0].value)])
    not_before, not_after = validity_window(days)
    return _leaf(
        issuer=ca_cert.subject,
        signer=ca_key,
        issuer_ski=_ski_of(ca_cert),
        subject=csr.subject,
        public_key=csr.public_key(),
        sans=sans,
        client=client,
        not_before=not_before,
        not_after=not_after,
    )


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    revoked_serials: list[int],
    *,
    days: int = 30,
    number: int | None = None,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA revoking the given serial numbers (``number`` defaults to
    the current time, so a newer CRL always has a larger CRLNumber)."""
    _check_issuer(ca_cert, ca_key)
    issued = now() - BACKDATE
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(issued)
        .next_update(issued + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number if number is not None else int(issued.timestamp())), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski_of(ca_cert)), critical=False)
    )
    for serial in dict.fromkeys(revoked_serials):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build()
        )
    return builder.sign(ca_key, _hash_for(ca_key))


def leaf_subject(cn: str | None, ou: str | None) -> x509.Name:
    """CN (when it fits in 64 characters) and optional OU; the SAN carries the real names."""
    attributes = []
    if cn and len(cn) <= CN_MAX:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if ou:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _cn(ou)))
    return x509.Name(attributes)


def _subject_for(names: list[str], cn: str | None, ou: str | None) -> x509.Name:
    """An explicit CN must fit; a CN defaulted from a long first NAME is simply left out."""
    return leaf_subject(_cn(cn) if cn is not None else names[0], ou)


def keys_match(cert: x509.Certificate, key: PrivateKey) -> bool:
    """Whether KEY is the private half of CERT's public key."""
    return cert.public_key().public_bytes(*_spki()) == key.public_key().public_bytes(*_spki())


def _ca_subject(name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, _cn(name)), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsproxy")]
    )


def _ca_cert(
    subject: x509.Name,
    public_key,
    issuer: x509.Name,
    signer: PrivateKey,
    issuer_ski: x509.SubjectKeyIdentifier,
    days: int,
    path_length: int,
) -> x509.Certificate:
    not_before, not_after = validity_window(days)
    builder = (
        _base(subject, issuer, public_key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )
    return _sign(builder, signer)


def is_ca(cert: x509.Certificate) -> bool:
    """BasicConstraints CA:TRUE (absent means leaf)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _leaf(
    *,
    issuer: x509.Name,
    signer: PrivateKey,
    issuer_ski: x509.SubjectKeyIdentifier,
    subject: x509.Name,
    public_key,
    sans: list[x509.GeneralName],
    client: bool,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    if not_after <= not_before:
        raise PKIError("notAfter must be later than notBefore")
    eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _base(subject, issuer, public_key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_encipherment=isinstance(public_key, rsa.RSAPublicKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        # An empty subject requires the SAN to be critical (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )
    return _sign(builder, signer)


def _base(subject: x509.Name, issuer: x509.Name, public_key, not_before, not_after) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(*, cert_sign: bool = False, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _require_sans(names: list[str]) -> list[x509.GeneralName]:
    if not names:
        raise PKIError("at least one NAME is required (it becomes the subjectAltName)")
    return parse_names(names)


def _check_issuer(ca_cert: x509.Certificate, ca_key: PrivateKey) -> None:
    if not keys_match(ca_cert, ca_key):
        raise PKIError("the CA key does not belong to the CA certificate")


def _ski_of(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    """The issuer's SKI as written in it (so AKI matches byte for byte), else computed."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _hash_for(key: PrivateKey):
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    return builder.sign(key, _hash_for(key))


def _spki() -> tuple[serialization.Encoding, serialization.PublicFormat]:
    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def _cn(value: str) -> str:
    if not value or len(value) > CN_MAX:
        raise PKIError(f"name {value!r} must be 1 to {CN_MAX} characters")
    return value
