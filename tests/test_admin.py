"""proxy.server.admin: the routing table without sockets, then a real admin listener on
127.0.0.1 port 0 (uvloop, as ``tlsproxy serve`` runs it) driven by requests and raw sockets."""

from __future__ import annotations

import asyncio
import logging
import http.client
import socket
import threading
from dataclasses import dataclass, field

import pytest
import requests
import uvloop
from cryptography import x509
from test_metrics import parse_exposition, sample

from proxy.config.model import ListenAddress
from proxy.server.admin import MAX_BODY_BYTES, MAX_HEADER_BYTES, AdminRoutes, request_path, start_admin
from proxy.server.metrics import CONTENT_TYPE, ProxyMetrics, Registry

TIMEOUT = 5.0


@dataclass
class Knobs:
    """What the admin listener reads per request; tests turn these."""

    ready: bool = True
    ca: bytes | None = None
    registry: Registry = field(default_factory=Registry)

    def routes(self) -> AdminRoutes:
        return AdminRoutes(metrics=self.registry, ready=lambda: self.ready, ca_pem=lambda: self.ca)


# --- the routing table (no sockets) -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "status", "body"),
    [
        (b"GET", b"/healthz", 200, b"ok\n"),
        (b"HEAD", b"/healthz", 200, b"ok\n"),
        (b"GET", b"/readyz", 200, b"ready\n"),
        (b"GET", b"/healthz?verbose=1", 200, b"ok\n"),
        (b"GET", b"http://admin:9901/healthz", 200, b"ok\n"),
        (b"POST", b"/healthz", 405, b"/healthz allows GET and HEAD only\n"),
        (b"DELETE", b"/metrics", 405, b"/metrics allows GET and HEAD only\n"),
        (b"GET", b"/healthz/", 404, None),
        (b"POST", b"/nope", 404, None),
        (b"GET", b"/ca.pem", 404, b"no local CA is in use\n"),
        (b"OPTIONS", b"*", 400, b"bad request target\n"),
    ],
)
def test_routes(method, target, status, body):
    response = Knobs().routes().respond(method, target)
    assert response.status == status
    if body is not None:
        assert response.body == body
    if status == 405:
        assert dict(response.headers)[b"allow"] == b"GET, HEAD"


def test_not_found_names_the_path_and_the_admin_paths():
    response = Knobs().routes().respond(b"GET", b"/metric")
    assert response.body == b"not found: /metric\nadmin paths: /healthz /readyz /metrics /ca.pem /ca.crt /ca.der /trust\n"


def test_readiness_and_ca_follow_their_callables_per_request():
    knobs = Knobs()
    routes = knobs.routes()
    knobs.ready, knobs.ca = False, b"-----BEGIN CERTIFICATE-----\n"
    assert (routes.respond(b"GET", b"/readyz").status, routes.respond(b"GET", b"/readyz").body) == (503, b"draining\n")
    ca = routes.respond(b"GET", b"/ca.pem")
    assert (ca.status, ca.content_type, ca.body) == (200, b"application/x-pem-file", knobs.ca)


def test_a_failing_callable_is_a_500_not_an_exception(caplog):
    routes = AdminRoutes(metrics=Registry(), ready=lambda: 1 / 0, ca_pem=lambda: None)
    assert routes.respond(b"GET", b"/readyz").status == 500
    assert "admin: /readyz failed" in caplog.text


def test_request_path_shapes():
    assert request_path(b"/metrics?x=1") == "/metrics"
    assert request_path(b"HTTP://host/ca.pem") == "/ca.pem"
    assert request_path(b"http://host") == "/"
    assert request_path(b"host:443") is None


# --- a real listener --------------------------------------------------------------------


