"""No client can claim a certificate identity through the header names other proxies use
(SPEC section 4, client identity): nginx's ``X-SSL-Client-*``, Traefik's
``X-Forwarded-Tls-Client-Cert*``, IIS/Azure's ``X-ARR-ClientCert``, AWS's
``X-Amzn-Mtls-Clientcert*``, Apache's ``SSL_CLIENT_*`` and friends are stripped whatever
the forward mode, compared case-insensitively with ``_`` equal to ``-``; ordinary headers
that only look similar still reach the upstream.

The pure rules first (no sockets), then one request through the proxy on each engine,
where the echo upstream reports what arrived.
"""

from __future__ import annotations

import pytest
import requests
from upstream import WAIT, ProxyThread, proxy_config, service

from proxy.config.model import ClientAuthSettings, Service, Upstream
from proxy.forwarding.headers import upstream_request_headers
from proxy.tls.identity import is_identity_header

pytestmark = pytest.mark.both_engines  # the end-to-end test runs on h11 and on httptools

# One spelling per rule of the SPEC's list, then case and underscore variants.
SPOOFED = [
    "X-SSL-Client-Cert",
    "X-SSL-Client-S-DN",
    "X-SSL-Client-Verify",
    "x-ssl-client-fingerprint",
    "X_SSL_Client_Cert",
    "X-SSL-Cert",
    "x_ssl_cert",
    "X-Client-Verify",
    "X-CLIENT-VERIFY",
    "X-Client-DN",
    "x_client_dn",
    "X-Forwarded-Tls-Client-Cert",
    "X-Forwarded-Tls-Client-Cert-Info",
    "x_forwarded_tls_client_cert_info",
    "X-ARR-ClientCert",
    "x-arr-clientcert",
    "X-Amzn-Mtls-Clientcert",
    "X-Amzn-Mtls-Clientcert-Subject",
    "X-Amzn-Mtls-Clientcert-Serial-Number",
    "x_amzn_mtls_clientcert_leaf",
    "SSL_CLIENT_S_DN",
    "SSL_CLIENT_VERIFY",
    "ssl_client_cert",
    "SSL-Client-S-DN-CN",
    # the names stripped before this list grew, still stripped
    "X-Forwarded-Client-Cert",
    "Client-Cert",
    "Client-Cert-Chain",
    "X-Client-Cert",
    "X_Client_Cert_Subject",
]

# Near misses: not on the list, so an upstream must still see them.
ORDINARY = [
    "X-SSL-Something-Else",
    "X-SSL",
    "X-SSL-Client",
    "X-Client-Name",
    "X-Client-Verified-By",
    "X-Client-DN-Hint",
    "X-ARR-Log-Id",
    "X-Amzn-Trace-Id",
    "SSL-Protocol",
    "X-Forwarded-Tls-Version",
]


@pytest.mark.parametrize("name", SPOOFED)
def test_other_proxies_identity_names_are_identity_headers(name):
    assert is_identity_header(name.encode())
    assert is_identity_header(name.lower().encode())


@pytest.mark.parametrize("name", ORDINARY)
def test_similar_ordinary_names_are_not(name):
    assert not is_identity_header(name.encode())
    assert not is_identity_header(name.lower().encode())


SERVICE = Service(name="api", upstreams=(Upstream("http://127.0.0.1:9000", "127.0.0.1", 9000),))


def test_the_rewriter_strips_them_and_keeps_the_ordinary_ones():
    incoming = [(b"host", b"api.localhost")]
    incoming += [(name.lower().encode(), b"CN=admin") for name in SPOOFED + ORDINARY]
    incoming.append((b"x-request-id", b"abc-123"))
    out, request_id = upstream_request_headers(incoming, client_ip="1.2.3.4", server_port=8443, service=SERVICE)
    names = [name for name, _ in out]
    for name in SPOOFED:
        assert name.lower().encode() not in names
    for name in ORDINARY:
        assert name.lower().encode() in names
    assert request_id == b"abc-123" and (b"x-request-id", b"abc-123") in out


# --- through the proxy --------------------------------------------------------------


@pytest.mark.parametrize("forward", ["none", "xfcc", "rfc9440", "headers"])
def test_spoofed_identity_headers_never_reach_the_upstream(pki, upstream, tmp_path, forward):
    client_auth = ClientAuthSettings(mode="optional", ca=pki.ca_pem, forward=forward)
    sent = {name: "CN=admin" for name in SPOOFED + ORDINARY}
    sent["X-Request-Id"] = "spoof-test-1"
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path, client_auth=client_auth)) as px:
        response = requests.get(px.url("/echo"), headers=sent, verify=str(pki.ca_pem), timeout=WAIT)
    assert response.status_code == 200
    arrived = {name.lower(): value for name, value in response.json()["headers"]}
    leaked = [name for name in SPOOFED if name.lower() in arrived]
    assert leaked == []
    for name in ORDINARY:
        assert arrived[name.lower()] == "CN=admin"
    assert arrived["x-request-id"] == "spoof-test-1"
    assert "admin" not in arrived.get("x-forwarded-client-cert", "")
