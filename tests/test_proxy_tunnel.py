"""Upgrade tunnels half-close (STYLE "Half-close in tunnels"): when one side ends its
direction, the other side is told (EOF / close_notify) and the other direction keeps
flowing until it ends too."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading

import pytest
from upstream import WAIT, ProxyThread, proxy_config, service

from proxy.config.model import Upstream

pytestmark = pytest.mark.both_engines

UPGRADE = b"GET /chat HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\n"


class LateUpstream:
    """Answers one upgrade with 101, reads the tunnel until the proxy sends EOF, then
    sends ``late`` (what it has to say after the client finished) and closes."""

    def __init__(self, late: bytes) -> None:
        self.late = late
        self.received = b""
        self.saw_eof = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def model(self) -> Upstream:
        return Upstream(f"http://127.0.0.1:{self.port}", "127.0.0.1", self.port)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.received = data.partition(b"\r\n\r\n")[2]
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\n")
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    self.received += chunk
                self.saw_eof.set()
                conn.sendall(self.late)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(WAIT)


def test_upstream_data_after_the_client_half_closed_still_reaches_the_client(pki, tmp_path):
    upstream = LateUpstream(b"the answer after your EOF")
    try:
        with ProxyThread(proxy_config(pki, service("chat", upstream.model()), tmp_path)) as px:
            context = ssl.create_default_context(cafile=str(pki.ca_pem))
            with socket.create_connection(("127.0.0.1", px.port), timeout=WAIT) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(UPGRADE)
                    head = b""
                    while b"\r\n\r\n" not in head and (chunk := tls.recv(65536)):
                        head += chunk
                    assert head.startswith(b"HTTP/1.1 101 ")
                    tls.sendall(b"question")
                    socket.socket.shutdown(tls, socket.SHUT_WR)  # TCP half-close under TLS
                    assert upstream.saw_eof.wait(WAIT), "the proxy did not pass the EOF on"
                    late = b""
                    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
                        while chunk := tls.recv(65536):
                            late += chunk
            assert late == b"the answer after your EOF"
            assert upstream.received == b"question"
    finally:
        upstream.close()


class EarlyEndingUpstream:
    """Answers one upgrade with 101 and ``first``, ends its direction at once (FIN), and
    keeps reading what the client still sends until the proxy passes its EOF on."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.received = b""
        self.saw_eof = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def model(self) -> Upstream:
        return Upstream(f"http://127.0.0.1:{self.port}", "127.0.0.1", self.port)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\n"
                         + self.first)
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    self.received += chunk
                self.saw_eof.set()

    def close(self) -> None:
        self._listener.close()
        self._thread.join(WAIT)


def test_client_data_after_the_upstream_half_closed_still_reaches_the_upstream(pki, tmp_path):
    upstream = EarlyEndingUpstream(b"all I had to say")
    try:
        with ProxyThread(proxy_config(pki, service("chat", upstream.model()), tmp_path)) as px:
            context = ssl.create_default_context(cafile=str(pki.ca_pem))
            with socket.create_connection(("127.0.0.1", px.port), timeout=WAIT) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(UPGRADE)
                    received = b""
                    while chunk := tls.recv(65536):  # ends at the proxy's close_notify
                        received += chunk
                    assert received.startswith(b"HTTP/1.1 101 ") and received.endswith(b"\r\n\r\nall I had to say")
                    tls.sendall(b"my last words")
                    socket.socket.shutdown(tls, socket.SHUT_WR)
                    assert upstream.saw_eof.wait(WAIT), "the proxy did not pass the client's EOF on"
            assert upstream.received == b"my last words"
    finally:
        upstream.close()
