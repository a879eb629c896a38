"""Attack on the one-SSL_write encryption of large forwarded pieces (FORWARD_READ_SIZE,
_GrownBuffers): bodies of sizes around the TLS record (16 KiB), the old and new forward
receive (128 / 190 KiB) and beyond arrive byte-exact, over HTTP/1.1 (both engines,
Content-Length and chunked, fast and slow readers) and HTTP/2."""

from __future__ import annotations

import hashlib
import ssl
import time

import httpx
import pytest
from upstream import WAIT, pattern_sha256, recv_head, tls_connect

KIB = 1024
SIZES = [16 * KIB - 1, 16 * KIB, 16 * KIB + 1, 128 * KIB, 190 * KIB - 1, 190 * KIB, 190 * KIB + 1,
         190 * KIB + 16 * KIB + 7, 1024 * KIB, 8 * 1024 * KIB]


def get_body(sock, path: str, *, piece: int = 65536, pause: float = 0.0) -> tuple[bytes, str, int]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = recv_head(sock)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    lines = head.decode().lower().split("\r\n")
    length = [int(l.split(":")[1]) for l in lines if l.startswith("content-length:")]
    digest = hashlib.sha256()
    got = 0
    if length:
        size = length[0]
        digest.update(rest)
        got = len(rest)
        while got < size:
            chunk = sock.recv(min(piece, size - got))
            assert chunk, f"closed after {got} of {size}"
            digest.update(chunk)
            got += len(chunk)
            if pause:
                time.sleep(pause)
        return head, digest.hexdigest(), got
    # chunked
    buf = rest
    while True:
        while b"\r\n" not in buf:
            buf += sock.recv(piece)
        line, _, buf = buf.partition(b"\r\n")
        n = int(line.split(b";")[0], 16)
        while len(buf) < n + 2:
            more = sock.recv(piece)
            assert more
            buf += more
        digest.update(buf[:n])
        got += n
        buf = buf[n + 2:]
        if n == 0:
            return head, digest.hexdigest(), got


@pytest.mark.both_engines
@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunked", [False, True])
def test_large_bodies_arrive_byte_exact_on_one_keepalive_connection(proxy, pki, chunked):
    with tls_connect(pki, proxy.port) as sock:
        for size in SIZES:
            head, sha, got = get_body(sock, f"/download?size={size}" + ("&chunked=1" if chunked else ""))
            assert (got, sha) == (size, pattern_sha256(size)), size


@pytest.mark.both_engines
@pytest.mark.timeout(120)
def test_large_bodies_to_a_slow_small_window_reader(proxy, pki):
    with tls_connect(pki, proxy.port, rcvbuf=4096) as sock:
        for size in (190 * KIB + 1, 1024 * KIB):
            head, sha, got = get_body(sock, f"/download?size={size}", piece=3000, pause=0.0005)
            assert (got, sha) == (size, pattern_sha256(size)), size


@pytest.mark.timeout(120)
def test_large_bodies_over_h2(proxy, pki):
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=str(pki.ca_pem)), timeout=WAIT) as client:
        for size in SIZES:
            response = client.get(proxy.url(f"/download?size={size}"))
            assert response.http_version == "HTTP/2"
            assert (len(response.content), hashlib.sha256(response.content).hexdigest()) == (size, pattern_sha256(size))


@pytest.mark.both_engines
@pytest.mark.timeout(120)
@pytest.mark.parametrize("every", [0.0, 0.05])
def test_clients_leaving_mid_forward_while_their_buffer_is_listed(pki, upstream, tmp_path, monkeypatch, caplog, every):
    import socket as socket_module
    import struct

    from upstream import ProxyThread, proxy_config, service

    from proxy.server import tls_channel

    monkeypatch.setattr(tls_channel._GrownBuffers, "EVERY", every)
    errors = []
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as proxy:
        proxy.loop.call_soon_threadsafe(proxy.loop.set_exception_handler, lambda loop, ctx: errors.append(ctx))
        for round_ in range(30):
            sock = tls_connect(pki, proxy.port)
            sock.sendall(b"GET /download?size=8388608 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            got = 0
            while got < 200 * KIB + round_ * 7919:
                got += len(sock.recv(65536))
            if round_ % 2:
                sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        assert proxy.wait_connections_done()
        with tls_connect(pki, proxy.port) as sock:
            for size in (190 * KIB, 1024 * KIB):
                head, sha, got = get_body(sock, f"/download?size={size}")
                assert (got, sha) == (size, pattern_sha256(size))
    assert not errors
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.both_engines
@pytest.mark.timeout(120)
def test_pipelined_large_responses_to_a_slow_reader(proxy, pki):
    sizes = [190 * KIB + 3, 1024 * KIB, 16 * KIB, 3 * 1024 * KIB]
    with tls_connect(pki, proxy.port, rcvbuf=8192) as sock:
        sock.sendall(b"".join(f"GET /download?size={s} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode() for s in sizes))
        data = b""
        for size in sizes:
            while b"\r\n\r\n" not in data:
                data += sock.recv(8192)
            head, _, data = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            digest = hashlib.sha256()
            while len(data) < size:
                time.sleep(0.0002)
                data += sock.recv(8192)
            digest.update(data[:size])
            data = data[size:]
            assert digest.hexdigest() == pattern_sha256(size), size
