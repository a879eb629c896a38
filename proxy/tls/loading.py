"""Reading the certificate, key and CA files the TLS layer uses, with the verdict on each
that ``serve`` (``proxy.tls.context``) and ``tlsproxy check`` (``proxy.check.checks``)
both give, so check never passes a file serve refuses (the CRL's verdict is
``proxy.tls.crl``).

Python's ``ssl`` module reads PEM only (``load_cert_chain``, ``load_verify_locations``),
so the toolkit's DER and PKCS#12 readers are not used here: a DER file is refused with
a PEM message instead of a later OpenSSL one. Each function raises PKIError whose
message names the file; callers add the config key.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy.config.model import CertificatePair, ClientAuthSettings, Service
from proxy.errors import PKIError
from proxy.pki import store
from proxy.pki.build import PrivateKey, keys_match


def load_pem_certificates(path) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in file order (leaf first for a server chain)."""
    try:
        return x509.load_pem_x509_certificates(store.read_bytes(path))
    except ValueError:
        raise PKIError(f"{path}: holds no PEM certificate (BEGIN CERTIFICATE block)") from None


def load_matching_key(pair: CertificatePair, leaf: x509.Certificate) -> PrivateKey:
    """The pair's unencrypted PEM private key, which must be the leaf's."""
    try:
        key = serialization.load_pem_private_key(store.read_bytes(pair.key), password=None)
    except TypeError:
        raise PKIError(f"{pair.key}: the private key is encrypted (give an unencrypted key)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{pair.key}: holds no PEM private key") from None
    if not keys_match(leaf, key):  # type: ignore[arg-type]
        raise PKIError(f"{pair.key} is not the private key of {pair.cert}")
    return key  # type: ignore[return-value]


def load_cert_chain(context: ssl.SSLContext, pair: CertificatePair) -> None:
    """``context.load_cert_chain``: OpenSSL has the last word (key formats, curves, PEM
    quirks). ``check`` passes a scratch context, ``serve`` the one it builds."""
    try:
        context.load_cert_chain(pair.cert, pair.key)
    except (ssl.SSLError, OSError) as exc:
        raise PKIError(f"{pair.cert} with key {pair.key}: cannot be used by TLS ({exc})") from None


def server_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS and IP SANs, else the CN (as OpenSSL's host check falls back to it): the names
    SNI selects this certificate by."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(names)


def client_verify_mode(client_auth: ClientAuthSettings, services: tuple[Service, ...]) -> ssl.VerifyMode:
    """none/optional/require; ``none`` still asks for a certificate when a service
    requires one (or allow-lists one), since authorization needs it per request."""
    if client_auth.mode == "require":
        return ssl.CERT_REQUIRED
    if client_auth.mode == "optional" or any(
        service.client_auth is not None and (service.client_auth.require or service.client_auth.allow)
        for service in services
    ):
        return ssl.CERT_OPTIONAL
    return ssl.CERT_NONE
