"""What clients see when things go wrong (SPEC section 6), through real sockets."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess

import pytest
import requests
from upstream import WAIT, ProxyThread, TestUpstream, proxy_config, proxy_log_waiter, service

from proxy.config.model import ClientAuthSettings, Limits, Timeouts

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools


def get(pki, url: str, **kwargs) -> requests.Response:
    return requests.get(url, verify=str(pki.ca_pem), timeout=WAIT, **kwargs)


def tls_socket(pki, port: int, timeout: float = WAIT) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname="localhost")


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the
    socket timeout: a server that keeps the connection open fails the test)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def raw_exchange(pki, port: int, data: bytes) -> bytes:
    with tls_socket(pki, port) as tls:
        tls.sendall(data)
        return read_until_closed(tls)


def curl(*args: str, pki) -> subprocess.CompletedProcess:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(WAIT), "--cacert", str(pki.ca_pem), *args],
        capture_output=True, timeout=WAIT + 5,
    )


@pytest.fixture
def proxy_log():
    with contextlib.ExitStack() as stack:
        yield lambda text: stack.enter_context(proxy_log_waiter(text))


def test_plain_http_on_the_tls_port_gets_a_plain_400(proxy, pki, upstream):
    result = curl("-w", "\n%{http_code}", f"http://127.0.0.1:{proxy.port}/echo", pki=pki)
    assert result.stdout.endswith(b"\n400")
    assert b"https://" in result.stdout
    response = requests.get(f"http://127.0.0.1:{proxy.port}/", timeout=WAIT)
    assert response.status_code == 400 and "https://" in response.text
    assert response.headers["connection"] == "close"
    assert upstream.accepts == 0
    # ...while the same port still speaks TLS
    assert get(pki, proxy.url("/echo")).status_code == 200


SMUGGLING = {
    "cl-and-te": b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "te-and-cl": b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Length: 3\r\n\r\n0\r\n\r\n",
    "two-content-lengths": b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n"
                           b"Content-Length: 7\r\n\r\nabcdefg",
    "te-not-chunked": b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    "control-byte": b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n",
    "space-before-colon": b"GET /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length : 5\r\n\r\nhello",
}


@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_ambiguous_requests_get_400_close_and_never_reach_the_upstream(proxy, pki, upstream, raw):
    answer = raw_exchange(pki, proxy.port, raw)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer.lower()
    assert answer.count(b"HTTP/1.1") == 1  # nothing else was answered on that connection
    assert upstream.accepts == 0 and upstream.requests == []


def test_malformed_chunked_body_gets_400_and_close(proxy, pki, upstream):
    # The head is fine and is forwarded as it streams; the broken chunk ends both sides.
    raw = b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
    answer = raw_exchange(pki, proxy.port, raw)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1") == 1


def test_refused_requests_are_in_the_access_log(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        raw_exchange(pki, px.port, SMUGGLING["cl-and-te"])
    record = json.loads((tmp_path / "access.log").read_text().splitlines()[-1])
    assert (record["status"], record["method"], record["upstream"]) == (400, None, None)


def test_smuggling_after_a_good_request_on_the_same_connection(proxy, pki, upstream):
    good = b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer = raw_exchange(pki, proxy.port, good + SMUGGLING["cl-and-te"])
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 400 " in answer
    assert [r["target"] for r in upstream.requests] == ["/echo"]


def test_refused_request_after_a_head_request_still_gets_its_400_body(proxy, pki, upstream):
    """The refusal is a response of its own: it does not inherit HEAD's "no body"."""
    head = b"HEAD /echo HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer = raw_exchange(pki, proxy.port, head + SMUGGLING["cl-and-te"])
    assert answer.startswith(b"HTTP/1.1 200 ")
    refusal = answer[answer.index(b"HTTP/1.1 400 "):]
    assert refusal.endswith(b"Content-Length and Transfer-Encoding\n")
    assert [r["target"] for r in upstream.requests] == ["/echo"]


