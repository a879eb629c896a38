"""https:// upstreams with upstream_tls, and listen_plain: the sidecar pair over HTTP/1.1.

Two real proxies in process: the *ingress* (client_auth require, an allow-list, XFCC to
an echo upstream) and the *egress* (a ``listen_plain`` listener, its service's upstream
the ingress over ``https://`` with a client certificate). Clients are ``http.client``
on the egress's plain port; every certificate comes from the session PKI.
"""

from __future__ import annotations

import contextlib
import http.client
import json
from pathlib import Path

import pytest
from test_proxy_reload import publish
from upstream import WAIT, ProxyThread, proxy_config, proxy_log_waiter, service

from proxy.config.model import (
    AllowEntry,
    CertificatePair,
    ClientAuthSettings,
    ListenAddress,
    Service,
    ServiceClientAuth,
    TLSSettings,
    Upstream,
    UpstreamTLSSettings,
)

PLAIN = (ListenAddress("127.0.0.1", 0),)


def ingress_config(pki, upstream, folder: Path, *, allow=("egress",), cert=None):
    folder.mkdir(exist_ok=True)
    overrides = {}
    if cert is not None:
        overrides["tls"] = TLSSettings(certificates=(CertificatePair(*cert),))
    return proxy_config(
        pki, service("app", upstream), folder,
        client_auth=ClientAuthSettings(
            mode="require", ca=pki.ca_pem, allow=tuple(AllowEntry("cn", cn) for cn in allow), forward="xfcc",
        ),
        **overrides,
    )


def egress_config(pki, port: int, folder: Path, **tls):
    """The egress: plain listener, service 'remote' -> https://127.0.0.1:PORT."""
    folder.mkdir(exist_ok=True)
    remote = Service(
        name="remote",
        upstreams=(Upstream(f"https://127.0.0.1:{port}", "127.0.0.1", port, "https"),),
        upstream_tls=UpstreamTLSSettings(**tls),
    )
    return proxy_config(pki, remote, folder, listen_plain=PLAIN)


def egress_cert(pki, cn="egress"):
    return pki.leaf(cn, cn, client=True, cn=cn)


