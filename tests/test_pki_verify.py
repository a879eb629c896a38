"""verify_certificate: accepted cases, and one crafted certificate per refusal reason."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from proxy.errors import PKIError, VerificationFailed
from proxy.pki import verify as v
from proxy.pki.build import create_ca, issue_intermediate, issue_leaf, make_crl, self_signed
from proxy.pki.store import load_certificates


def leaf_of(path) -> x509.Certificate:
    return load_certificates(path)[0]


def reason_of(leaf: x509.Certificate, roots: list[x509.Certificate], **kwargs) -> VerificationFailed:
    with pytest.raises(VerificationFailed) as err:
        v.verify_certificate(leaf, roots, **kwargs)
    return err.value


@pytest.mark.parametrize("host", [None, "localhost", "127.0.0.1", "::1", "LOCALHOST"])
def test_server_cert_accepted(pki, host) -> None:
    result = v.verify_certificate(leaf_of(pki.server[0]), [pki.ca_cert], host=host)
    assert result.chain[-1] == pki.ca_cert and result.purpose == "server"


def test_client_cert_accepted(pki) -> None:
    cert = leaf_of(pki.leaf("alice", "alice@example.com", "spiffe://corp/alice", client=True)[0])
    assert v.verify_certificate(cert, [pki.ca_cert], purpose="client").chain[0] == cert


def test_expired(pki) -> None:
    cert = leaf_of(pki.leaf("expired", "localhost", expired=True)[0])
    failed = reason_of(cert, [pki.ca_cert], host="localhost")
    assert failed.reason == v.EXPIRED and "expired on" in failed.detail


def test_not_yet_valid(pki) -> None:
    cert = leaf_of(pki.leaf("future", "localhost", not_yet_valid=True)[0])
    assert reason_of(cert, [pki.ca_cert], host="localhost").reason == v.NOT_YET_VALID


def test_expired_at_a_later_time(pki) -> None:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    assert reason_of(leaf_of(pki.server[0]), [pki.ca_cert], at=later).reason == v.EXPIRED


@pytest.mark.parametrize("host", ["example.com", "a.b.localhost", "127.0.0.2", "localhost.evil.test"])
def test_hostname_mismatch(pki, host) -> None:
    failed = reason_of(leaf_of(pki.server[0]), [pki.ca_cert], host=host)
    assert failed.reason == v.HOSTNAME_MISMATCH and "DNS:localhost" in failed.detail


def test_server_purpose_needs_a_hostname_san(pki) -> None:
    cert, _ = issue_leaf(pki.ca_cert, pki.ca_key, ["spiffe://corp/api"])
    assert reason_of(cert, [pki.ca_cert]).reason == v.HOSTNAME_MISMATCH


def test_server_cert_as_client_is_wrong_eku(pki) -> None:
    failed = reason_of(leaf_of(pki.server[0]), [pki.ca_cert], purpose="client")
    assert failed.reason == v.WRONG_EKU and "clientAuth" in failed.detail and "serverAuth" in failed.detail


def test_client_cert_as_server_is_wrong_eku(pki) -> None:
    cert = leaf_of(pki.leaf("client-localhost", "localhost", client=True)[0])
    assert reason_of(cert, [pki.ca_cert], host="localhost").reason == v.WRONG_EKU


def test_unknown_issuer(pki) -> None:
    cert = leaf_of(pki.leaf("foreign", "localhost", ca="other")[0])
    failed = reason_of(cert, [pki.ca_cert], host="localhost")
    assert failed.reason == v.UNKNOWN_ISSUER and "untrusted CA" in failed.detail


def test_same_name_different_ca_is_unknown_issuer(pki) -> None:
    twin, twin_key = create_ca()  # same default name as the trusted CA
    cert, _ = issue_leaf(twin, twin_key, ["localhost"])
    failed = reason_of(cert, [pki.ca_cert])
    assert failed.reason == v.UNKNOWN_ISSUER and "same name" in failed.detail


def test_missing_intermediate(pki) -> None:
    root, root_key = create_ca("root with room", path_length=1)
    middle, middle_key = issue_intermediate(root, root_key, "issuing CA")
    cert, _ = issue_leaf(middle, middle_key, ["localhost"])
    failed = reason_of(cert, [root], host="localhost")
    assert failed.reason == v.UNKNOWN_ISSUER and "intermediate" in failed.detail
    chain = v.verify_certificate(cert, [root], intermediates=[middle], host="localhost").chain
    assert chain == [cert, middle, root]


def test_intermediate_under_pathlen_zero_root_is_refused(pki) -> None:
    middle, middle_key = issue_intermediate(pki.ca_cert, pki.ca_key, "not allowed")
    cert, _ = issue_leaf(middle, middle_key, ["localhost"])
    failed = reason_of(cert, [pki.ca_cert], intermediates=[middle])
    assert failed.reason == v.UNKNOWN_ISSUER and "path length" in failed.detail


def test_self_signed(pki) -> None:
    cert, _ = self_signed(["localhost"])
    failed = reason_of(cert, [pki.ca_cert], host="localhost")
    assert failed.reason == v.SELF_SIGNED
    assert v.verify_certificate(cert, [cert], host="localhost").chain == [cert]  # trusted directly


def test_revoked(pki) -> None:
    revoked_path, _ = pki.leaf("to-revoke", "localhost")
    crl = x509.load_pem_x509_crl(pki.crl([revoked_path]).read_bytes())
    failed = reason_of(leaf_of(revoked_path), [pki.ca_cert], crl=crl)
    assert failed.reason == v.REVOKED
    assert v.verify_certificate(leaf_of(pki.server[0]), [pki.ca_cert], crl=crl)


def test_crl_from_another_ca_is_an_error(pki) -> None:
    other, other_key = create_ca("other")
    with pytest.raises(VerificationFailed, match="CRL was not issued"):
        v.verify_certificate(leaf_of(pki.server[0]), [pki.ca_cert], crl=make_crl(other, other_key, []))


def test_ed25519_is_named_as_unsupported() -> None:
    ca, ca_key = create_ca(key_type="ed25519")
    cert, _ = issue_leaf(ca, ca_key, ["localhost"], key_type="ed25519")
    assert reason_of(cert, [ca]).reason == v.UNSUPPORTED_ALGORITHM


def test_bad_arguments(pki) -> None:
    cert = leaf_of(pki.server[0])
    with pytest.raises(PKIError, match="purpose"):
        v.verify_certificate(cert, [pki.ca_cert], purpose="email")
    with pytest.raises(PKIError, match="not a hostname"):
        v.verify_certificate(cert, [pki.ca_cert], host="*.localhost")
    with pytest.raises(PKIError, match="no trusted CA"):
        v.verify_certificate(cert, [])


def test_messages_are_one_line(pki) -> None:
    cert = leaf_of(pki.leaf("foreign", "localhost", ca="other")[0])
    assert "\n" not in str(reason_of(cert, [pki.ca_cert]))


def test_wildcard_over_a_single_label_is_a_mismatch(pki) -> None:
    # OpenSSL (curl, Python ssl) never matches *.localhost; say so instead of exit 0.
    failed = reason_of(leaf_of(pki.server[0]), [pki.ca_cert], host="api.localhost")
    assert failed.reason == v.HOSTNAME_MISMATCH and "two labels" in failed.detail
    cert, _ = issue_leaf(pki.ca_cert, pki.ca_key, ["*.app.localhost"])
    assert v.verify_certificate(cert, [pki.ca_cert], host="api.app.localhost")
    assert v.verify_certificate(cert, [pki.ca_cert]).chain[0] == cert  # no host: any name under it
    assert v.shallow_wildcards(["*.localhost", "*.app.localhost", "localhost"]) == ["*.localhost"]
