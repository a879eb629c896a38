"""An accept() that fails is an ordinary event (a client reset before we took it, a
firewall refusing it, no descriptors left): the accept loop logs it, backs off on
EMFILE/ENFILE, and goes on accepting; a proxy whose accept failed still closes
gracefully, finishing the requests in flight.

The failure is made by the listening socket itself (a real one, whose accept raises
once); the connections after it are real."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from upstream import WAIT, ProxyThread, TestUpstream, proxy_config, service

from proxy.config.model import ListenAddress
from proxy.server import listeners
from proxy.server.listeners import BoundListeners, accept_loop, bind


class FailingOnce(socket.socket):
    """A listening socket whose next accept raises OSError(``code``) once."""

    def __init__(self, sock: socket.socket, code: int) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.code = code
        self.failed = threading.Event()

    def _accept(self):
        if not self.failed.is_set():
            self.failed.set()
            raise OSError(self.code, os.strerror(self.code))
        return super()._accept()


CODES = [errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EMFILE, errno.ENFILE]


@pytest.mark.parametrize("code", CODES, ids=[errno.errorcode[code] for code in CODES])
def test_the_loop_logs_a_failed_accept_and_accepts_the_next_connection(code, monkeypatch, caplog) -> None:
    monkeypatch.setattr(listeners, "ACCEPT_BACKOFF", 0.01, raising=False)  # the back-off itself is not under test

    async def scenario() -> None:
        listener = FailingOnce(bind(ListenAddress("127.0.0.1", 0)), code)
        port = listener.getsockname()[1]
        served: asyncio.Queue[tuple] = asyncio.Queue()

        async def handler(conn: socket.socket, peer: tuple) -> None:
            served.put_nowait(peer)
            conn.close()

        accepting = asyncio.create_task(accept_loop(listener, handler, set()))
        client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        try:
            assert await asyncio.wait_for(served.get(), WAIT) == client.getsockname()
            assert listener.failed.is_set() and not accepting.done()
        finally:
            client.close()
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
            listener.close()

    with caplog.at_level(logging.DEBUG, logger="tlsproxy"):
        asyncio.run(scenario())
    assert any(os.strerror(code) in record.getMessage() for record in caplog.records), caplog.text


def test_a_loop_whose_listener_is_gone_ends_quietly(caplog) -> None:
    """EBADF (the socket closed under it) is not retried for ever: the loop ends, and
    says why, without an exception for whoever awaits it."""

    async def scenario() -> None:
        listener = FailingOnce(bind(ListenAddress("127.0.0.1", 0)), errno.EBADF)
        try:
            await asyncio.wait_for(accept_loop(listener, lambda conn, peer: None, set()), WAIT)
        finally:
            listener.close()

    with caplog.at_level(logging.ERROR, logger="tlsproxy"):
        asyncio.run(scenario())
    assert "stopped accepting" in caplog.text


def https_get(port: int, ca: Path, path: str) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while piece := tls.recv(65536):
                data += piece
    return data


def test_a_proxy_whose_accept_failed_still_serves_and_closes_gracefully(pki, tmp_path: Path) -> None:
    with TestUpstream() as upstream:
        config = proxy_config(pki, service("app", upstream), tmp_path)
        sock = FailingOnce(bind(config.listen[0]), errno.EPROTO)
        px = ProxyThread(config, listeners=BoundListeners([sock], None))
        try:
            assert https_get(px.port, pki.ca_pem, "/echo").startswith(b"HTTP/1.1 200")
            assert sock.failed.is_set()
            # A request in flight when close() starts is finished, not cut.
            answer: list[bytes] = []
            held = threading.Thread(target=lambda: answer.append(https_get(px.port, pki.ca_pem, "/held")))
            held.start()
            assert upstream.holding.wait(WAIT)
            closing = asyncio.run_coroutine_threadsafe(px.running.close(WAIT), px.loop)
            upstream.let_go()
            closing.result(WAIT)  # no exception: the accept loop did not die
            held.join(WAIT)
            assert answer and answer[0].startswith(b"HTTP/1.1 200")
        finally:
            px.close()
