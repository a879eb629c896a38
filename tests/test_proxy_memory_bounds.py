"""Memory is bounded per connection (SPEC 4): a client that stops reading a large
response holds at most 256 KiB of response data inside the proxy (beyond the kernel's
socket buffers) and the upstream is then no longer read; the same for a request body
the upstream stops reading. And the accepted twins: a reading client gets a large
response intact, a large upload arrives intact.

How it is measured, without a clock: the stalling side (the upstream sending, or the
client uploading) writes with non-blocking sends and says when the kernel stops taking
bytes. Each time, the test looks inside the proxy (on its loop): the bytes its channels,
TLS buffers and transports hold for this connection, the kernel queues of the four
sockets (FIONREAD / TIOCOUTQ) and the bytes each end has sent and received. Inside the
proxy must never be more than BOUND; once it has stopped both ways (reading paused on
one side, writing on the other, the sender blocked) what the sender sent, less what sits
in kernel queues and what the receiver read, must be within BOUND too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import select
import socket
import ssl
import struct
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from upstream import (
    WAIT,
    ProxyThread,
    TestUpstream,
    pattern,
    pattern_sha256,
    proxy_config,
    recv_head,
    service,
    tls_connect,
)

pytestmark = pytest.mark.both_engines

KIB = 1024
ONE_READ = 64 * KIB  # the most one receive hands the proxy (Channel's read size)
BOUND = 256 * KIB + ONE_READ
TOTAL = 64 * 1024 * KIB  # more than every buffer on the way: the sender must stall
SMALL_BUFFER = 64 * KIB  # SO_SNDBUF / SO_RCVBUF of the test's own stalled sockets
PIECE = 16 * KIB


def queued(sock_or_fd, request: int) -> int:
    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


def inq(sock) -> int:
    return queued(sock, termios.FIONREAD)


def outq(sock) -> int:
    return queued(sock, termios.TIOCOUTQ)


def channel_holds(channel) -> int:
    """Bytes a proxy channel holds: received and unread, queued to send (plain or
    encrypted), in the transport's write buffer, in the TLS buffers."""
    held = channel._buffered + channel.transport.get_write_buffer_size()
    held += getattr(channel, "_unsent_bytes", 0)
    for bio in ("_incoming", "_outgoing"):
        if hasattr(channel, bio):
            held += getattr(channel, bio).pending
    return held


def proxy_fd(channel) -> int:
    return channel.transport.get_extra_info("socket").fileno()


class Sender:
    """Non-blocking sends on a thread, counting the bytes the kernel took; ``blocked``
    (under ``changed``) when it stopped taking them."""

    def __init__(self, sock, first: bytes, total: int) -> None:
        self.sock = sock
        self.first = first
        self.total = total
        self.sent = 0  # body bytes taken
        self.blocked = False
        self.blocks = 0
        self.done = False
        self.stop = threading.Event()
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sender:
        self.thread.start()
        return self

    def _send(self, data: bytes) -> int:
        while not self.stop.is_set():
            try:
                return self.sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError):
                with self.changed:
                    self.blocked = True
                    self.blocks += 1
                    self.changed.notify_all()
                select.select([], [self.sock], [], 0.2)  # wakes as soon as it can send; 0.2: checks stop
                with self.changed:
                    self.blocked = False
        return 0

    def _run(self) -> None:
        try:
            data = self.first
            while data and not self.stop.is_set():
                data = data[self._send(data):]
            pieces = pattern(self.total)
            piece = b""
            while not self.stop.is_set():
                if not piece:
                    piece = next(pieces, b"")
                    if not piece:
                        break
                view = memoryview(piece)[:PIECE]
                taken = self._send(view)
                with self.changed:
                    self.sent += taken
                piece = piece[taken:]
            self.done = not self.stop.is_set()
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
        finally:
            with self.changed:
                self.changed.notify_all()

    def wait_block(self, seen: int) -> bool:
        """Until the sender blocked again after ``seen`` blocks (False: it finished or failed)."""
        with self.changed:
            self.changed.wait_for(lambda: self.blocks > seen or self.done or self.error is not None, WAIT)
            return self.blocks > seen

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)


class StallingUpstream:
    """One-connection upstream on a thread: reads the request head, then either streams a
    TOTAL-byte response (``respond=True``) or stops reading the request body. (Not an
    ``upstream.RawUpstream``: its buffer sizes are set on the listener, and its connection
    outlives the thread that accepted it, the Sender writing on it.)"""

    def __init__(self, *, respond: bool) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)  # inherited by accept()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.respond = respond
        self.conn: socket.socket | None = None
        self.body_read = 0  # request body bytes read (with the head)
        self.sender: Sender | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(WAIT)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.conn = conn
        conn.settimeout(WAIT)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                piece = conn.recv(4096)
                if not piece:
                    return
                data += piece
        self.body_read = len(data) - data.index(b"\r\n\r\n") - 4
        if self.respond:
            conn.setblocking(False)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TOTAL
            self.sender = Sender(conn, head, TOTAL).start()
        self.ready.set()

    def model(self):
        from proxy.config.model import Upstream

        return Upstream(f"http://127.0.0.1:{self.port}", "127.0.0.1", self.port)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            self.conn.close()
        self.listener.close()
        self.thread.join(WAIT)


