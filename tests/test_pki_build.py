"""The X.509 profile of what build.py makes, checked field by field and by OpenSSL."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import PKIError
from proxy.pki.build import (
    KEY_TYPES,
    create_ca,
    issue_leaf,
    keys_match,
    make_crl,
    make_csr,
    self_signed,
    sign_csr,
    validity_window,
)
from proxy.pki.store import certs_pem, write_leaf

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def openssl(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)


def test_ca_profile(pki) -> None:
    ca = pki.ca_cert
    basic = ext(ca, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ext(ca, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ext(ca, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "tlsproxy local CA"


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_leaf_profile_per_key_type(pki, key_type: str) -> None:
    cert, key = issue_leaf(pki.ca_cert, pki.ca_key, ["api.localhost", "127.0.0.1"], key_type=key_type)
    assert keys_match(cert, key)
    assert not ext(cert, x509.BasicConstraints).value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert usage.value.key_encipherment == (key_type.startswith("rsa"))
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(pki.ca_cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    expected = {"ec": ec.EllipticCurvePrivateKey, "ed25519": ed25519.Ed25519PrivateKey}.get(key_type, rsa.RSAPrivateKey)
    assert isinstance(key, expected)
    if key_type.startswith("rsa"):
        assert key.key_size == int(key_type[3:])
    if key_type == "ec":
        assert key.curve.name == "secp256r1"


def test_leaf_names_subject_and_time(pki) -> None:
    before = dt.datetime.now(dt.timezone.utc)
    cert, _ = issue_leaf(
        pki.ca_cert, pki.ca_key, ["alice@example.com", "spiffe://corp/alice", "*.svc.localhost", "::1"],
        client=True, ou="eng",
    )
    sans = ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.RFC822Name) == ["alice@example.com"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://corp/alice"]
    assert sans.get_values_for_type(x509.DNSName) == ["*.svc.localhost"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.rfc4514_string() == "OU=eng,CN=alice@example.com"
    # backdated a few minutes for clock skew, 365 days by default
    assert before - dt.timedelta(minutes=10) < cert.not_valid_before_utc < before
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=365, minutes=5)


def test_serials_are_random_and_large(pki) -> None:
    serials = {issue_leaf(pki.ca_cert, pki.ca_key, ["a.test"])[0].serial_number for _ in range(8)}
    assert len(serials) == 8
    assert all(0 < s < 2**159 for s in serials) and max(serials).bit_length() > 140


def test_cn_defaults_to_first_name_and_long_names_stay_in_san(pki) -> None:
    cert, _ = issue_leaf(pki.ca_cert, pki.ca_key, ["a" * 60 + ".example.test"])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    assert ext(cert, x509.SubjectAlternativeName).critical  # empty subject => critical SAN
    cert, _ = issue_leaf(pki.ca_cert, pki.ca_key, ["x.test"], cn="billing")
    assert cert.subject.rfc4514_string() == "CN=billing"


def test_validity_windows() -> None:
    start = dt.datetime(2030, 1, 10, tzinfo=dt.timezone.utc)
    nb, na = validity_window(30, expired=True, start=start)
    assert na < start and na - nb == dt.timedelta(days=30)
    nb, na = validity_window(30, not_yet_valid=True, start=start)
    assert nb > start
    with pytest.raises(PKIError):
        validity_window(0)
    with pytest.raises(PKIError):
        validity_window(5, expired=True, not_yet_valid=True)


def test_refusals() -> None:
    ca, key = create_ca()
    other, other_key = create_ca("other")
    with pytest.raises(PKIError, match="at least one NAME"):
        issue_leaf(ca, key, [])
    with pytest.raises(PKIError, match="does not belong"):
        issue_leaf(ca, other_key, ["x.test"])
    with pytest.raises(PKIError, match="unknown key type"):
        create_ca(key_type="dsa")


def test_self_signed_has_san_and_signs_itself() -> None:
    cert, key = self_signed(["localhost", "127.0.0.1"])
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert not ext(cert, x509.BasicConstraints).value.ca
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["localhost"]


def test_csr_then_sign_keeps_subject_and_sans(pki) -> None:
    csr, key = make_csr(["svc.internal", "10.0.0.7"], cn="my svc", ou="ops")
    assert csr.is_signature_valid
    assert ext(csr, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["svc.internal"]
    cert = sign_csr(pki.ca_cert, pki.ca_key, csr, client=True, days=30)
    assert cert.subject == csr.subject and keys_match(cert, key)
    assert ext(cert, x509.SubjectAlternativeName).value == ext(csr, x509.SubjectAlternativeName).value
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_crl_lists_serials_and_is_signed_by_ca(pki) -> None:
    crl = make_crl(pki.ca_cert, pki.ca_key, [5, 7, 5], days=3)
    assert crl.is_signature_valid(pki.ca_cert.public_key())
    assert sorted(r.serial_number for r in crl) == [5, 7]
    assert crl.get_revoked_certificate_by_serial_number(6) is None
    assert crl.issuer == pki.ca_cert.subject


@needs_openssl
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_openssl_accepts_every_leaf(pki, tmp_path: Path, key_type: str) -> None:
    ca, ca_key = create_ca(key_type=key_type)
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(certs_pem([ca]))
    for client in (False, True):
        cert, key = issue_leaf(ca, ca_key, ["localhost", "127.0.0.1"], client=client, key_type=key_type)
        pem, _ = write_leaf(tmp_path / f"leaf-{client}", cert, key, [])
        purpose = "sslclient" if client else "sslserver"
        result = openssl("verify", "-CAfile", ca_pem, "-purpose", purpose, pem)
        assert result.returncode == 0, result.stderr
        wrong = "sslserver" if client else "sslclient"
        assert openssl("verify", "-CAfile", ca_pem, "-purpose", wrong, pem).returncode != 0


@needs_openssl
def test_openssl_refuses_leaf_of_other_ca_and_expired(pki) -> None:
    foreign, _ = pki.leaf("foreign", "localhost", ca="other")
    assert openssl("verify", "-CAfile", pki.ca_pem, foreign).returncode != 0
    expired, _ = pki.leaf("expired", "localhost", expired=True)
    result = openssl("verify", "-CAfile", pki.ca_pem, expired)
    assert result.returncode != 0 and "expired" in result.stdout + result.stderr


@needs_openssl
def test_openssl_text_shows_the_profile(pki) -> None:
    cert_path, _ = pki.server
    text = openssl("x509", "-noout", "-text", "-in", cert_path).stdout
    assert "CA:FALSE" in text and "TLS Web Server Authentication" in text
    assert "DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, DNS:*.localhost" in text
    assert "X509v3 Subject Key Identifier" in text and "X509v3 Authority Key Identifier" in text
    ca_text = openssl("x509", "-noout", "-text", "-in", pki.ca_pem).stdout
    assert "CA:TRUE, pathlen:0" in ca_text and "Certificate Sign, CRL Sign" in ca_text
    assert "X509v3 Basic Constraints: critical" in ca_text and "X509v3 Key Usage: critical" in ca_text


@needs_openssl
def test_openssl_honours_the_crl(pki) -> None:
    revoked, _ = pki.leaf("revoked", "localhost")
    kept, _ = pki.leaf("kept", "localhost")
    crl = pki.crl([revoked])
    result = openssl("verify", "-crl_check", "-CRLfile", crl, "-CAfile", pki.ca_pem, revoked)
    assert result.returncode != 0 and "revoked" in result.stdout + result.stderr
    assert openssl("verify", "-crl_check", "-CRLfile", crl, "-CAfile", pki.ca_pem, kept).returncode == 0
