"""An upstream response is never shared between clients (SPEC 4), through real sockets.

Bytes an upstream sends past the end of a response — a body on a HEAD answer, on 204
or 304, more bytes than its Content-Length — must close that upstream connection: were
it pooled, the next request on it (another client, another TLS connection) would read
those bytes as its own response. Each upstream here hides a complete forged response in
the overrun; the next client must get the upstream's genuine answer, never the forgery.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import requests
from upstream import WAIT, ProxyThread, proxy_config, service

from proxy.config.model import Upstream

pytestmark = pytest.mark.both_engines

FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
GENUINE = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ngenuine"


class ScriptedUpstream:
    """A raw-socket HTTP/1.1 upstream: each request (head only, no body) on any
    connection gets ``answers[target]`` in one send, ``GENUINE`` for other targets;
    ``accepts`` counts connections."""

    def __init__(self, answers: dict[bytes, bytes]) -> None:
        self.answers = answers
        self.accepts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def model(self) -> Upstream:
        return Upstream(f"http://127.0.0.1:{self.port}", "127.0.0.1", self.port)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepts += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                conn.sendall(self.answers.get(target, GENUINE))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(WAIT)


@contextlib.contextmanager
def proxy_in_front_of(pki, tmp_path, answers: dict[bytes, bytes]):
    up = ScriptedUpstream(answers)
    try:
        with ProxyThread(proxy_config(pki, service("app", up.model()), tmp_path)) as px:
            yield px, up
    finally:
        up.close()


def fetch(pki, px: ProxyThread, method: str, path: str) -> requests.Response:
    """One request on a connection of its own (a new client each time)."""
    return requests.request(method, px.url(path), verify=str(pki.ca_pem), timeout=WAIT)


OVERRUNS = {
    "head-with-body": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + FORGED),
    "head-with-exactly-a-forged-body": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(FORGED) + FORGED),
    "204-with-body": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + FORGED),
    "304-with-body": ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n" + FORGED),
    "more-than-content-length": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + FORGED),
    "chunked-then-more": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                                 + FORGED),
}


@pytest.mark.parametrize(("method", "answer"), OVERRUNS.values(), ids=OVERRUNS.keys())
def test_bytes_past_a_response_never_reach_the_next_client(pki, tmp_path, method, answer):
    with proxy_in_front_of(pki, tmp_path, {b"/first": answer}) as (px, up):
        first = fetch(pki, px, method, "/first")
        assert first.status_code in (200, 204, 304)
        assert first.content in (b"", b"hello")
        second = fetch(pki, px, "GET", "/second")
        assert second.content == b"genuine"
        assert up.accepts == 2  # the overrun connection was closed, not pooled


def test_a_clean_keep_alive_upstream_is_still_reused(pki, tmp_path):
    clean = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    with proxy_in_front_of(pki, tmp_path, {b"/first": clean, b"/head": clean[: -len(b"hello")]}) as (px, up):
        assert fetch(pki, px, "GET", "/first").content == b"hello"
        assert fetch(pki, px, "HEAD", "/head").headers["content-length"] == "5"
        assert fetch(pki, px, "GET", "/second").content == b"genuine"
        assert up.accepts == 1
