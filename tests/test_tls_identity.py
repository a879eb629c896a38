"""ClientIdentity parsing and the identity headers, without sockets."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.errors import PKIError
from proxy.pki.store import load_certificates
from proxy.tls.identity import ClientIdentity, client_identity, identity_headers, is_identity_header

ALICE_NAMES = ("spiffe://corp/ns/alice", "alice.svc.example.com", "alice2.svc.example.com", "Alice@Example.com", "10.1.2.3")


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def leaf_der(pki, stem: str, *names: str, **options) -> bytes:
    cert_path, _key = pki.leaf(stem, *names, client=True, **options)
    return der_of(load_certificates(cert_path)[0])


@pytest.fixture(scope="module")
def alice(pki) -> ClientIdentity:
    return ClientIdentity.from_der(leaf_der(pki, "alice", *ALICE_NAMES, cn="alice", ou="eng"))


class FakeSSLObject:
    """What client_identity uses of ssl.SSLObject: getpeercert(binary_form=True)."""

    def __init__(self, der: bytes | None) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der


_XFCC_PAIR = re.compile(r'([A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^,;="\\]*)(?:;|$)')


def parse_xfcc(value: str) -> list[tuple[str, str]]:
    """A strict reader of one XFCC element (key=value;... with Envoy's quoting)."""
    pairs, position = [], 0
    while position < len(value):
        match = _XFCC_PAIR.match(value, position)
        assert match, f"not XFCC at {value[position:]!r}"
        key, raw = match.group(1), match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        pairs.append((key, raw))
        position = match.end()
    return pairs


# --- parsing ---------------------------------------------------------------------------


def test_fields_are_parsed_from_the_leaf(pki, alice):
    cert = x509.load_der_x509_certificate(alice.leaf_der)
    assert alice.subject == cert.subject.rfc4514_string()
    assert "CN=alice" in alice.subject and "OU=eng" in alice.subject
    assert alice.issuer == load_certificates(pki.ca_pem)[0].subject.rfc4514_string()
    assert int(alice.serial, 16) == cert.serial_number and len(alice.serial) % 2 == 0
    assert alice.fingerprint_sha256 == hashlib.sha256(alice.leaf_der).hexdigest()
    assert alice.common_names == ("alice",)
    assert alice.organizational_units == ("eng",)
    assert alice.uri_sans == ("spiffe://corp/ns/alice",)
    assert alice.dns_sans == ("alice.svc.example.com", "alice2.svc.example.com")
    assert alice.email_sans == ("Alice@Example.com",)
    assert alice.ip_sans == ("10.1.2.3",)
    assert alice.not_after == cert.not_valid_after_utc
    assert alice.chain_der == ()


def test_parsing_is_cached_by_der(alice):
    assert ClientIdentity.from_der(alice.leaf_der) is alice


def test_garbage_is_a_pki_error():
    with pytest.raises(PKIError, match="could not be parsed"):
        ClientIdentity.from_der(b"\x30\x03\x02\x01\x00")


def test_control_and_non_ascii_characters_are_escaped_for_headers(pki):
    identity = ClientIdentity.from_der(leaf_der(pki, "evil", "evil.example.com", cn="J\u00fcrgen\r\nX-Injected: 1"))
    assert identity.subject == "CN=J\\C3\\BCrgen\\0D\\0AX-Injected: 1"
    assert identity.common_names == ("J\u00fcrgen\r\nX-Injected: 1",)  # raw, for allow-lists
    for mode in ("xfcc", "headers"):
        for _name, value in identity_headers(identity, mode):
            assert b"\r" not in value and b"\n" not in value and value.isascii()


# --- client_identity --------------------------------------------------------------------


def test_client_identity_without_a_certificate_is_none(pki):
    assert client_identity(FakeSSLObject(None), load_certificates(pki.ca_pem)) is None


def test_client_identity_finds_the_issuer_in_the_trusted_bundle(pki, alice):
    main_ca, other_ca = load_certificates(pki.ca_pem)[0], load_certificates(pki.other_ca_pem)[0]
    identity = client_identity(FakeSSLObject(alice.leaf_der), [other_ca, main_ca])
    assert identity is not None
    assert identity.chain_der == (der_of(main_ca),)
    assert identity.fingerprint_sha256 == alice.fingerprint_sha256


def test_client_identity_leaves_the_chain_empty_when_the_issuer_is_unknown(pki, alice):
    other_ca = load_certificates(pki.other_ca_pem)[0]
    identity = client_identity(FakeSSLObject(alice.leaf_der), [other_ca])
    assert identity is not None and identity.chain_der == ()


# --- xfcc ------------------------------------------------------------------------------


def test_xfcc_hash_subject_uri_dns(alice):
    [(name, value)] = identity_headers(alice, "xfcc")
    assert name == b"X-Forwarded-Client-Cert"
    text = value.decode("ascii")
    assert text.startswith(f"Hash={hashlib.sha256(alice.leaf_der).hexdigest()};Subject=\"")
    assert parse_xfcc(text) == [
        ("Hash", alice.fingerprint_sha256),
        ("Subject", alice.subject),
        ("URI", "spiffe://corp/ns/alice"),
        ("DNS", "alice.svc.example.com"),
        ("DNS", "alice2.svc.example.com"),
    ]


def test_xfcc_quotes_and_escapes_a_subject_with_quote_and_comma(pki):
    identity = ClientIdentity.from_der(leaf_der(pki, "doe", "doe.example.com", cn='Doe, "J"'))
    assert identity.subject == 'CN=Doe\\, \\"J\\"'  # RFC 4514 escapes first
    [(_name, value)] = identity_headers(identity, "xfcc")
    assert ';Subject="CN=Doe\\\\, \\\\\\"J\\\\\\"";DNS=doe.example.com' in value.decode()
    assert dict(parse_xfcc(value.decode()))["Subject"] == identity.subject


def test_xfcc_quotes_a_uri_containing_separators(pki):
    identity = ClientIdentity.from_der(leaf_der(pki, "urn", "uri:urn:example:a;b=c,d", cn="urn"))
    [(_name, value)] = identity_headers(identity, "xfcc")
    assert value.endswith(b';URI="urn:example:a;b=c,d"')
    assert dict(parse_xfcc(value.decode()))["URI"] == "urn:example:a;b=c,d"


# --- rfc9440 ---------------------------------------------------------------------------


def sf_binary(value: bytes) -> bytes:
    assert value.startswith(b":") and value.endswith(b":")
    return base64.b64decode(value[1:-1], validate=True)


def test_rfc9440_client_cert_is_the_exact_der_and_no_chain_when_unknown(alice):
    headers = identity_headers(alice, "rfc9440")
    assert [name for name, _ in headers] == [b"Client-Cert"]
    assert sf_binary(headers[0][1]) == alice.leaf_der


def test_rfc9440_chain_lists_each_issuer(pki, alice):
    main_ca = load_certificates(pki.ca_pem)[0]
    identity = ClientIdentity.from_der(alice.leaf_der, [der_of(main_ca), der_of(main_ca)])
    headers = dict(identity_headers(identity, "rfc9440"))
    assert sf_binary(headers[b"Client-Cert"]) == alice.leaf_der
    items = headers[b"Client-Cert-Chain"].split(b", ")
    assert [sf_binary(item) for item in items] == [der_of(main_ca), der_of(main_ca)]


# --- headers ---------------------------------------------------------------------------


def test_headers_mode(alice):
    headers = {name.decode(): value.decode() for name, value in identity_headers(alice, "headers")}
    assert headers == {
        "X-Client-Cert-Subject": alice.subject,
        "X-Client-Cert-Issuer": alice.issuer,
        "X-Client-Cert-Serial": alice.serial,
        "X-Client-Cert-Fingerprint": "sha256:" + alice.fingerprint_sha256,
        "X-Client-Cert-SAN": "URI:spiffe://corp/ns/alice, DNS:alice.svc.example.com, "
        "DNS:alice2.svc.example.com, email:Alice@Example.com, IP:10.1.2.3",
        "X-Client-Cert-Not-After": alice.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", headers["X-Client-Cert-Not-After"])


def test_headers_mode_escapes_commas_inside_a_san(pki):
    identity = ClientIdentity.from_der(leaf_der(pki, "urn", "uri:urn:example:a;b=c,d", cn="urn"))
    headers = dict(identity_headers(identity, "headers"))
    assert headers[b"X-Client-Cert-SAN"] == b"URI:urn:example:a;b=c\\,d"


@pytest.mark.parametrize("mode", ["xfcc", "rfc9440", "headers", "none"])
def test_no_identity_no_headers(mode):
    assert identity_headers(None, mode) == []


def test_mode_none_adds_nothing_and_unknown_mode_is_refused(alice):
    assert identity_headers(alice, "none") == []
    with pytest.raises(ValueError, match="unknown forward mode"):
        identity_headers(alice, "pem")


def test_callers_may_extend_the_returned_list(alice):
    first = identity_headers(alice, "xfcc")
    first.append((b"X-Other", b"1"))
    assert len(identity_headers(alice, "xfcc")) == 1


# --- is_identity_header ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        b"X-Forwarded-Client-Cert",
        b"x-forwarded-client-cert",
        b"X_FORWARDED_CLIENT_CERT",
        b"Client-Cert",
        b"client_cert",
        b"Client-Cert-Chain",
        b"X-Client-Cert",
        b"X-Client-Cert-Subject",
        b"x_client_cert_subject",
        b"X-CLIENT-CERT-Anything-Else",
        b"x-client_cert-san",
    ],
)
def test_identity_headers_are_recognised(name):
    assert is_identity_header(name)


@pytest.mark.parametrize(
    "name",
    [b"", b"Host", b"Content-Type", b"Cookie", b"X-Forwarded-For", b"Client-Certificate", b"X-Client-Certs", b"X-Client"],
)
def test_other_headers_are_not(name):
    assert not is_identity_header(name)
