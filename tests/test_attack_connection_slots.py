"""Attack on ConnectionSlots (limits.max_connections) with the real proxy on 127.0.0.1:
connections past the limit wait in the backlog and are served once a slot frees; no kind of
failed connection leaks a slot; and a limit shared by several listeners is reachable."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct

import pytest
from upstream import WAIT, ProxyThread, proxy_config, recv_head, service, tls_connect

from proxy.config.model import Limits, ListenAddress

LIMIT = 3
SHORT = 0.5  # how long a connection past the limit is shown to wait unserved


def get(sock) -> bytes:
    sock.sendall(b"GET /status/204 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return recv_head(sock).split(b"\r\n", 1)[0]


def handshake_within(pki, port: int, timeout: float) -> ssl.SSLSocket | None:
    try:
        return tls_connect(pki, port, timeout=timeout)
    except (TimeoutError, socket.timeout):
        return None


@pytest.mark.timeout(60)
def test_the_limit_recovers_after_aborted_refused_and_failed_connections(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_connections=LIMIT))
    with ProxyThread(config) as proxy:
        for round_ in range(40):
            # Reset at once, closed before a byte, plain HTTP on the TLS port, untrusted CA,
            # a half handshake then reset.
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            kind = round_ % 4
            if kind == 1:
                raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
                raw.recv(100)
            elif kind == 2:
                context = ssl.create_default_context(cafile=str(pki.other_ca_pem))
                with contextlib.suppress(ssl.SSLError, OSError):
                    context.wrap_socket(raw, server_hostname="localhost").close()
            elif kind == 3:
                raw.sendall(b"\x16\x03\x01\x00\x05hello")
            raw.close()
        assert proxy.wait_connections_done()
        held = [tls_connect(pki, proxy.port) for _ in range(LIMIT)]
        try:
            for sock in held:
                assert get(sock) == b"HTTP/1.1 204 No Content"
            waiting = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)  # in the backlog
            waiting.close()
            extra = handshake_within(pki, proxy.port, SHORT)
            assert extra is None  # past the limit: not served
            held.pop().close()
            late = tls_connect(pki, proxy.port)  # a slot freed: served
            held.append(late)
            assert get(late) == b"HTTP/1.1 204 No Content"
        finally:
            for sock in held:
                sock.close()


@pytest.mark.timeout(60)
def test_a_limit_shared_by_two_listeners_serves_the_second_while_the_first_is_idle(pki, upstream, tmp_path):
    # max_connections: 1 and two listen addresses. No connection is open at all, yet a
    # client of the second listener is never served: each accept loop takes its slot
    # *before* accept(), so the first listener's loop sits on the only slot while waiting.
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_connections=1),
                          listen=(ListenAddress("127.0.0.1", 0), ListenAddress("127.0.0.1", 0)))
    with ProxyThread(config) as proxy:
        ports = [port for _host, port in proxy.running.addresses]
        served = []
        for port in reversed(ports):  # (whichever loop took the slot first, one listener starves)
            sock = handshake_within(pki, port, 5.0)
            served.append(sock is not None)
            if sock is not None:
                assert get(sock) == b"HTTP/1.1 204 No Content"
                sock.close()
                assert proxy.wait_connections_done()
        assert served == [True, True]
