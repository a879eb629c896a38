"""NAME -> SAN type by shape: accepted shapes and refused ones."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509

from proxy.errors import PKIError
from proxy.pki.names import name_text, parse_name, parse_names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("localhost", x509.DNSName("localhost")),
        ("API.Example.COM.", x509.DNSName("api.example.com")),
        ("*.localhost", x509.DNSName("*.localhost")),
        ("xn--bcher-kva.example", x509.DNSName("xn--bcher-kva.example")),
        ("bücher.example", x509.DNSName("xn--bcher-kva.example")),
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("[fe80::1]", x509.IPAddress(ipaddress.ip_address("fe80::1"))),
        ("spiffe://corp.example/ns/prod/sa/api", x509.UniformResourceIdentifier("spiffe://corp.example/ns/prod/sa/api")),
        ("uri:urn:example:billing", x509.UniformResourceIdentifier("urn:example:billing")),
        ("URI:https://id.example/alice", x509.UniformResourceIdentifier("https://id.example/alice")),
        ("alice@example.com", x509.RFC822Name("alice@example.com")),
    ],
)
def test_names_by_shape(name: str, expected: x509.GeneralName) -> None:
    assert parse_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "bad name",
        "under_score.example",
        "-lead.example",
        "trail-.example",
        "a..b",
        "*.*.example",
        "foo.*.example",
        "*",
        "x" * 64 + ".example",
        "uri:",
        "uri:no scheme here",
        "uri:1abc:x",
        "spiffe://",
        "@example.com",
        "alice@",
        "al ice@example.com",
        "alice@bad_domain",
    ],
)
def test_refused_names_say_why(name: str) -> None:
    with pytest.raises(PKIError) as err:
        parse_name(name)
    assert "\n" not in str(err.value) and str(err.value)


def test_duplicates_dropped_order_kept() -> None:
    names = parse_names(["b.example", "127.0.0.1", "B.example", "a.example"])
    assert [name_text(n) for n in names] == ["DNS:b.example", "IP:127.0.0.1", "DNS:a.example"]


def test_name_text_round_trip_labels() -> None:
    assert name_text(parse_name("spiffe://d/x")) == "URI:spiffe://d/x"
    assert name_text(parse_name("ops@example.com")) == "email:ops@example.com"
    assert name_text(parse_name("::1")) == "IP:::1"