@contextlib.contextmanager
def proxy_to(pki, tmp_path: Path, up: StallingUpstream) -> Iterator[tuple[ProxyThread, list]]:
    """A proxy in front of ``up``, recording the upstream connections it lends."""
    from proxy.config.model import Service

    with ProxyThread(proxy_config(pki, Service(name="app", upstreams=(up.model(),)), tmp_path)) as px:
        pool = px.running.state.pool
        lent: list = []
        acquire = pool.acquire

        async def recording_acquire(*args, **kwargs):
            conn = await acquire(*args, **kwargs)
            lent.append(conn)
            return conn

        pool.acquire = recording_acquire
        yield px, lent


def inside(px: ProxyThread, lent: list) -> dict:
    """On the proxy's loop: what it holds for the one connection, and its sockets' queues."""

    async def look() -> dict:
        (tracked,) = px.running.state.connections
        down = tracked.down
        up = lent[-1].channel
        held = channel_holds(down.channel) + channel_holds(up)
        held += getattr(down, "_pending_bytes", 0)  # response coalescing, where there is any
        return {
            "held": held,
            "up_reading_paused": up._reading_paused, "up_writing_paused": up.writing_paused,
            "down_reading_paused": down.channel._reading_paused, "down_writing_paused": down.channel.writing_paused,
            "kernel_proxy": inq(proxy_fd(up)) + outq(proxy_fd(up)) + inq(proxy_fd(down.channel))
            + outq(proxy_fd(down.channel)),
        }

    return px.call(look())


def stopped_both_ways(px: ProxyThread, lent: list, up: StallingUpstream, sender: Sender, who: str,
                      paused: tuple[str, str]) -> tuple[dict, int]:
    """At each stall of ``sender`` (``who`` is sending), once the proxy has reached the
    upstream: the proxy holds at most BOUND. Returns at the first stall where both
    ``paused`` flags are set and the sender is still blocked: the look inside then, and
    the bytes the sender had sent."""
    seen = 0
    while True:
        assert sender.wait_block(seen), f"the {who} never stalled (sent {sender.sent})"
        seen = sender.blocks
        if not lent or not up.ready.is_set():
            continue
        state = inside(px, lent)
        assert state["held"] <= BOUND, state
        if all(state[flag] for flag in paused):
            with sender.changed:
                if sender.blocked:
                    return state, sender.sent


def test_a_client_that_stops_reading_stops_the_upstream(pki, tmp_path: Path) -> None:
    up = StallingUpstream(respond=True)
    client = None
    try:
        with proxy_to(pki, tmp_path, up) as (px, lent):
            client = tls_connect(pki, px.port, rcvbuf=SMALL_BUFFER)
            client.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
            received = client.recv(4096)  # the head (and maybe some body): then it stops reading
            assert received.startswith(b"HTTP/1.1 200")
            assert up.ready.wait(WAIT)
            state, sent = stopped_both_ways(px, lent, up, up.sender, "upstream",
                                            ("up_reading_paused", "down_writing_paused"))
            # Every byte the upstream sent is in a kernel queue, read by the client, or
            # inside the proxy: that last part within BOUND.
            in_kernel = outq(up.conn) + state["kernel_proxy"] + inq(client)
            assert sent - in_kernel - len(received) <= BOUND, (sent, in_kernel, state)
            assert sent < TOTAL // 2
    finally:
        if client is not None:
            client.close()
        up.close()


def test_an_upstream_that_stops_reading_stops_the_client(pki, tmp_path: Path) -> None:
    up = StallingUpstream(respond=False)
    client = None
    sender = None
    try:
        with proxy_to(pki, tmp_path, up) as (px, lent):
            client = tls_connect(pki, px.port, sndbuf=SMALL_BUFFER)
            client.setblocking(False)
            head = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % TOTAL
            sender = Sender(client, head, TOTAL).start()
            state, sent = stopped_both_ways(px, lent, up, sender, "client",
                                            ("down_reading_paused", "up_writing_paused"))
            in_kernel = outq(client) + state["kernel_proxy"] + inq(up.conn)
            assert sent - in_kernel - up.body_read <= BOUND, (sent, in_kernel, state)
            assert sent < TOTAL // 2
    finally:
        if sender is not None:
            sender.close()
        if client is not None:
            client.close()
        up.close()


def test_a_reading_client_gets_a_large_response_intact(pki, tmp_path: Path) -> None:
    size = 1024 * KIB + 7
    with TestUpstream() as upstream, ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        client = tls_connect(pki, px.port)
        with client:
            client.sendall(b"GET /download?size=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
            head, _, body = recv_head(client).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"content-length: %d" % size in head.lower()
            digest = hashlib.sha256(body)
            got = len(body)
            while got < size:
                piece = client.recv(65536)
                assert piece
                digest.update(piece)
                got += len(piece)
            assert got == size and digest.hexdigest() == pattern_sha256(size)


def test_a_large_upload_arrives_intact(pki, tmp_path: Path) -> None:
    size = 4 * 1024 * KIB + 3
    with TestUpstream() as upstream, ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        client = tls_connect(pki, px.port)
        with client:
            client.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % size)
            for piece in pattern(size):
                client.sendall(piece)
            head, _, body = recv_head(client).partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += client.recv(65536)
            answer = json.loads(body)
            assert answer["body_bytes"] == size and answer["body_sha256"] == pattern_sha256(size)
