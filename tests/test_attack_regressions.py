"""Regressions found by attacking the proxy from outside (branch ``attack``).

The README's layout throughout: service ``ledger`` (``path_prefix: /ledger``) admits only
the ``billing`` client certificate, service ``public`` (``/``) is open, both on ONE
upstream. Every test talks real TLS to a ``ProxyThread`` and uses a raw-socket upstream
that records exactly what reached it; every wait is bounded.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from upstream import WAIT, ProxyThread, RawUpstream, proxy_config, recv_head, recv_until_closed, service, tls_connect

from proxy.config.model import AllowEntry, ClientAuthSettings, ServiceClientAuth

pytestmark = pytest.mark.both_engines

SECRET = b"LEDGER-BALANCE-SECRET"
BILLING_ONLY = ServiceClientAuth(require=True, allow=(AllowEntry("cn", "billing"),))


class RecordingUpstream(RawUpstream):
    """A TCP upstream on 127.0.0.1 running ``handler(sock, received)`` per connection;
    ``received`` (one bytearray per connection) is everything the proxy sent it."""

    def __init__(self, handler: Callable[[socket.socket, bytearray], None]) -> None:
        super().__init__()
        self.handler = handler
        self.received: list[bytearray] = []

    def all_received(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.received)

    def _serve(self, conn: socket.socket) -> None:
        received = bytearray()
        self.received.append(received)
        self.handler(conn, received)


def read_head(conn: socket.socket, received: bytearray) -> bytes | None:
    """Receive until ``received`` holds a whole head; the head, or None at EOF."""
    received.extend(recv_head(conn, bytes(received))[len(received):])
    if b"\r\n\r\n" not in received:
        return None
    return bytes(received[: received.index(b"\r\n\r\n") + 4])


@pytest.fixture
def billing(pki):
    return pki.leaf("billing", "spiffe://test.local/billing", client=True, cn="billing")


def ledger_layout(pki, raw: RecordingUpstream, tmp_path: Path, **overrides) -> ProxyThread:
    services = [
        service("ledger", raw.model(), path_prefix="/ledger", client_auth=BILLING_ONLY),
        service("public", raw.model()),
    ]
    client_auth = ClientAuthSettings(mode="optional", ca=pki.ca_pem)
    return ProxyThread(proxy_config(pki, services, tmp_path, client_auth=client_auth, **overrides))


def read_until_close(tls: ssl.SSLSocket) -> bytes:
    # a reset, or never closed within the socket's timeout: what came counts
    return recv_until_closed(tls, ends=(ConnectionResetError, ssl.SSLError, TimeoutError))


def slow_reader(pki, port: int) -> ssl.SSLSocket:
    """A TLS client that reads nothing, its receive buffer shrunk to 4 KiB."""
    return tls_connect(pki, port, rcvbuf=4096)


def download_bytes_once_still(upstream) -> int:
    """No event says every buffer on the way is full: wait (bounded) until the
    upstream's /download byte count stops moving, i.e. backpressure reached it; that count."""
    sent = -1
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        time.sleep(0.25)
        if upstream.download_bytes_sent == sent:
            break
        sent = upstream.download_bytes_sent
    return sent


# -- 1. h2c upgrade: a tunnel straight to the upstream, past routing and the allow-list


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


# HTTP/2 connection preface, empty SETTINGS, then HEADERS (END_STREAM|END_HEADERS) for
# GET http://localhost/ledger/balance (HPACK: :method GET, :scheme http, literal :path,
# literal :authority; no Huffman).
H2_LEDGER_REQUEST = (
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    + _frame(4, 0, 0, b"")
    + _frame(1, 5, 1, b"\x82\x86\x04\x0f/ledger/balance\x01\x09localhost")
)


def h2c_upstream(conn: socket.socket, received: bytearray) -> None:
    """Like any h2c-capable server (Go's h2c handler, Jetty, Tomcat, hyper...): an
    ``Upgrade: h2c`` request is answered 101, and the HTTP/2 streams that follow are
    served by path; /ledger/balance gets the ledger body. Anything else: 200 "ok"."""
    head = read_head(conn, received)
    if head is None:
        return
    if b"\r\nupgrade: " not in head.lower():
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        return
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    while b"/ledger/balance" not in received[len(head):]:
        data = conn.recv(65536)
        if not data:
            return
        received += data
    conn.sendall(b"(HTTP/2 stream 1) " + SECRET)


@pytest.mark.parametrize("token", [b"h2c", b"H2C", b"websocket, h2c", b"h2c-14", b"HTTP/2.0"])
def test_h2c_upgrade_is_not_tunnelled_past_the_allow_list(pki, tmp_path, token):
    """A client without a certificate asks the open service for ``Upgrade: h2c``; if the
    proxy tunnels it, every HTTP/2 request that follows goes straight to the shared
    upstream, unrouted and unauthorised (the "h2c smuggling" bypass). h2c is cleartext
    HTTP/2 only (RFC 9113 deprecates the upgrade): over TLS it is never legitimate, so
    the Upgrade must not be forwarded."""
    with RecordingUpstream(h2c_upstream) as raw, ledger_layout(pki, raw, tmp_path) as px:
        with tls_connect(pki, px.port) as tls:
            tls.sendall(
                b"GET /public HTTP/1.1\r\nHost: localhost\r\n"
                b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: " + token + b"\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            )
            head = recv_head(tls)
            got = head
            if head.startswith(b"HTTP/1.1 101"):
                tls.sendall(H2_LEDGER_REQUEST)
                tls.settimeout(5)
                try:
                    got += tls.recv(65536)
                except TimeoutError:
                    pass
        assert SECRET not in got, "the ledger answered through an h2c tunnel without a certificate"
        assert not head.startswith(b"HTTP/1.1 101"), head
        assert b"\r\nupgrade:" not in raw.all_received().lower()


