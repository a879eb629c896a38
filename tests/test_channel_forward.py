"""Channel.forward: a Content-Length body moved from the upstream's receives straight to
the client, past both engines.

Unit tests drive a source channel's receive callback by hand (``get_buffer`` then
``buffer_updated``, as the loop does) with recording transports, no sockets: exactly
``count`` bytes go on and the rest is read as usual; a full destination stops it with
the source paused; EOF, silence and a vanished client end it; the shared receive buffer
is never kept by a plain destination's transport. The integration tests send large
responses through the proxy on real sockets (TLS and plain listeners, both engines):
intact, counted in the access log, and the connection carries the next request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from pathlib import Path

import pytest
from upstream import (
    GENUINE,
    STALL,
    WAIT,
    ProxyThread,
    ScriptedUpstream,
    TestUpstream,
    pattern_sha256,
    proxy_config,
    recv_head,
    service,
    tls_connect,
)

from proxy.config.model import ListenAddress
from proxy.server.channel import Channel, ConnectionLost

pytestmark = pytest.mark.both_engines


class KeepingTransport(asyncio.Transport):
    """Records calls; keeps what it is given *as given* (uvloop keeps a write's object
    until the kernel took it, without copying), so a reused buffer would show."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.written: list = []
        self.closing = False
        self.paused_writing = False
        self.protocol: Channel | None = None

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def write(self, data) -> None:
        self.written.append(data)
        if self.paused_writing:
            self.protocol.pause_writing()

    def writelines(self, pieces) -> None:
        for piece in pieces:
            self.write(piece)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def sent(self) -> bytes:
        return b"".join(bytes(piece) for piece in self.written)


def make_channel() -> tuple[Channel, KeepingTransport]:
    channel = Channel(read_limit=100, write_limit=1000)
    transport = KeepingTransport()
    transport.protocol = channel
    channel.connection_made(transport)
    return channel, transport


def receive(channel: Channel, data: bytes) -> None:
    """One receive, as the loop makes it: into the (shared) buffer, then the callback."""
    buffer = channel.get_buffer(len(data))
    buffer[: len(data)] = data
    channel.buffer_updated(len(data))


def test_forward_sends_exactly_count_bytes_and_leaves_the_rest_to_read():
    async def scenario():
        source, source_transport = make_channel()
        to, to_transport = make_channel()
        to.write(b"HEAD;")  # queued before: goes first
        forwarding = asyncio.ensure_future(source.forward(to, 10))
        await asyncio.sleep(0)
        receive(source, b"0123")
        receive(source, b"456789NEXT")  # the last 4 bytes are past the body
        assert await forwarding == (10, None)
        # Both receives went out at once, from the receive callback; the buffer they
        # came in was overwritten by the second, and the first is still intact.
        assert to_transport.sent() == b"HEAD;0123456789"
        assert source_transport.calls == ["pause"]  # bytes past the body: nothing more until read
        assert await source.read() == b"NEXT"
        assert source_transport.calls == ["pause", "resume"]
        receive(source, b"more")
        assert await source.read() == b"more"

    asyncio.run(scenario())


def test_forward_stops_when_the_destination_is_full_with_the_source_paused():
    async def scenario():
        source, source_transport = make_channel()
        to, to_transport = make_channel()
        to_transport.paused_writing = True  # the next write takes it above its high-water mark
        forwarding = asyncio.ensure_future(source.forward(to, 100))
        await asyncio.sleep(0)
        receive(source, b"a" * 30)
        assert await forwarding == (30, None)
        assert source_transport.calls == ["pause"]  # not read again until the client drains
        receive(source, b"b" * 5)  # (a receive already under way when reading paused)
        assert await source.read() == b"b" * 5
        assert source_transport.calls == ["pause", "resume"]

    asyncio.run(scenario())