class AdminThread:
    """The admin server on a uvloop loop in a thread, for blocking clients."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(
            start_admin(
                ListenAddress("127.0.0.1", 0),
                metrics=knobs.registry,
                ready=lambda: knobs.ready,
                ca_pem=lambda: knobs.ca,
            )
        )
        self.host, self.port = self.server.address
        self.url = f"http://{self.host}:{self.port}"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def close(self) -> None:
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        self.call(stop())

    def stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    def raw(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=TIMEOUT)


@pytest.fixture
def admin():
    served = AdminThread(Knobs())
    yield served
    served.close()
    served.stop_loop()


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_healthz_and_readyz(admin):
    response = requests.get(f"{admin.url}/healthz", timeout=TIMEOUT)
    assert (response.status_code, response.text) == (200, "ok\n")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert requests.get(f"{admin.url}/readyz", timeout=TIMEOUT).text == "ready\n"
    admin.knobs.ready = False
    response = requests.get(f"{admin.url}/readyz", timeout=TIMEOUT)
    assert (response.status_code, response.text) == (503, "draining\n")


def test_metrics_page_is_the_registry_in_the_text_format(admin):
    admin.knobs.registry.counter("demo_total", "Demo.", ("service",)).labels("api").inc(3)
    response = requests.get(f"{admin.url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200 and response.headers["content-type"] == CONTENT_TYPE
    assert response.headers["cache-control"] == "no-store"
    assert sample(parse_exposition(response.content), "demo_total", service="api") == 3


def test_ca_pem_is_served_when_a_local_ca_is_in_use(admin, pki):
    assert requests.get(f"{admin.url}/ca.pem", timeout=TIMEOUT).status_code == 404
    admin.knobs.ca = pki.ca_pem.read_bytes()
    response = requests.get(f"{admin.url}/ca.pem", timeout=TIMEOUT)
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-pem-file"
    assert x509.load_pem_x509_certificate(response.content) == pki.ca_cert


def test_other_methods_and_paths(admin):
    response = requests.post(f"{admin.url}/metrics", data=b"x" * 100, timeout=TIMEOUT)
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    assert requests.get(f"{admin.url}/admin", timeout=TIMEOUT).status_code == 404


def test_keep_alive_serves_many_requests_on_one_connection(admin):
    conn = http.client.HTTPConnection(admin.host, admin.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        assert first.read() == b"ok\n"
        sock = conn.sock
        conn.request("HEAD", "/healthz")
        head = conn.getresponse()
        assert head.status == 200 and head.getheader("content-length") == "3" and head.read() == b""
        conn.request("POST", "/readyz", body=b"small body is read and dropped")
        assert conn.getresponse().read().endswith(b"GET and HEAD only\n")
        conn.request("GET", "/readyz")
        assert conn.getresponse().read() == b"ready\n"
        assert conn.sock is sock, "the connection was not kept alive"
    finally:
        conn.close()


def test_connection_close_is_honoured(admin):
    with admin.raw() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10), b"431"),
    ],
)
def test_malformed_requests_get_an_error_and_a_close(admin, sent, status):
    with admin.raw() as sock:
        sock.sendall(sent)
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"connection: close" in reply.lower()
    assert b"bytearray(" not in reply and b"b'" not in reply  # words, not Python reprs
    assert requests.get(f"{admin.url}/healthz", timeout=TIMEOUT).status_code == 200  # still serving


def test_a_body_over_the_limit_is_refused_with_413(admin):
    with admin.raw() as sock:
        sock.sendall(f"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        sock.sendall(b"x" * (MAX_BODY_BYTES + 1))
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 413 ")


def test_expect_100_continue_is_answered_without_waiting_for_the_body(admin):
    with admin.raw() as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 405 ")


def test_a_client_vanishing_mid_request_does_no_harm(admin):
    with admin.raw() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
    with admin.raw() as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly part")
    assert requests.get(f"{admin.url}/healthz", timeout=TIMEOUT).status_code == 200


def test_http_1_0_gets_one_response_then_a_close(admin):
    with admin.raw() as sock:
        sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"ready\n")


def test_close_ends_idle_keep_alive_connections(caplog):
    """A scraper's keep-alive connection is ended by closing (shutdown), quietly: no
    "Exception in callback ... CancelledError" traceback in the log, as Python 3.11's
    stream callback wrote for the cancelled connection task."""
    served = AdminThread(Knobs())
    try:
        with served.raw() as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            served.close()  # returns once the idle connection's task has ended
            assert read_until_closed(sock) == b""
        assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
        with pytest.raises(OSError):
            served.raw().close()
    finally:
        served.stop_loop()


def test_connections_over_the_limit_are_closed_at_once(admin, monkeypatch):
    monkeypatch.setattr("proxy.server.admin.MAX_CONNECTIONS", 1)
    with admin.raw() as first:
        first.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert first.recv(65536).startswith(b"HTTP/1.1 200 ")  # now counted as open
        with admin.raw() as second:  # sends nothing: unread bytes would turn the close into a reset
            assert read_until_closed(second) == b""


def test_pipelined_requests_are_answered_in_order(admin):
    with admin.raw() as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        reply = read_until_closed(sock)
    assert reply.count(b"HTTP/1.1 200 ") == 2 and reply.index(b"ok\n") < reply.index(b"ready\n")


def test_proxy_metrics_can_be_served_directly(admin):
    metrics = ProxyMetrics()
    metrics.requests.labels("api", 502).inc()

    async def serve():
        return await start_admin(ListenAddress("127.0.0.1", 0), metrics=metrics, ready=lambda: True, ca_pem=lambda: None)

    server = admin.call(serve())
    try:
        host, port = server.address
        page = requests.get(f"http://{host}:{port}/metrics", timeout=TIMEOUT).content
        assert sample(parse_exposition(page), "tlsproxy_requests_total", service="api", status="502") == 1
    finally:
        admin.call(server.__aexit__(None, None, None))  # close() on the server's own loop
