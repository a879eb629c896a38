"""Attack on graceful shutdown and reload of `tlsproxy serve` (real process, real signals):
the HTTP/1.1 request loop is now its own record in state.connections, gc.freeze after
start-up and gc.unfreeze on reload."""

from __future__ import annotations

import hashlib
import re
import signal
import ssl
import threading
import time

import pytest
from test_proxy_serve import LISTENING, Served
from upstream import WAIT, pattern_sha256, recv_head, tls_connect

pytestmark = pytest.mark.both_engines


def args_for(pki, upstream) -> list[str]:
    cert, key = pki.server
    return ["--listen", "127.0.0.1:0", "--upstream", upstream.url, "--cert", str(cert), "--key", str(key)]


def request(sock, path: str = "/status/204") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return recv_head(sock).split(b"\r\n", 1)[0]


def closed_by_peer(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionResetError):
        return True


@pytest.mark.timeout(90)
def test_sigterm_closes_idle_and_fresh_connections_answers_half_requests_finishes_downloads(pki, upstream, tmp_path):
    size = 32 << 20
    with Served(args_for(pki, upstream), tmp_path) as served:
        port = int(served.wait_for(LISTENING).group(1))
        idle = [tls_connect(pki, port) for _ in range(20)]
        for sock in idle:
            assert request(sock) == b"HTTP/1.1 204 No Content"
        fresh = [tls_connect(pki, port) for _ in range(5)]  # handshaken, no request yet
        half = tls_connect(pki, port)
        assert request(half) == b"HTTP/1.1 204 No Content"
        half.sendall(b"GET /status/204 HTTP/1.1\r\nHost: loc")  # part of a next request
        busy = tls_connect(pki, port)
        busy.sendall(f"GET /download?size={size} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = recv_head(busy)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        digest = hashlib.sha256(body)
        got = len(body)
        time.sleep(0.2)  # (the half request's bytes reach the proxy: nothing outside it can tell)
        served.proc.send_signal(signal.SIGTERM)
        served.wait_for(re.compile("stopping"))
        for sock in idle + fresh:
            assert closed_by_peer(sock)
        half.sendall(b"alhost\r\n\r\n")
        answered = recv_head(half)
        assert answered.startswith(b"HTTP/1.1 204"), answered
        assert closed_by_peer(half)
        while got < size:
            chunk = busy.recv(1 << 16)
            assert chunk, got
            digest.update(chunk)
            got += len(chunk)
        assert digest.hexdigest() == pattern_sha256(size)
        assert served.proc.wait(WAIT) == 0
        for sock in idle + fresh + [half, busy]:
            sock.close()


@pytest.mark.timeout(120)
def test_sighup_over_and_over_under_load(pki, upstream, tmp_path):
    failures: list[str] = []
    done = threading.Event()
    counts = [0] * 4

    def client(index: int, port: int) -> None:
        sizes = [0, 190 * 1024 + 1, 1 << 20, 3 << 20]
        try:
            while not done.is_set():
                with tls_connect(pki, port) as sock:
                    for _ in range(5):
                        size = sizes[counts[index] % len(sizes)]
                        sock.sendall(f"GET /download?size={size} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                        data = recv_head(sock)
                        head, _, body = data.partition(b"\r\n\r\n")
                        if not head.startswith(b"HTTP/1.1 200"):
                            failures.append(f"{index}: {head[:80]!r}")
                            return
                        digest = hashlib.sha256(body)
                        got = len(body)
                        while got < size:
                            chunk = sock.recv(1 << 16)
                            if not chunk:
                                failures.append(f"{index}: closed at {got} of {size}")
                                return
                            digest.update(chunk)
                            got += len(chunk)
                        if digest.hexdigest() != pattern_sha256(size):
                            failures.append(f"{index}: body of {size} differs")
                            return
                        counts[index] += 1
        except (OSError, ssl.SSLError) as exc:
            failures.append(f"{index}: {exc!r}")

    with Served(args_for(pki, upstream), tmp_path) as served:
        port = int(served.wait_for(LISTENING).group(1))
        threads = [threading.Thread(target=client, args=(i, port), daemon=True) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(6):
                served.proc.send_signal(signal.SIGHUP)
                served.wait_for(re.compile("reload"))
                progress = sum(counts)
                deadline = time.monotonic() + WAIT
                while sum(counts) < progress + 4 and not failures and time.monotonic() < deadline:
                    time.sleep(0.01)  # (requests served after this reload, not a fixed pause)
        finally:
            done.set()
            for thread in threads:
                thread.join(WAIT)
        assert not failures, failures
        assert min(counts) > 0, counts
        assert served.stop() == 0
        assert not any("Traceback" in line or "internal error" in line for line in served.stderr), served.stderr
