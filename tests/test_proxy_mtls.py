"""Mutual TLS through the proxy: identity headers, per-service allow-lists (403) and
SNI/Host agreement (421), with curl --cert and requests cert=(...)."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import requests
from upstream import WAIT, ProxyThread, proxy_config, service

from proxy.config.model import AllowEntry, CertificatePair, ClientAuthSettings, ServiceClientAuth, TLSSettings

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools

ALICE_ONLY = ServiceClientAuth(require=True, allow=(AllowEntry("cn", "alice"),))


@pytest.fixture
def alice(pki):
    return pki.leaf("alice", "alice@example.com", client=True, cn="alice")


@pytest.fixture
def bob(pki):
    return pki.leaf("bob", client=True, cn="bob")


def mtls_proxy(pki, upstream, tmp_path, forward: str = "xfcc") -> ProxyThread:
    services = [
        service("open", upstream),
        service("private", upstream, path_prefix="/private", client_auth=ALICE_ONLY),
    ]
    client_auth = ClientAuthSettings(mode="optional", ca=pki.ca_pem, forward=forward)
    return ProxyThread(proxy_config(pki, services, tmp_path, client_auth=client_auth))


def get(pki, url: str, cert=None, **kwargs) -> requests.Response:
    cert = (str(cert[0]), str(cert[1])) if cert else None
    return requests.get(url, verify=str(pki.ca_pem), cert=cert, timeout=WAIT, **kwargs)


def seen_headers(response: requests.Response) -> dict[str, str]:
    return dict(response.json()["headers"])


def test_service_allow_list_admits_alice_and_refuses_others(pki, upstream, tmp_path, alice, bob):
    with mtls_proxy(pki, upstream, tmp_path) as px:
        assert get(pki, px.url("/echo")).status_code == 200  # open service, no certificate
        anonymous = get(pki, px.url("/private/x"))
        assert anonymous.status_code == 403 and "private" in anonymous.text
        refused = get(pki, px.url("/private/x"), cert=bob)
        assert refused.status_code == 403
        assert "CN=bob" in refused.text and "private" in refused.text
        admitted = get(pki, px.url("/private/x"), cert=alice)
        assert admitted.status_code == 200 and admitted.json()["target"] == "/private/x"
    assert [r["target"] for r in upstream.requests] == ["/echo", "/private/x"]


def test_xfcc_carries_the_verified_certificate_and_spoofs_are_stripped(pki, upstream, tmp_path, alice):
    spoofs = {"X-Forwarded-Client-Cert": "Hash=00;Subject=\"CN=admin\"", "X-Client-Cert-Subject": "CN=admin",
              "X_Client_Cert_Subject": "CN=admin", "Client-Cert": ":AAAA:"}
    with mtls_proxy(pki, upstream, tmp_path) as px:
        anonymous = seen_headers(get(pki, px.url("/echo"), headers=spoofs))
        with_cert = seen_headers(get(pki, px.url("/private/a"), cert=alice, headers=spoofs))
    for name in ("x-forwarded-client-cert", "x-client-cert-subject", "x_client_cert_subject", "client-cert"):
        assert name not in anonymous
    xfcc = with_cert["x-forwarded-client-cert"]
    assert xfcc.startswith("Hash=") and 'Subject="CN=alice"' in xfcc and "admin" not in xfcc
    assert "x-client-cert-subject" not in with_cert and "client-cert" not in with_cert


def test_headers_forward_mode_with_curl(pki, upstream, tmp_path, alice):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    with mtls_proxy(pki, upstream, tmp_path, forward="headers") as px:
        result = subprocess.run(
            ["curl", "-sS", "--max-time", str(WAIT), "--cacert", str(pki.ca_pem),
             "--cert", str(alice[0]), "--key", str(alice[1]), px.url("/private/c")],
            capture_output=True, timeout=WAIT + 5, check=True,
        )
        refused = subprocess.run(
            ["curl", "-sS", "--max-time", str(WAIT), "--cacert", str(pki.ca_pem), "-w", "\n%{http_code}",
             px.url("/private/c")],
            capture_output=True, timeout=WAIT + 5,
        )
    seen = dict(json.loads(result.stdout)["headers"])
    assert seen["x-client-cert-subject"] == "CN=alice"
    assert seen["x-client-cert-fingerprint"].startswith("sha256:")
    assert "alice@example.com" in seen["x-client-cert-san"]
    assert refused.stdout.endswith(b"\n403")


def request_with_sni(pki, port: int, sni: str, host: str, cert=None) -> bytes:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        with context.wrap_socket(sock, server_hostname=sni) as tls:
            tls.sendall(f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def test_sni_and_host_must_agree_when_policies_differ(pki, upstream, tmp_path, alice):
    cert, key = pki.leaf("vhosts", "lax.localhost", "strict.localhost", "other.localhost")
    services = [
        service("lax", upstream, hosts=("lax.localhost",)),
        service("other", upstream, hosts=("other.localhost",)),
        service("strict", upstream, hosts=("strict.localhost",), client_auth=ALICE_ONLY),
    ]
    config = proxy_config(
        pki, services, tmp_path,
        tls=TLSSettings(certificates=(CertificatePair(Path(cert), Path(key)),)),
        client_auth=ClientAuthSettings(mode="optional", ca=pki.ca_pem),
    )
    with ProxyThread(config) as px:
        smuggled = request_with_sni(pki, px.port, "lax.localhost", "strict.localhost", cert=alice)
        assert smuggled.startswith(b"HTTP/1.1 421 ") and b"strict" in smuggled
        direct = request_with_sni(pki, px.port, "strict.localhost", "strict.localhost", cert=alice)
        assert direct.startswith(b"HTTP/1.1 200 ")
        same_policy = request_with_sni(pki, px.port, "lax.localhost", "other.localhost")
        assert same_policy.startswith(b"HTTP/1.1 200 ")
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_access_log_names_the_client_certificate_and_the_refused_one(pki, upstream, tmp_path, alice, bob,
                                                                      log_format):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from proxy.config.model import AccessLogSettings

    def fingerprint(pair) -> str:
        leaf = x509.load_pem_x509_certificate(Path(pair[0]).read_bytes())
        return "sha256:" + leaf.fingerprint(hashes.SHA256()).hex()

    log_path = tmp_path / "access.log"
    services = [service("open", upstream), service("private", upstream, path_prefix="/private", client_auth=ALICE_ONLY)]
    config = proxy_config(pki, services, tmp_path,
                          client_auth=ClientAuthSettings(mode="optional", ca=pki.ca_pem),
                          access_log=AccessLogSettings(format=log_format, path=str(log_path)))
    with ProxyThread(config) as px:
        assert get(pki, px.url("/echo")).status_code == 200
        assert get(pki, px.url("/private/x"), cert=alice).status_code == 200
        assert get(pki, px.url("/private/x"), cert=bob).status_code == 403
    anonymous, admitted, refused = log_path.read_text().splitlines()
    if log_format == "json":
        anonymous, admitted, refused = map(json.loads, (anonymous, admitted, refused))
        assert "client_subject" not in anonymous and "client_fingerprint" not in anonymous
        assert (admitted["client_subject"], admitted["client_fingerprint"]) == ("CN=alice", fingerprint(alice))
        assert refused["status"] == 403
        assert (refused["client_subject"], refused["client_fingerprint"]) == ("CN=bob", fingerprint(bob))
    else:
        assert "client_subject" not in anonymous
        assert admitted.endswith(f" client_subject=CN=alice client_fingerprint={fingerprint(alice)}")
        assert '"GET /private/x HTTP/1.1" 403 ' in refused
        assert refused.endswith(f" client_subject=CN=bob client_fingerprint={fingerprint(bob)}")
