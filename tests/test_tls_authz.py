"""Allow-list authorization and the SNI/Host policy rule, without sockets."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.config.model import AllowEntry, ClientAuthSettings, Service, ServiceClientAuth, Upstream
from proxy.pki.store import load_certificates
from proxy.tls.authz import Decision, authorize, authorize_request, misdirected, policy_key
from proxy.tls.identity import ClientIdentity


def identity_of(pki, stem: str, *names: str, **options) -> ClientIdentity:
    cert_path, _key = pki.leaf(stem, *names, client=True, **options)
    return ClientIdentity.from_der(load_certificates(cert_path)[0].public_bytes(Encoding.DER))


@pytest.fixture(scope="module")
def alice(pki) -> ClientIdentity:
    return identity_of(
        pki, "alice", "alice.svc.example.com", "spiffe://corp/ns/alice", "Alice@Example.com", cn="alice", ou="eng"
    )


@pytest.fixture(scope="module")
def mallory(pki) -> ClientIdentity:
    return identity_of(pki, "mallory", "mallory.evil.test", "spiffe://evil/m", "m@evil.test", cn="mallory", ou="ops")


def allow(*pairs: tuple[str, str]) -> tuple[AllowEntry, ...]:
    return tuple(AllowEntry(kind, value) for kind, value in pairs)


def check(identity, entries, *, require=True, service="billing") -> Decision:
    return authorize(identity, entries, require=require, service=service)


# --- one policy ------------------------------------------------------------------------


def test_require_without_a_certificate_is_refused():
    decision = check(None, (), require=True, service="x")
    assert decision == Decision(False, "no client certificate was presented; service 'x' requires one")


def test_no_requirement_and_no_certificate_is_admitted():
    assert check(None, (), require=False).allowed


def test_an_allow_list_needs_a_certificate_even_without_require():
    decision = check(None, allow(("cn", "alice")), require=False)
    assert not decision.allowed and "no client certificate" in decision.reason


@pytest.mark.parametrize("require", [True, False])
def test_empty_allow_list_admits_any_verified_certificate(mallory, require):
    assert check(mallory, (), require=require).allowed


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("cn", "alice"),
        ("ou", "eng"),
        ("dns", "alice.svc.example.com"),
        ("dns", "ALICE.svc.Example.com"),
        ("dns", "*.svc.example.com"),
        ("dns", "*.SVC.example.COM"),
        ("uri", "spiffe://corp/ns/alice"),
        ("email", "alice@example.com"),
        ("email", "ALICE@EXAMPLE.COM"),
    ],
)
def test_each_kind_admits_its_match_and_refuses_others(alice, mallory, kind, value):
    entries = allow((kind, value))
    admitted = check(alice, entries)
    assert admitted.allowed and "billing" in admitted.reason
    refused = check(mallory, entries)
    assert refused == Decision(False, f"certificate {mallory.subject} is not allowed for service 'billing'")
    assert "CN=mallory" in refused.reason


def test_fingerprint_admits_exactly_that_certificate(alice, mallory):
    entries = allow(("fingerprint", alice.fingerprint_sha256))
    assert check(alice, entries).allowed
    assert not check(mallory, entries).allowed


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("cn", "Alice"),  # cn is exact
        ("ou", "ENG"),
        ("uri", "spiffe://corp/ns/alice/"),
        ("uri", "SPIFFE://corp/ns/alice"),
        ("dns", "svc.example.com"),
        ("dns", "*.example.com"),  # two labels below example.com
        ("email", "alice@example.org"),
    ],
)
def test_near_misses_are_refused(alice, kind, value):
    assert not check(alice, allow((kind, value))).allowed


@pytest.mark.parametrize(
    ("dns_san", "admitted"),
    [("a.example.com", True), ("A.Example.COM", True), ("a.b.example.com", False), ("example.com", False),
     ("aexample.com", False)],
)
def test_wildcard_spans_exactly_one_label(pki, dns_san, admitted):
    identity = identity_of(pki, f"wild-{dns_san}", dns_san, cn="wild")
    assert check(identity, allow(("dns", "*.example.com"))).allowed is admitted


def test_any_entry_admits(alice, mallory):
    entries = allow(("cn", "nobody"), ("uri", "spiffe://evil/m"), ("ou", "eng"))
    assert check(alice, entries).allowed
    assert check(mallory, entries).allowed
    assert "uri=spiffe://evil/m" in check(mallory, entries).reason


def test_allow_may_be_any_sequence(alice):
    assert check(alice, [AllowEntry("cn", "alice")]).allowed


# --- listener AND service ---------------------------------------------------------------

LISTENER_ENG = ClientAuthSettings(mode="optional", allow=allow(("ou", "eng"), ("ou", "ops")))


def test_listener_and_service_both_admit(alice):
    service = ServiceClientAuth(require=True, allow=allow(("cn", "alice")))
    assert authorize_request(alice, LISTENER_ENG, service, "billing").allowed


def test_service_refuses_what_the_listener_admits(mallory):
    service = ServiceClientAuth(require=True, allow=allow(("cn", "alice")))
    decision = authorize_request(mallory, LISTENER_ENG, service, "billing")
    assert not decision.allowed and "CN=mallory" in decision.reason and "'billing'" in decision.reason


def test_listener_refuses_what_the_service_admits(pki, alice):
    outsider = identity_of(pki, "outsider", "outsider.example.com", cn="alice", ou="sales")
    service = ServiceClientAuth(require=True, allow=allow(("cn", "alice")))
    assert authorize_request(alice, LISTENER_ENG, service, "billing").allowed
    decision = authorize_request(outsider, LISTENER_ENG, service, "billing")
    assert not decision.allowed and "'billing'" in decision.reason


def test_listener_allow_list_is_ignored_when_its_mode_is_none(mallory):
    listener = ClientAuthSettings(mode="none", allow=allow(("cn", "alice")))
    assert authorize_request(mallory, listener, None, "api").allowed


def test_no_service_policy_admits_with_or_without_a_certificate(mallory):
    listener = ClientAuthSettings(mode="optional")
    assert authorize_request(None, listener, None, "api").allowed
    assert authorize_request(mallory, listener, None, "api").allowed


def test_service_require_refuses_a_client_without_certificate():
    decision = authorize_request(None, ClientAuthSettings(mode="optional"), ServiceClientAuth(require=True), "billing")
    assert decision == Decision(False, "no client certificate was presented; service 'billing' requires one")


def test_listener_require_refuses_a_client_without_certificate():
    decision = authorize_request(None, ClientAuthSettings(mode="require"), None, "api")
    assert not decision.allowed


# --- SNI and Host must agree -------------------------------------------------------------


def service(name: str, client_auth: ServiceClientAuth | None) -> Service:
    return Service(name=name, upstreams=(Upstream("http://127.0.0.1:9", "127.0.0.1", 9),), client_auth=client_auth)


LISTENER = ClientAuthSettings(mode="optional")
STRICT = service("billing", ServiceClientAuth(require=True, allow=allow(("cn", "billing"))))
LAX = service("www", None)


def test_a_lax_sni_cannot_reach_a_strict_host():
    assert misdirected(LAX, STRICT, LISTENER)
    assert misdirected(STRICT, LAX, LISTENER)


def test_same_service_or_unknown_side_is_not_misdirected():
    assert not misdirected(STRICT, STRICT, LISTENER)
    assert not misdirected(None, STRICT, LISTENER)
    assert not misdirected(STRICT, None, LISTENER)


def test_different_services_with_equal_policies_agree():
    same_strict = service("billing-v2", ServiceClientAuth(require=True, allow=allow(("cn", "billing"))))
    empty_policy = service("docs", ServiceClientAuth())
    assert not misdirected(STRICT, same_strict, LISTENER)
    assert not misdirected(LAX, empty_policy, LISTENER)  # none == empty client_auth


def test_policy_key_ignores_entry_order_and_implied_require():
    one = ServiceClientAuth(require=True, allow=allow(("cn", "a"), ("ou", "b")))
    two = ServiceClientAuth(require=False, allow=allow(("ou", "b"), ("cn", "a")))
    assert policy_key(LISTENER, one) == policy_key(LISTENER, two)
    assert policy_key(LISTENER, ServiceClientAuth(require=True)) != policy_key(LISTENER, None)
    assert policy_key(LISTENER, one) != policy_key(LISTENER, ServiceClientAuth(require=True, allow=allow(("cn", "a"))))
    hash(policy_key(LISTENER, one))