def test_header_section_too_big_gets_431(proxy, pki, upstream):
    response = get(pki, proxy.url("/echo"), headers={"X-Big": "a" * 70000})
    assert response.status_code == 431
    assert upstream.accepts == 0
    assert get(pki, proxy.url("/echo"), headers={"X-Big": "a" * 30000}).status_code == 200


def test_body_limit(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_body_bytes=1000))
    with ProxyThread(config) as px:
        refused = requests.post(px.url("/echo"), data=b"x" * 2000, verify=str(pki.ca_pem), timeout=WAIT)
        assert refused.status_code == 413 and "1000" in refused.text
        assert upstream.accepts == 0  # refused from Content-Length, before forwarding
        accepted = requests.post(px.url("/echo"), data=b"x" * 1000, verify=str(pki.ca_pem), timeout=WAIT)
        assert accepted.status_code == 200 and accepted.json()["body_bytes"] == 1000

        def chunks():
            for _ in range(10):
                yield b"y" * 500

        try:  # chunked: found out mid-stream -> 413 if nothing was answered yet, else close
            streamed = requests.post(px.url("/echo"), data=chunks(), verify=str(pki.ca_pem), timeout=WAIT)
        except requests.ConnectionError:
            pass
        else:
            assert streamed.status_code == 413
        assert all(r.get("body_bytes", 0) <= 1000 for r in upstream.requests)


def test_no_matching_service_gets_404_naming_host_and_path(pki, upstream, tmp_path):
    api = service("api", upstream, hosts=("api.localhost",))
    with ProxyThread(proxy_config(pki, api, tmp_path)) as px:
        missing = get(pki, px.url("/some/path?q=1"), headers={"Host": "other.localhost"})
        assert missing.status_code == 404
        assert "other.localhost" in missing.text and "/some/path" in missing.text
        assert get(pki, px.url("/x"), headers={"Host": "api.localhost"}).status_code == 200


def test_refused_upstream_gets_502_naming_the_service(pki, tmp_path):
    gone = TestUpstream()
    gone.close()
    with ProxyThread(proxy_config(pki, service("billing", gone), tmp_path)) as px:
        response = get(pki, px.url("/echo"))
    assert response.status_code == 502
    assert "billing" in response.text and "refused" in response.text


def test_slow_upstream_gets_504_naming_the_service(pki, upstream, tmp_path):
    timeouts = Timeouts(upstream_response=0.3)
    with ProxyThread(proxy_config(pki, service("reports", upstream), tmp_path, timeouts=timeouts)) as px:
        response = get(pki, px.url("/hang"))
        assert response.status_code == 504 and "reports" in response.text
        assert get(pki, px.url("/echo")).status_code == 200  # other requests unaffected


def test_upstream_dying_mid_response_closes_the_client_connection(proxy, pki):
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)):
        get(pki, proxy.url("/die")).content
    result = curl("--http1.1", "-o", "/dev/null", proxy.url("/die"), pki=pki)
    assert result.returncode == 18  # CURLE_PARTIAL_FILE: no fake success
    result = curl("--http2", "-o", "/dev/null", proxy.url("/die"), pki=pki)
    assert result.returncode == 92 and b"INTERNAL_ERROR" in result.stderr  # HTTP/2: the stream is reset


def test_stale_pooled_connection_is_retried_only_when_safe(proxy, pki, upstream):
    with requests.Session() as session:
        session.trust_env = False
        session.verify = str(pki.ca_pem)
        assert session.get(proxy.url("/close-reused"), timeout=WAIT).status_code == 200
        # The pooled connection is closed by the upstream as this request arrives:
        # nothing was answered and there is no body, so it is re-sent on a new connection.
        assert session.get(proxy.url("/close-reused"), timeout=WAIT).status_code == 200
        assert upstream.accepts == 2
        # With a body already streamed upstream, it cannot be re-sent: 502.
        assert session.post(proxy.url("/close-reused"), data=b"x" * 100, timeout=WAIT).status_code == 502