# -- 2. memory per slow client: SPEC section 4 bounds it at 256 KiB of response data


def _response_bytes_held(channel_type) -> int:
    """Bytes sitting in the proxy's open channels: received and not yet relayed, plus
    written and not yet taken by the kernel (both directions, every connection)."""
    import gc

    held = 0
    for obj in gc.get_objects():
        if isinstance(obj, channel_type) and obj.transport is not None and not obj.closed:
            held += obj._buffered + obj._unsent_bytes + obj.transport.get_write_buffer_size()
    return held


def test_a_client_that_stops_reading_holds_at_most_256_kib_in_the_proxy(pki, upstream, tmp_path):
    from proxy.server.channel import Channel

    with ProxyThread(proxy_config(pki, service("public", upstream), tmp_path)) as px:
        with slow_reader(pki, px.port) as tls:
            tls.sendall(b"GET /download?size=200000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            sent = download_bytes_once_still(upstream)
            assert 0 < sent < 200_000_000, "backpressure never reached the upstream"
            held = px.call(_hold(Channel))
            assert held <= 256 * 1024 + 64 * 1024, f"{held} bytes of one response held in the proxy"


async def _hold(channel_type) -> int:
    return _response_bytes_held(channel_type)


# -- 3. CONNECT: a reverse proxy has no tunnel to offer, and the engines disagreed


def connect_upstream(conn: socket.socket, received: bytearray) -> None:
    """An upstream that accepts CONNECT (a forward proxy, or Node's 'connect' event)."""
    head = read_head(conn, received)
    if head is None:
        return
    if head.upper().startswith(b"CONNECT "):
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    else:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


@pytest.mark.parametrize("method", [b"CONNECT", b"connect"])
def test_connect_with_a_path_is_refused_and_never_reaches_the_upstream(pki, tmp_path, method):
    """``CONNECT /x`` (origin-form) went upstream on the open service; the upstream's
    ``200 Connection established`` came back as a head without framing, after which h11
    stopped reading the client (the connection hung until its idle timeout) while
    httptools went on parsing HTTP: the client was told a tunnel opened that did not
    exist. The proxy must refuse it itself and close."""
    with RecordingUpstream(connect_upstream) as raw, ledger_layout(pki, raw, tmp_path) as px:
        with tls_connect(pki, px.port) as tls:
            tls.settimeout(5)  # a correct answer closes at once; bounds the failing case
            tls.sendall(method + b" /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = read_until_close(tls)
        assert response.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 405 ")), response[:200]
        assert not any(chunk.upper().startswith(b"CONNECT") for chunk in raw.received), raw.all_received()[:200]


# -- 4. engine parity on Content-Length spelling


def recording_upstream(conn: socket.socket, received: bytearray) -> None:
    """Answers the first head with 200 "ok" and closes; keeps what arrived."""
    if read_head(conn, received) is not None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def test_a_content_length_of_more_than_20_digits_is_refused_by_both_engines(pki, tmp_path):
    """h11 refuses a Content-Length longer than 20 digits; httptools accepted
    ``00000000000000000000000000004`` and forwarded it verbatim, so the two engines
    (which the README says refuse exactly the same requests) disagreed, and an upstream
    with h11's limit answered 400 to what the proxy had accepted."""
    with RecordingUpstream(recording_upstream) as raw, ledger_layout(pki, raw, tmp_path) as px:
        with tls_connect(pki, px.port) as tls:
            tls.settimeout(5)
            tls.sendall(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: " + b"0" * 28 + b"4\r\n\r\nabcd")
            response = read_until_close(tls)
        assert response.startswith(b"HTTP/1.1 400 "), response[:200]
        assert raw.all_received() == b""


# -- 5. pipelined requests from a client that reads nothing: memory without bound


def test_pipelined_requests_from_a_client_that_never_reads_are_not_answered_into_memory(pki, upstream, tmp_path):
    """A client pipelines thousands of small GETs and never reads. Each response is
    small, so no write reaches the point where the relay waits for the client to drain:
    the proxy read every request, fetched every response and kept them all (about 93 MB
    for 720 KB of requests, on one connection). SPEC section 4 bounds what a slowly
    reading client holds in the proxy; the next request must wait for the client."""
    from proxy.server.channel import Channel

    count, size = 12000, 8000
    with ProxyThread(proxy_config(pki, service("public", upstream), tmp_path)) as px:
        with slow_reader(pki, px.port) as tls:
            requests = b"".join(
                b"GET /download?size=%d&i=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % (size, i) for i in range(count)
            )
            # Send what the proxy will take; it stops taking once it stops reading.
            tls.setblocking(False)
            sent = 0
            while sent < len(requests):
                if not select.select([], [tls], [], 2.0)[1]:
                    break  # the proxy stopped reading requests: backpressure
                try:
                    sent += tls.send(requests[sent : sent + 16384])
                except (ssl.SSLWantWriteError, BlockingIOError):
                    continue
            moved = download_bytes_once_still(upstream)
            held = px.call(_hold(Channel))
            assert held <= 2 * 1024 * 1024, (
                f"{held} bytes held in the proxy for one connection that reads nothing "
                f"({moved} response bytes fetched from the upstream)"
            )