def plain_get(px: ProxyThread, path="/echo", headers=None, conn=None):
    """(status, body) of a GET on the egress's plain listener."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", px.running.plain_addresses[0][1], timeout=WAIT)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def header(body: bytes, name: str) -> list[str]:
    return [value for key, value in json.loads(body)["headers"] if key.lower() == name]


@pytest.fixture
def ingress(pki, upstream, tmp_path):
    with ProxyThread(ingress_config(pki, upstream, tmp_path / "ingress")) as px:
        yield px


def test_sidecar_pair_carries_a_plain_request_over_mtls(pki, ingress, tmp_path):
    cert, key = egress_cert(pki)
    config = egress_config(pki, ingress.port, tmp_path / "egress", ca=pki.ca_pem, cert=cert, key=key)
    with ProxyThread(config) as egress:
        status, body = plain_get(egress, headers={"X-Forwarded-Client-Cert": "Subject=\"CN=admin\""})
    assert status == 200, body
    (xfcc,) = header(body, "x-forwarded-client-cert")  # the spoofed one never arrives
    assert 'Subject="CN=egress"' in xfcc


def test_sidecar_pair_refused_twin_gets_the_ingress_403(pki, ingress, tmp_path):
    cert, key = egress_cert(pki, "stranger")
    config = egress_config(pki, ingress.port, tmp_path / "egress", ca=pki.ca_pem, cert=cert, key=key)
    with ProxyThread(config) as egress:
        status, body = plain_get(egress)
    assert status == 403
    assert b"CN=stranger" in body and b"'app'" in body


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("no client certificate", b"requires a client certificate and this service presents none"),
        ("wrong CA", b"its certificate chains to a self-signed CA that is not in upstream_tls.ca (ca.pem) "
                     b"(unknown issuer)"),
        ("name mismatch", b"does not name 'wrong.example' (hostname mismatch)"),
    ],
)
def test_upstream_tls_failures_are_502_naming_the_reason(pki, ingress, tmp_path, case, words):
    cert, key = egress_cert(pki)
    tls = {
        "no client certificate": {"ca": pki.ca_pem},
        "wrong CA": {"ca": pki.other_ca_pem, "cert": cert, "key": key},
        "name mismatch": {"ca": pki.ca_pem, "cert": cert, "key": key, "server_name": "wrong.example"},
    }[case]
    config = egress_config(pki, ingress.port, tmp_path / "egress", **tls)
    with ProxyThread(config) as egress, proxy_log_waiter("service 'remote'") as waiter:
        status, body = plain_get(egress)
        assert waiter.seen.wait(WAIT)
    assert status == 502, body
    assert body.startswith(b"service 'remote': ") and f"https://127.0.0.1:{ingress.port}".encode() in body
    assert words in body, body
    (line,) = [m for m in waiter.messages if "service 'remote'" in m]  # one log line, the same reason
    assert words.decode() in line


def test_expired_upstream_certificate_is_502(pki, upstream, tmp_path):
    expired = pki.leaf("expired-ingress", "localhost", "127.0.0.1", expired=True)
    cert, key = egress_cert(pki)
    with ProxyThread(ingress_config(pki, upstream, tmp_path / "ingress", cert=expired)) as ingress:
        config = egress_config(pki, ingress.port, tmp_path / "egress", ca=pki.ca_pem, cert=cert, key=key)
        with ProxyThread(config) as egress:
            status, body = plain_get(egress)
    assert status == 502
    assert b"its certificate has expired" in body
    assert upstream.accepts == 0


def test_system_trust_store_does_not_trust_a_private_ca(pki, ingress, tmp_path):
    """No upstream_tls.ca: the system store, which does not hold the session CA."""
    cert, key = egress_cert(pki)
    config = egress_config(pki, ingress.port, tmp_path / "egress", cert=cert, key=key)
    with ProxyThread(config) as egress:
        status, body = plain_get(egress)
    assert status == 502
    assert b"not in the system trust store (unknown issuer)" in body


def test_server_name_is_verified_and_sent(pki, upstream, tmp_path):
    """server_name 'api.localhost': the ingress picks its certificate by that SNI."""
    api = pki.leaf("api", "api.localhost")
    ingress = ingress_config(pki, upstream, tmp_path / "ingress")
    ingress = ingress.__class__(**{**ingress.__dict__, "tls": TLSSettings(
        certificates=(CertificatePair(*pki.server), CertificatePair(*api)))})
    cert, key = egress_cert(pki)
    with ProxyThread(ingress) as px:
        config = egress_config(pki, px.port, tmp_path / "egress", ca=pki.ca_pem, cert=cert, key=key,
                               server_name="api.localhost")
        with ProxyThread(config) as egress:
            status, body = plain_get(egress)
    assert status == 200, body


def test_tls_upstream_connection_is_reused(pki, upstream, tmp_path):
    cert, key = egress_cert(pki)
    with ProxyThread(ingress_config(pki, upstream, tmp_path / "ingress")) as ingress:
        config = egress_config(pki, ingress.port, tmp_path / "egress", ca=pki.ca_pem, cert=cert, key=key)
        with ProxyThread(config) as egress:
            conn = http.client.HTTPConnection("127.0.0.1", egress.running.plain_addresses[0][1], timeout=WAIT)
            with contextlib.closing(conn):
                assert plain_get(egress, conn=conn)[0] == 200
                assert plain_get(egress, conn=conn)[0] == 200
            # two fresh client connections reuse the pooled TLS connection too
            assert plain_get(egress)[0] == 200
            assert egress.running.state.pool.connects == 1
    records = [json.loads(line) for line in (tmp_path / "ingress" / "access.log").read_text().splitlines()]
    assert [r["status"] for r in records] == [200, 200, 200]
    assert len({r["client"] for r in records}) == 1  # one TLS connection (one handshake) at the ingress
    assert records[0]["tls_version"] == "TLSv1.3"


def test_upstream_client_certificate_change_reloads(pki, upstream, tmp_path):
    first, second = egress_cert(pki, "egress"), egress_cert(pki, "egress-next")
    pair = publish(first, tmp_path / "live")
    with ProxyThread(ingress_config(pki, upstream, tmp_path / "ingress", allow=("egress", "egress-next"))) as ingress:
        config = egress_config(pki, ingress.port, tmp_path / "egress", ca=pki.ca_pem, cert=pair.cert, key=pair.key)
        with ProxyThread(config, config_source=lambda: config, watch_interval=0.05) as egress:
            conn = http.client.HTTPConnection("127.0.0.1", egress.running.plain_addresses[0][1], timeout=WAIT)
            with contextlib.closing(conn):
                status, body = plain_get(egress, conn=conn)
                assert status == 200 and 'Subject="CN=egress"' in header(body, "x-forwarded-client-cert")[0]
                with proxy_log_waiter("reloaded the configuration") as waiter:
                    publish(second, tmp_path / "live")
                    assert waiter.seen.wait(WAIT), waiter.messages
                status, body = plain_get(egress, conn=conn)
            assert status == 200 and 'Subject="CN=egress-next"' in header(body, "x-forwarded-client-cert")[0]
            assert egress.running.state.pool.connects == 2


def test_plain_listener_forwards_http_and_no_identity(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path, listen_plain=PLAIN)
    with ProxyThread(config) as px:
        status, body = plain_get(px, headers={"X-Client-Cert-Subject": "CN=admin", "X-Forwarded-Proto": "https"})
    assert status == 200
    assert header(body, "x-forwarded-proto") == ["http"]
    assert header(body, "x-client-cert-subject") == []
    assert "proto=http" in header(body, "forwarded")[0]
    record = json.loads((tmp_path / "access.log").read_text().splitlines()[0])
    assert record["status"] == 200 and record["tls_version"] is None


def test_plain_listener_refuses_services_that_require_a_certificate(pki, upstream, tmp_path):
    strict = service("strict", upstream, client_auth=ServiceClientAuth(require=True))
    config = proxy_config(pki, strict, tmp_path, listen_plain=PLAIN,
                          client_auth=ClientAuthSettings(mode="optional", ca=pki.ca_pem))
    with ProxyThread(config) as px:
        status, body = plain_get(px)
    assert status == 403
    assert b"no client certificate was presented" in body
    assert upstream.accepts == 0


def test_pooled_tls_connections_are_never_shared_across_upstream_tls_settings(pki, upstream, tmp_path):
    """Two services, one upstream, two client certificates: each request presents its
    own service's certificate, whatever the other left in the pool."""
    (cert_a, key_a), (cert_b, key_b) = egress_cert(pki, "egress"), egress_cert(pki, "egress-b")
    with ProxyThread(ingress_config(pki, upstream, tmp_path / "ingress", allow=("egress", "egress-b"))) as ingress:
        target = Upstream(f"https://127.0.0.1:{ingress.port}", "127.0.0.1", ingress.port, "https")
        services = [
            Service(name=name, upstreams=(target,), path_prefix=f"/{name}",
                    upstream_tls=UpstreamTLSSettings(ca=pki.ca_pem, cert=cert, key=key))
            for name, cert, key in (("a", cert_a, key_a), ("b", cert_b, key_b))
        ]
        (tmp_path / "egress").mkdir()
        with ProxyThread(proxy_config(pki, services, tmp_path / "egress", listen_plain=PLAIN)) as egress:
            conn = http.client.HTTPConnection("127.0.0.1", egress.running.plain_addresses[0][1], timeout=WAIT)
            with contextlib.closing(conn):
                seen = [header(plain_get(egress, f"/{name}/echo", conn=conn)[1], "x-forwarded-client-cert")[0]
                        for name in ("a", "b", "a", "b")]
            assert egress.running.state.pool.connects == 2
    assert ['CN=egress-b' in xfcc for xfcc in seen] == [False, True, False, True]
    assert all('Subject="CN=egress' in xfcc for xfcc in seen)


def test_an_expired_upstream_client_certificate_is_warned_about(pki, tmp_path):
    """The certificate presented upstream is watched for expiry like the server's."""
    cert, key = pki.leaf("old-egress", "old-egress", client=True, expired=True)
    config = egress_config(pki, 9, tmp_path / "egress", ca=pki.ca_pem, cert=cert, key=key)
    with proxy_log_waiter("EXPIRED") as waiter, ProxyThread(config):
        assert waiter.seen.wait(WAIT)
    assert [m for m in waiter.messages if "EXPIRED" in m and str(cert) in m]