def test_client_that_stalls_in_the_header_section_is_disconnected(pki, upstream, tmp_path):
    timeouts = Timeouts(request_header=0.3)
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path, timeouts=timeouts)) as px:
        with tls_socket(pki, px.port) as tls:
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: local")
            assert read_until_closed(tls) == b""
        assert get(pki, px.url("/echo")).status_code == 200
    assert upstream.accepts == 1


def test_max_connections_stops_accepting(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_connections=1))
    with ProxyThread(config) as px:
        first = tls_socket(pki, px.port)
        with pytest.raises((TimeoutError, socket.timeout)):
            tls_socket(pki, px.port, timeout=0.5)  # waits in the backlog: no handshake
        first.close()
        with tls_socket(pki, px.port) as third:
            third.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert read_until_closed(third).startswith(b"HTTP/1.1 200 ")


def test_failed_handshake_is_logged_with_client_and_reason(pki, upstream, tmp_path, proxy_log):
    client_auth = ClientAuthSettings(mode="require", ca=pki.ca_pem)
    waiter = proxy_log("failed: client sent no certificate")
    config = proxy_config(pki, service("app", upstream), tmp_path, client_auth=client_auth)
    with ProxyThread(config) as px:
        refused = curl(px.url("/echo"), pki=pki)
        assert refused.returncode != 0
        assert b"alert certificate required" in refused.stderr  # the TLS alert reached the client
        assert waiter.seen.wait(WAIT), waiter.messages
        assert any("TLS handshake with 127.0.0.1:" in m for m in waiter.messages)
        cert, key = pki.leaf("alice", client=True, cn="alice")
        admitted = curl("--cert", str(cert), "--key", str(key), px.url("/echo"), pki=pki)
        assert admitted.returncode == 0 and b'"target": "/echo"' in admitted.stdout
    assert upstream.accepts == 1


def test_expired_client_certificate_gets_an_alert_and_a_log_line(pki, upstream, tmp_path, proxy_log):
    client_auth = ClientAuthSettings(mode="require", ca=pki.ca_pem)
    waiter = proxy_log("failed: client certificate has expired")
    expired_cert, expired_key = pki.leaf("old", client=True, cn="old", expired=True)
    config = proxy_config(pki, service("app", upstream), tmp_path, client_auth=client_auth)
    with ProxyThread(config) as px:
        refused = curl("--cert", str(expired_cert), "--key", str(expired_key), px.url("/echo"), pki=pki)
        assert refused.returncode != 0 and b"alert certificate expired" in refused.stderr
        assert waiter.seen.wait(WAIT), waiter.messages
    assert upstream.accepts == 0


def test_stalled_handshake_is_closed_and_logged(pki, upstream, tmp_path, proxy_log):
    waiter = proxy_log("did not finish the handshake in time")
    config = proxy_config(pki, service("app", upstream), tmp_path, timeouts=Timeouts(handshake=0.3))
    with ProxyThread(config) as px:
        with socket.create_connection(("127.0.0.1", px.port), timeout=WAIT) as sock:
            sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
            assert read_until_closed(sock) == b""
        assert waiter.seen.wait(WAIT), waiter.messages


def test_http10_request_without_host_is_forwarded(proxy, pki, upstream):
    answer = raw_exchange(pki, proxy.port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert dict(upstream.requests[0]["headers"])["host"] == f"127.0.0.1:{upstream.port}"


def test_client_leaving_mid_download_releases_both_connections(proxy, pki, upstream):
    with requests.get(proxy.url(f"/download?size={64 << 20}"), stream=True,
                      verify=str(pki.ca_pem), timeout=WAIT) as response:
        assert len(next(response.iter_content(1 << 20))) > 0
    # the client hung up after 1 MiB: the proxy ends its side and drops the upstream
    assert proxy.wait_connections_done()
    assert proxy.call(_idle_upstreams(proxy)) == 0
    assert get(pki, proxy.url("/echo")).status_code == 200
    assert upstream.accepts == 2


async def _idle_upstreams(proxy):
    return proxy.running.state.pool.idle_count()
