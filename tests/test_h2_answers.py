"""Per-stream answers over HTTP/2 (SPEC 4a): 404, 421, 403, 413, 431, 502 and 504 each
come back as a response on their stream, with the reason in the body, the connection
serving the next stream; the access log says ``"protocol": "HTTP/2"``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from h2client import H2Client
from upstream import ProxyThread, TestUpstream, proxy_config, service

from proxy.config.model import (
    AllowEntry,
    CertificatePair,
    ClientAuthSettings,
    Limits,
    ServiceClientAuth,
    Timeouts,
    TLSSettings,
)

pytestmark = pytest.mark.both_engines

ALICE_ONLY = ServiceClientAuth(require=True, allow=(AllowEntry("cn", "alice"),))


def access_log(tmp_path: Path) -> list[dict]:
    """The JSON access-log lines (read after the proxy closed: everything is written)."""
    return [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines() if line.strip()]


def exchange(client: H2Client, path: str, **kwargs):
    return client.response(client.request(path, **kwargs))


def assert_logged(tmp_path: Path, statuses: list[int]) -> None:
    lines = access_log(tmp_path)
    assert [line["status"] for line in lines] == statuses
    assert all(line["protocol"] == "HTTP/2" for line in lines), lines


def test_404_on_its_stream(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("api", upstream, path_prefix="/api"), tmp_path)) as px:
        with H2Client(pki, px.port) as client:
            missing = exchange(client, "/nothing?q=1")
            assert missing.status == 404 and missing.ended and b"/nothing" in missing.body
            found = exchange(client, "/api/echo")
            assert found.status == 200
    assert [r["target"] for r in upstream.requests] == ["/api/echo"]
    assert_logged(tmp_path, [404, 200])


def test_421_when_authority_reaches_a_service_with_another_client_auth_policy(pki, upstream, tmp_path):
    cert, key = pki.leaf("vhosts", "lax.localhost", "strict.localhost", "other.localhost")
    alice = pki.leaf("alice", "alice@example.com", client=True, cn="alice")
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
        with H2Client(pki, px.port, sni="lax.localhost", cert=alice) as client:
            smuggled = exchange(client, "/echo", authority="strict.localhost")
            assert smuggled.status == 421 and b"strict" in smuggled.body
            same_policy = exchange(client, "/echo", authority="other.localhost")
            assert same_policy.status == 200
        with H2Client(pki, px.port, sni="strict.localhost", cert=alice) as client:
            assert exchange(client, "/echo", authority="strict.localhost").status == 200
    assert len(upstream.requests) == 2
    assert_logged(tmp_path, [421, 200, 200])


def test_403_by_the_service_allow_list(pki, upstream, tmp_path):
    alice = pki.leaf("alice", "alice@example.com", client=True, cn="alice")
    bob = pki.leaf("bob", client=True, cn="bob")
    services = [service("open", upstream), service("private", upstream, path_prefix="/private", client_auth=ALICE_ONLY)]
    config = proxy_config(pki, services, tmp_path, client_auth=ClientAuthSettings(mode="optional", ca=pki.ca_pem))
    with ProxyThread(config) as px:
        with H2Client(pki, px.port) as client:
            anonymous = exchange(client, "/private/x")
            assert anonymous.status == 403 and b"private" in anonymous.body
            assert exchange(client, "/echo").status == 200
        with H2Client(pki, px.port, cert=bob) as client:
            refused = exchange(client, "/private/x")
            assert refused.status == 403 and b"CN=bob" in refused.body
        with H2Client(pki, px.port, cert=alice) as client:
            admitted = exchange(client, "/private/x")
            assert admitted.status == 200 and b"CN=alice" in admitted.body  # xfcc went upstream
    assert [r["target"] for r in upstream.requests] == ["/echo", "/private/x"]
    assert_logged(tmp_path, [403, 200, 403, 200])


def test_413_over_max_body_bytes(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_body_bytes=1000))
    with ProxyThread(config) as px:
        with H2Client(pki, px.port) as client:
            declared = exchange(client, "/echo", method="POST", extra=[("content-length", "2000")], body=b"x" * 2000)
            assert declared.status == 413 and b"1000" in declared.body
            assert upstream.requests == []  # refused from content-length, before forwarding
            streamed = exchange(client, "/echo", method="POST", body=b"y" * 2000)  # no content-length
            assert streamed.status == 413 or streamed.reset is not None, streamed
            accepted = exchange(client, "/echo", method="POST", body=b"z" * 1000)
            assert accepted.status == 200 and b'"body_bytes": 1000' in accepted.body
    assert all(r["target"] == "/echo" for r in upstream.requests)
    assert access_log(tmp_path)[0]["status"] == 413
    assert all(line["protocol"] == "HTTP/2" for line in access_log(tmp_path))


def test_431_over_max_header_bytes_under_the_hard_limit(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_header_bytes=8192))
    with ProxyThread(config) as px:
        with H2Client(pki, px.port) as client:
            big = exchange(client, "/echo", extra=[("x-big", "a" * 10000)])
            assert big.status == 431 and big.ended and big.body
            assert upstream.requests == []
            assert exchange(client, "/echo", extra=[("x-big", "a" * 2000)]).status == 200
    assert_logged(tmp_path, [431, 200])


def test_502_when_the_upstream_is_down(pki, upstream, tmp_path):
    gone = TestUpstream()
    gone.close()
    services = [service("billing", gone, path_prefix="/billing"), service("app", upstream)]
    with ProxyThread(proxy_config(pki, services, tmp_path)) as px:
        with H2Client(pki, px.port) as client:
            down = exchange(client, "/billing/x")
            assert down.status == 502 and b"billing" in down.body and b"refused" in down.body
            assert exchange(client, "/echo").status == 200
    assert_logged(tmp_path, [502, 200])


def test_504_when_the_upstream_is_slow_and_the_neighbour_stream_is_served(pki, upstream, tmp_path):
    timeouts = Timeouts(upstream_response=0.3)
    with ProxyThread(proxy_config(pki, service("reports", upstream), tmp_path, timeouts=timeouts)) as px:
        with H2Client(pki, px.port) as client:
            hanging = client.request("/hang")
            neighbour = client.request("/echo")
            assert client.response(neighbour).status == 200  # not held up by the hanging stream
            slow = client.response(hanging)
            assert slow.status == 504 and b"reports" in slow.body
    assert sorted(line["status"] for line in access_log(tmp_path)) == [200, 504]
    assert all(line["protocol"] == "HTTP/2" for line in access_log(tmp_path))