def test_forward_resumes_reading_that_it_paused():
    async def scenario():
        source, source_transport = make_channel()
        to, to_transport = make_channel()
        to_transport.paused_writing = True
        forwarding = asyncio.ensure_future(source.forward(to, 100))
        await asyncio.sleep(0)
        receive(source, b"a" * 30)
        assert await forwarding == (30, None)
        to_transport.paused_writing = False
        to.resume_writing()
        forwarding = asyncio.ensure_future(source.forward(to, 70))
        await asyncio.sleep(0)
        assert source_transport.calls == ["pause", "resume"]
        receive(source, b"c" * 70)
        assert await forwarding == (70, None)
        assert to_transport.sent() == b"a" * 30 + b"c" * 70

    asyncio.run(scenario())


def test_forward_returns_short_at_eof():
    async def scenario():
        source, _ = make_channel()
        to, to_transport = make_channel()
        forwarding = asyncio.ensure_future(source.forward(to, 100))
        await asyncio.sleep(0)
        receive(source, b"x" * 40)
        source.eof_received()
        assert await forwarding == (40, None)
        assert await source.read() == b""
        assert to_transport.sent() == b"x" * 40

    asyncio.run(scenario())


def test_forward_times_out_when_nothing_arrives():
    async def scenario():
        source, _ = make_channel()
        to, _ = make_channel()
        forwarding = asyncio.ensure_future(source.forward(to, 100, timeout=0.05))
        await asyncio.sleep(0)
        receive(source, b"early")
        moved, failure = await forwarding
        assert moved == 5 and isinstance(failure, TimeoutError)
        receive(source, b"late")  # after it: read as usual
        assert await source.read() == b"late"

    asyncio.run(scenario())


def test_forward_raises_when_the_client_is_gone():
    async def scenario():
        source, _ = make_channel()
        to, to_transport = make_channel()
        forwarding = asyncio.ensure_future(source.forward(to, 100))
        await asyncio.sleep(0)
        receive(source, b"x" * 10)
        to_transport.closing = True
        receive(source, b"y" * 10)
        moved, failure = await forwarding
        assert moved == 10 and isinstance(failure, ConnectionLost)

    asyncio.run(scenario())


def test_forward_refuses_while_bytes_are_unread():
    async def scenario():
        source, _ = make_channel()
        to, _ = make_channel()
        receive(source, b"unread")
        with pytest.raises(RuntimeError):
            await source.forward(to, 100)

    asyncio.run(scenario())


# -- through the proxy, on real sockets ---------------------------------------------------


