"""Mutual TLS through the real proxy, case by case: each client_auth mode, each
allow-list kind (admitted and refused), each refused certificate (untrusted CA, expired,
not yet valid, wrong EKU, revoked by the CRL) with the TLS alert and the log line, and
the forward modes' exact bytes (XFCC Hash = SHA-256 of the leaf DER, RFC 9440 = the DER)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import ssl
import subprocess

import pytest
import requests
from upstream import WAIT, ProxyThread, TestUpstream, proxy_config, proxy_log_waiter, service

from proxy.config.model import AllowEntry, ClientAuthSettings

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools


@pytest.fixture(scope="module")
def upstream():
    with TestUpstream() as up:
        yield up


def leaf_der(cert_path) -> bytes:
    end = "-----END CERTIFICATE-----"
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text().split(end)[0] + end + "\n")


def get(pki, px: ProxyThread, cert=None, path: str = "/echo") -> requests.Response:
    cert = (str(cert[0]), str(cert[1])) if cert else None
    return requests.get(px.url(path), verify=str(pki.ca_pem), cert=cert, timeout=WAIT)


def mtls(pki, upstream, tmp_path, **client_auth) -> ProxyThread:
    settings = ClientAuthSettings(**{"ca": pki.ca_pem, **client_auth})
    return ProxyThread(proxy_config(pki, service("app", upstream), tmp_path, client_auth=settings))


def test_mode_none_asks_for_no_certificate_and_forwards_no_identity(pki, upstream, tmp_path):
    alice = pki.leaf("m-alice", client=True, cn="alice")
    with mtls(pki, upstream, tmp_path, mode="none") as px:
        response = get(pki, px, cert=alice)
    assert response.status_code == 200
    assert "x-forwarded-client-cert" not in dict(response.json()["headers"])


def test_mode_optional_admits_with_and_without_a_certificate(pki, upstream, tmp_path):
    alice = pki.leaf("m-alice", client=True, cn="alice")
    with mtls(pki, upstream, tmp_path, mode="optional") as px:
        anonymous = get(pki, px)
        with_cert = get(pki, px, cert=alice)
    assert anonymous.status_code == 200 and "x-forwarded-client-cert" not in dict(anonymous.json()["headers"])
    assert 'Subject="CN=alice"' in dict(with_cert.json()["headers"])["x-forwarded-client-cert"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_mode_require_refuses_a_client_without_certificate_with_an_alert(pki, upstream, tmp_path):
    before = len(upstream.requests)
    with mtls(pki, upstream, tmp_path, mode="require") as px:
        with proxy_log_waiter("failed: client sent no certificate") as waiter:
            result = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{px.port}", "-servername", "localhost",
                 "-CAfile", str(pki.ca_pem), "-quiet"],
                input=b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                capture_output=True, timeout=WAIT,
            )
            assert waiter.seen.wait(WAIT), waiter.messages
    assert b"alert certificate required" in result.stderr
    assert b"HTTP/1.1" not in result.stdout
    assert len(upstream.requests) == before


REFUSED = {
    # stem: (pki.leaf keyword arguments, words in the log line)
    "untrusted-ca": ({"client": True, "ca": "other"}, "untrusted"),
    "expired": ({"client": True, "expired": True}, "expired"),
    "not-yet-valid": ({"client": True, "not_yet_valid": True}, "not yet valid"),
    "wrong-eku": ({"client": False}, "client authentication"),
}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("case", REFUSED, ids=REFUSED)
def test_refused_client_certificates_get_an_alert_and_a_reason(pki, upstream, tmp_path, case):
    options, words = REFUSED[case]
    cert, key = pki.leaf(f"refused-{case}", "refused.example", cn=case, **options)
    before = len(upstream.requests)
    with mtls(pki, upstream, tmp_path, mode="require") as px:
        with proxy_log_waiter("TLS handshake with 127.0.0.1:") as waiter:
            result = subprocess.run(
                ["curl", "-sS", "--max-time", str(WAIT), "--cacert", str(pki.ca_pem),
                 "--cert", str(cert), "--key", str(key), px.url("/echo")],
                capture_output=True, timeout=WAIT + 5,
            )
            assert waiter.seen.wait(WAIT), waiter.messages
    assert result.returncode != 0 and b"alert" in result.stderr  # the TLS alert reached curl
    assert words in waiter.messages[-1], waiter.messages
    assert len(upstream.requests) == before


def test_revoked_client_certificate_is_refused_by_the_crl(pki, upstream, tmp_path):
    revoked = pki.leaf("revoked", client=True, cn="revoked")
    fine = pki.leaf("not-revoked", client=True, cn="fine")
    crl = pki.crl([revoked[0]])
    with mtls(pki, upstream, tmp_path, mode="require", crl=crl) as px:
        with proxy_log_waiter("revoked") as waiter:
            with pytest.raises(requests.exceptions.SSLError):
                get(pki, px, cert=revoked)
            assert waiter.seen.wait(WAIT), waiter.messages
        assert get(pki, px, cert=fine).status_code == 200


ALLOW_CASES = {
    # kind: (the allow entry value, names + options for the admitted cert, for the refused cert)
    "cn": ("billing", ((), {"cn": "billing"}), ((), {"cn": "reports"})),
    "ou": ("payments", ((), {"cn": "p1", "ou": "payments"}), ((), {"cn": "p2", "ou": "sales"})),
    "dns": ("*.svc.test", (("api.svc.test",), {}), (("a.b.svc.test",), {})),
    "uri": ("spiffe://test.local/billing", (("spiffe://test.local/billing",), {}), (("spiffe://test.local/reports",), {})),
    "email": ("ops@example.org", (("OPS@example.org",), {}), (("dev@example.org",), {})),
}


@pytest.mark.parametrize("kind", [*ALLOW_CASES, "fingerprint"])
def test_each_allow_list_kind_admits_its_match_and_refuses_others(pki, upstream, tmp_path, kind):
    if kind == "fingerprint":
        admitted = pki.leaf("fp-yes", "fp-yes.test", client=True)
        refused = pki.leaf("fp-no", "fp-no.test", client=True)
        value = hashlib.sha256(leaf_der(admitted[0])).hexdigest()
    else:
        value, (yes_names, yes_opts), (no_names, no_opts) = ALLOW_CASES[kind]
        admitted = pki.leaf(f"allow-{kind}-yes", *yes_names, client=True, **yes_opts)
        refused = pki.leaf(f"allow-{kind}-no", *no_names, client=True, **no_opts)
    allow = (AllowEntry(kind, value),)
    with mtls(pki, upstream, tmp_path, mode="require", allow=allow) as px:
        yes = get(pki, px, cert=admitted)
        no = get(pki, px, cert=refused)
    assert yes.status_code == 200
    assert no.status_code == 403 and "is not allowed for service 'app'" in no.text


def test_forward_rfc9440_carries_the_exact_der(pki, upstream, tmp_path):
    alice = pki.leaf("rfc-alice", client=True, cn="alice")
    with mtls(pki, upstream, tmp_path, mode="optional", forward="rfc9440") as px:
        seen = dict(get(pki, px, cert=alice).json()["headers"])
    value = seen["client-cert"]
    assert value.startswith(":") and value.endswith(":")
    assert base64.b64decode(value[1:-1]) == leaf_der(alice[0])
    chain = [base64.b64decode(item.strip()[1:-1]) for item in seen["client-cert-chain"].split(",")]
    assert leaf_der(pki.ca_pem) in chain
    assert "x-forwarded-client-cert" not in seen


def test_forward_xfcc_hash_is_the_sha256_of_the_leaf_der(pki, upstream, tmp_path):
    alice = pki.leaf("xfcc-alice", "spiffe://test.local/alice", "alice.svc.test", client=True, cn="alice")
    with mtls(pki, upstream, tmp_path, mode="optional", forward="xfcc") as px:
        xfcc = dict(get(pki, px, cert=alice).json()["headers"])["x-forwarded-client-cert"]
    fields = xfcc.split(";")
    assert fields[0] == "Hash=" + hashlib.sha256(leaf_der(alice[0])).hexdigest()
    assert 'Subject="CN=alice"' in fields
    assert "URI=spiffe://test.local/alice" in fields and "DNS=alice.svc.test" in fields


def test_forward_none_sends_no_identity_but_still_strips_spoofs(pki, upstream, tmp_path):
    alice = pki.leaf("none-alice", client=True, cn="alice")
    with mtls(pki, upstream, tmp_path, mode="optional", forward="none") as px:
        response = requests.get(px.url("/echo"), verify=str(pki.ca_pem), cert=(str(alice[0]), str(alice[1])),
                                headers={"X-Forwarded-Client-Cert": "Hash=forged", "Client-Cert": ":Zm9v:"},
                                timeout=WAIT)
    seen = dict(response.json()["headers"])
    assert "x-forwarded-client-cert" not in seen and "client-cert" not in seen
