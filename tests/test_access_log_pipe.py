"""The access log on stdout never blocks the event loop: with stdout a real pipe whose
reader stopped reading (full), the proxy still answers every request; the lines that
fit the bounded queue come out once the reader reads again, the others are dropped,
counted and reported."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import socket
import ssl
import sys
from pathlib import Path

from upstream import WAIT, ProxyThread, TestUpstream, proxy_log_waiter, proxy_config, service

from proxy.config.model import AccessLogSettings
from proxy.server import access_log

REQUESTS = 12


def fill(fd: int) -> int:
    """Fill the pipe behind ``fd`` (O_NONBLOCK only while filling); the bytes written."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    written = 0
    try:
        while True:
            written += os.write(fd, b"\n" * 4096)
    except BlockingIOError:
        return written
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def read_lines(fd: int, wanted: int) -> list[dict]:
    """Read the pipe until ``wanted`` JSON lines came out (blank filler lines skipped)."""
    lines: list[dict] = []
    pending = b""
    while len(lines) < wanted:
        ready, _, _ = select.select([fd], [], [], WAIT)
        assert ready, f"only {len(lines)} of {wanted} lines came out"
        pending += os.read(fd, 65536)
        *complete, pending = pending.split(b"\n")
        lines += [json.loads(line) for line in complete if line.strip()]
    return lines


def get(port: int, ca: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while piece := tls.recv(65536):
                data += piece
    return data


def test_a_stdout_nobody_reads_does_not_stop_the_proxy(pki, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(access_log, "FLUSH_BYTES", 1)  # every record is written at once
    monkeypatch.setattr(access_log, "MAX_QUEUED_BYTES", 1500, raising=False)  # a few lines
    read_end, write_end = os.pipe()
    stdout = open(write_end, "w", closefd=False)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        fill(write_end)
        with TestUpstream() as upstream:
            config = proxy_config(pki, service("app", upstream), tmp_path,
                                  access_log=AccessLogSettings(format="json", path="-"))
            with ProxyThread(config) as px:
                try:
                    with proxy_log_waiter("dropped") as logged:
                        for _ in range(REQUESTS):
                            assert get(px.port, pki.ca_pem).startswith(b"HTTP/1.1 200")
                        log = px.running.state.access_log
                        dropped = log.dropped_lines
                        assert 0 < dropped < REQUESTS
                        # The reader reads again: what was queued comes out, then the next
                        # record, and the drop is reported.
                        lines = read_lines(read_end, REQUESTS - dropped)
                        assert all(line["status"] == 200 for line in lines)
                        assert get(px.port, pki.ca_pem).startswith(b"HTTP/1.1 200")
                        assert read_lines(read_end, 1)[0]["status"] == 200
                        assert logged.seen.wait(WAIT)
                        assert any(f"{dropped} " in message for message in logged.messages), logged.messages
                finally:
                    # Whatever happened, a loop blocked writing to the pipe gets unblocked.
                    with contextlib.suppress(OSError):
                        flags = fcntl.fcntl(read_end, fcntl.F_GETFL)
                        fcntl.fcntl(read_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                        while os.read(read_end, 1 << 20):
                            pass
    finally:
        stdout.close()
        os.close(write_end)
        os.close(read_end)
