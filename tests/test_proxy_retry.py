"""Retry on a fresh upstream connection only when it cannot duplicate anything: an
idempotent method and no body byte sent (SPEC section 4, retry bullet). Also: a slow
request body holds its upstream connection for at most ``timeouts.request_header``."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import h11
import pytest
import requests
from upstream import (
    WAIT,
    ProxyThread,
    RawUpstream,
    TestUpstream,
    next_event,
    proxy_config,
    recv_head,
    recv_until_closed,
    service,
    tls_connect,
)

from proxy.config.model import Timeouts
from proxy.server.upstream_pool import UpstreamPool

pytestmark = pytest.mark.both_engines


class ClosingUpstream(RawUpstream):
    """Answers a connection's first request; on its second, reads it whole, counts it
    and closes without answering (a keep-alive connection that died just then)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()  # method -> copies that reached this upstream

    def _serve(self, conn: socket.socket) -> None:
        http = h11.Connection(h11.SERVER)
        for index in range(2):
            request = next_event(conn, http)
            if not isinstance(request, h11.Request):
                return
            while not isinstance(next_event(conn, http), h11.EndOfMessage):
                pass
            self.seen[request.method.decode()] += 1
            if index == 1:
                return  # read whole, never answered
            body = b"ok\n"
            conn.sendall(http.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))])))
            conn.sendall(http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage()))
            http.start_next_cycle()


@pytest.fixture
def closing():
    with ClosingUpstream() as up:
        yield up


@pytest.fixture
def session(pki):
    with requests.Session() as s:
        s.trust_env = False
        s.verify = str(pki.ca_pem)
        yield s


def test_body_less_post_on_a_dead_pooled_connection_is_sent_once_and_gets_502(pki, closing, tmp_path, session):
    with ProxyThread(proxy_config(pki, service("orders", closing.model()), tmp_path)) as px:
        assert session.get(px.url("/first"), timeout=WAIT).status_code == 200
        response = session.post(px.url("/pay"), timeout=WAIT)  # Content-Length: 0
        assert response.status_code == 502 and "orders" in response.text
    assert closing.seen["POST"] == 1
    assert closing.accepts == 1


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
def test_idempotent_request_on_a_dead_pooled_connection_is_retried(pki, closing, tmp_path, session, method):
    with ProxyThread(proxy_config(pki, service("orders", closing.model()), tmp_path)) as px:
        assert session.get(px.url("/first"), timeout=WAIT).status_code == 200
        response = session.request(method, px.url("/again"), timeout=WAIT)
        assert response.status_code == 200
    assert closing.seen[method] == (2 if method != "GET" else 3)  # the dead copy and the retried one
    assert closing.accepts == 2


def test_a_failed_retry_is_a_502_too(pki, closing, tmp_path, session, monkeypatch):
    """The fresh connection dies before the request could be written: still a 502
    naming the service, never an internal error without a response."""
    acquire = UpstreamPool.acquire

    async def dead_fresh_connection(self, service, *, fresh=False, **options):
        conn = await acquire(self, service, fresh=fresh, **options)
        if fresh:
            conn.channel.abort()
        return conn

    monkeypatch.setattr(UpstreamPool, "acquire", dead_fresh_connection)
    with ProxyThread(proxy_config(pki, service("orders", closing.model()), tmp_path)) as px:
        assert session.get(px.url("/first"), timeout=WAIT).status_code == 200
        response = session.get(px.url("/again"), timeout=WAIT)
        assert response.status_code == 502 and "orders" in response.text


def test_slow_request_body_releases_the_upstream_after_request_header_timeout(pki, tmp_path):
    timeouts = Timeouts(request_header=0.3, idle=30)
    with TestUpstream() as upstream, ProxyThread(
        proxy_config(pki, service("app", upstream), tmp_path, timeouts=timeouts)
    ) as px:
        with tls_connect(pki, px.port, timeout=5) as tls:
            started = time.monotonic()
            tls.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789")
            answer = recv_until_closed(tls)
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
        assert waited < 5  # bounded by request_header, not by idle (30 s)
        assert px.call(_idle_upstreams(px)) == 0  # closed, not pooled
        assert requests.get(px.url("/echo"), verify=str(pki.ca_pem), timeout=WAIT).status_code == 200
    assert upstream.accepts == 2


async def _idle_upstreams(px):
    return px.running.state.pool.idle_count()


class LateContinueUpstream(RawUpstream):
    """Reads a request head, says ``100 Continue`` only once ``go`` is set, then answers
    200 with the 5-byte body it read."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def _serve(self, conn: socket.socket) -> None:
        data = recv_head(conn)
        self.go.wait(WAIT)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = data.partition(b"\r\n\r\n")[2]
        while len(body) < 5 and (chunk := conn.recv(65536)):
            body += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body[:5])

    def close(self) -> None:
        self.go.set()
        super().close()


def test_a_client_waiting_for_a_late_100_continue_is_not_timed_out(pki, tmp_path):
    """request_header bounds the client's pauses in its body, not the upstream's delay
    before it says ``100 Continue`` (that is upstream_response's)."""
    timeouts = Timeouts(request_header=1.0)  # the client's own pause below must stay well inside it
    with LateContinueUpstream() as up, ProxyThread(
        proxy_config(pki, service("app", up), tmp_path, timeouts=timeouts)
    ) as px:
        with tls_connect(pki, px.port) as tls:
            tls.sendall(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            time.sleep(2.5)  # the time under test: more than two request_header periods pass
            up.go.set()
            interim = tls.recv(65536)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            tls.sendall(b"hello")
            answer = b""
            while not answer.endswith(b"hello") and (chunk := tls.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello"), answer