def get_large(sock: socket.socket, size: int) -> None:
    """One GET of a ``size``-byte body on a kept connection: intact, with its length."""
    sock.sendall(b"GET /download?size=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
    head, _, body = recv_head(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: %d" % size in head.lower()
    digest = hashlib.sha256(body)
    got = len(body)
    while got < size:
        piece = sock.recv(65536)
        assert piece, f"closed after {got} of {size} bytes"
        digest.update(piece)
        got += len(piece)
    assert got == size and digest.hexdigest() == pattern_sha256(size)


SIZES = (3 * 1024 * 1024 + 5, 64 * 1024 + 1, 200 * 1024)


def test_large_responses_over_tls_arrive_intact_and_counted(pki, tmp_path: Path) -> None:
    with TestUpstream() as upstream, ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        with tls_connect(pki, px.port) as client:
            for size in SIZES:  # one connection: each response ends where the engines say
                get_large(client, size)
    records = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [r["bytes_out"] for r in records] == list(SIZES)


def test_large_responses_over_plain_http_arrive_intact_and_counted(pki, tmp_path: Path) -> None:
    plain = (ListenAddress("127.0.0.1", 0),)
    config = proxy_config(pki, service("app", upstream := TestUpstream()), tmp_path, listen_plain=plain)
    try:
        with ProxyThread(config) as px:
            host, port = px.running.plain_addresses[0]
            with socket.create_connection((host, port), timeout=WAIT) as client:
                for size in SIZES:
                    get_large(client, size)
    finally:
        upstream.close()
    records = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [r["bytes_out"] for r in records] == list(SIZES)


BIG = bytes(range(256)) * (300 * 4)  # 300 KiB: forwarded past the engines (httptools)
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"


def test_bytes_past_a_forwarded_body_never_reach_the_next_client(pki, tmp_path: Path) -> None:
    # The forged response arrives in the same receive as the body's last bytes: they go
    # on, it stays unread in the upstream's channel, which must then not be pooled.
    answer = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG), BIG, FORGED)
    with ScriptedUpstream({b"/first": answer}) as up:
        with ProxyThread(proxy_config(pki, service("app", up), tmp_path)) as px:
            with tls_connect(pki, px.port) as client:
                client.sendall(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
                head, _, body = recv_head(client).partition(b"\r\n\r\n")
                while len(body) < len(BIG):
                    piece = client.recv(65536)
                    assert piece
                    body += piece
                assert body == BIG
                client.sendall(b"GET /second HTTP/1.1\r\nHost: localhost\r\n\r\n")
                answer = recv_head(client)
                while not answer.endswith(b"\r\n\r\ngenuine"):
                    piece = client.recv(4096)
                    assert piece
                    answer += piece
                assert b"forged" not in answer
        assert up.accepts == 2  # the overrun connection was closed, not pooled


def test_an_upstream_closing_mid_body_closes_the_client_connection(pki, tmp_path: Path) -> None:
    half = len(BIG) // 2
    answer = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG), BIG[:half], None)
    with ScriptedUpstream({b"/cut": answer}) as up:
        with ProxyThread(proxy_config(pki, service("app", up), tmp_path)) as px:
            with tls_connect(pki, px.port) as client:
                client.sendall(b"GET /cut HTTP/1.1\r\nHost: localhost\r\n\r\n")
                head, _, body = recv_head(client).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                while piece := recv_or_closed(client):
                    body += piece
                assert body == BIG[:half]  # then closed: never a complete-looking response


def test_an_upstream_stalling_mid_body_is_a_gateway_timeout(pki, tmp_path: Path) -> None:
    from proxy.config.model import Timeouts

    half = len(BIG) // 2
    answer = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG), BIG[:half], STALL)
    config = proxy_config(pki, service("app", ScriptedUpstream({b"/stall": answer})), tmp_path,
                          timeouts=Timeouts(upstream_response=0.2))
    with ProxyThread(config) as px:
        with tls_connect(pki, px.port) as client:
            client.sendall(b"GET /stall HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head, _, body = recv_head(client).partition(b"\r\n\r\n")
            while piece := recv_or_closed(client):
                body += piece
            assert body == BIG[:half]
    (record,) = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert record["status"] == 504 and record["bytes_out"] == half  # what went out, as ever


def recv_or_closed(sock) -> bytes:
    try:
        return sock.recv(65536)
    except (ConnectionResetError, ssl.SSLError):
        return b""


def test_large_responses_from_an_https_upstream_arrive_intact(pki, tmp_path: Path) -> None:
    # Two proxies: a plain listener whose upstream is the other over https:// (uvloop's
    # TLS transport fills the forward's receive buffer), the other in front of the app.
    from proxy.config.model import Service, Upstream, UpstreamTLSSettings

    plain = (ListenAddress("127.0.0.1", 0),)
    (tmp_path / "inner").mkdir()
    (tmp_path / "outer").mkdir()
    with TestUpstream() as app, ProxyThread(proxy_config(pki, service("app", app), tmp_path / "inner")) as inner:
        remote = Service(
            name="remote",
            upstreams=(Upstream(f"https://127.0.0.1:{inner.port}", "127.0.0.1", inner.port, "https"),),
            upstream_tls=UpstreamTLSSettings(ca=pki.ca_pem),
        )
        with ProxyThread(proxy_config(pki, remote, tmp_path / "outer", listen_plain=plain)) as outer:
            host, port = outer.running.plain_addresses[0]
            with socket.create_connection((host, port), timeout=WAIT) as client:
                for size in SIZES:
                    get_large(client, size)
