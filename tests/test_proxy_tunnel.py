"""Upgrade tunnels half-close (STYLE "Half-close in tunnels"): when one side ends its
direction, the other side is told (EOF / close_notify) and the other direction keeps
flowing until it ends too."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest
from upstream import WAIT, ProxyThread, RawUpstream, proxy_config, recv_head, recv_until_closed, service, tls_connect

pytestmark = pytest.mark.both_engines

UPGRADE = b"GET /chat HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\n"
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\n"


class TunnelUpstream(RawUpstream):
    """Answers an upgrade with 101 (``_tunnel`` says what follows), then records what the
    tunnel brings (``received``) until the proxy passes an EOF on (``saw_eof``)."""

    def __init__(self) -> None:
        super().__init__()
        self.received = b""
        self.saw_eof = threading.Event()

    def _serve(self, conn: socket.socket) -> None:
        data = recv_head(conn)
        if b"\r\n\r\n" not in data:
            return
        self.received = data.partition(b"\r\n\r\n")[2]
        self._tunnel(conn)

    def _read_to_eof(self, conn: socket.socket) -> None:
        while chunk := conn.recv(65536):
            self.received += chunk
        self.saw_eof.set()

    def _tunnel(self, conn: socket.socket) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def upgrading(pki, tmp_path, upstream: TunnelUpstream) -> Iterator[ssl.SSLSocket]:
    """A client connection through a proxy in front of ``upstream`` that has sent UPGRADE."""
    with ProxyThread(proxy_config(pki, service("chat", upstream), tmp_path)) as px:
        with tls_connect(pki, px.port) as tls:
            tls.sendall(UPGRADE)
            yield tls


class LateUpstream(TunnelUpstream):
    """Reads the tunnel until the proxy sends EOF, then sends ``late`` (what it has to
    say after the client finished) and closes."""

    def __init__(self, late: bytes) -> None:
        super().__init__()
        self.late = late

    def _tunnel(self, conn: socket.socket) -> None:
        conn.sendall(SWITCHING)
        self._read_to_eof(conn)
        conn.sendall(self.late)


def test_upstream_data_after_the_client_half_closed_still_reaches_the_client(pki, tmp_path):
    with LateUpstream(b"the answer after your EOF") as upstream:
        with upgrading(pki, tmp_path, upstream) as tls:
            head = recv_head(tls)
            assert head.startswith(b"HTTP/1.1 101 ")
            tls.sendall(b"question")
            socket.socket.shutdown(tls, socket.SHUT_WR)  # TCP half-close under TLS
            assert upstream.saw_eof.wait(WAIT), "the proxy did not pass the EOF on"
            late = recv_until_closed(tls)
        assert late == b"the answer after your EOF"
        assert upstream.received == b"question"


class EarlyEndingUpstream(TunnelUpstream):
    """Sends ``first`` after its 101, ends its direction at once (FIN), and keeps reading
    what the client still sends until the proxy passes its EOF on."""

    def __init__(self, first: bytes) -> None:
        super().__init__()
        self.first = first

    def _tunnel(self, conn: socket.socket) -> None:
        conn.sendall(SWITCHING + self.first)
        conn.shutdown(socket.SHUT_WR)
        self._read_to_eof(conn)


def test_client_data_after_the_upstream_half_closed_still_reaches_the_upstream(pki, tmp_path):
    with EarlyEndingUpstream(b"all I had to say") as upstream:
        with upgrading(pki, tmp_path, upstream) as tls:
            received = b""
            while chunk := tls.recv(65536):  # ends at the proxy's close_notify
                received += chunk
            assert received.startswith(b"HTTP/1.1 101 ") and received.endswith(b"\r\n\r\nall I had to say")
            tls.sendall(b"my last words")
            socket.socket.shutdown(tls, socket.SHUT_WR)
            assert upstream.saw_eof.wait(WAIT), "the proxy did not pass the client's EOF on"
        assert upstream.received == b"my last words"
