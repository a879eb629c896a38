"""The keep-alive request served from receive callbacks (``connection._RequestLoop``,
``Relay.start`` / ``relay_events``), through real sockets.

That path is taken only for a body-less, non-upgrade request whose HTTP/1.1 service has
an idle pooled upstream connection: so every test here first puts one in the pool (a
first request), and checks with ``started`` (a wrapper on ``Relay.start``) that the
request under test went out on it. Whatever the callbacks cannot finish (a response in
pieces, backpressure, a timeout, a dead pooled connection) is handed to the
connection's task; the client must not be able to tell: the parity tests at the end
send the same request as a first request (the coroutine path) and as a later one (the
callback path) and compare what the upstream and the client receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from upstream import (
    WAIT,
    ProxyThread,
    RawUpstream,
    pattern,
    proxy_config,
    proxy_log_waiter,
    recv_head,
    recv_until_closed,
    service,
    tls_connect,
)

from proxy.config.model import Timeouts
from proxy.server.relay import Relay
from proxy.server.state import ServerState

pytestmark = pytest.mark.both_engines

SHORT = 2.0  # a socket timeout where an answer is due at once

Script = Callable[[socket.socket, int, bytes], bool | None]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body


def target_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


def echo_target(conn: socket.socket, index: int, head: bytes) -> None:
    """The default answer: 200 with "for <target>" as the body (its length for HEAD)."""
    answer = ok(b"for " + target_of(head))
    conn.sendall(answer[: -len(b"for " + target_of(head))] if head.startswith(b"HEAD ") else answer)


class ScriptedUpstream(RawUpstream):
    """A raw HTTP/1.1 upstream: each request head (and its Content-Length body) goes to
    ``script(conn, index, head)``, ``index`` counting requests on that connection; the
    script answers on ``conn`` and returns False to close it. ``heads`` keeps every
    request head received, ``arrived`` is set at each."""

    def __init__(self, script: Script = echo_target) -> None:
        super().__init__()
        self.script = script
        self.heads: list[bytes] = []
        self.arrived = threading.Event()
        self.release = threading.Event()  # for scripts that hold an answer back
        self.done = threading.Event()  # a script finished sending what it held back

    def close(self) -> None:
        self.release.set()
        super().close()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        index = 0
        while True:
            buf = recv_head(conn, buf)
            if b"\r\n\r\n" not in buf:
                return
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            need = int(length.group(1)) if length else 0
            while len(buf) < need and (chunk := conn.recv(65536)):
                buf += chunk
            buf = buf[need:]
            self.heads.append(head + b"\r\n\r\n")
            self.arrived.set()
            if self.script(conn, index, head + b"\r\n\r\n") is False:
                return
            index += 1


class Client:
    """A raw TLS client connection reading HTTP/1.1 responses (Content-Length framed,
    or no body for HEAD / 204 / 304)."""

    def __init__(self, pki, port: int, timeout: float = WAIT, **options) -> None:
        self.sock = tls_connect(pki, port, timeout=timeout, **options)
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def get(self, path: str, method: str = "GET", extra: str = "") -> tuple[bytes, bytes]:
        self.send(request(path, method, extra))
        return self.response(method)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: str = "GET") -> tuple[bytes, bytes]:
        """The next response's head (through its blank line) and body."""
        data = recv_head(self.sock, self.buf)
        assert b"\r\n\r\n" in data, data
        head, _, rest = data.partition(b"\r\n\r\n")
        head += b"\r\n\r\n"
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            return head, self._chunked(rest)
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        need = 0 if method == "HEAD" or status in (204, 304) or status < 200 else int(length.group(1))
        chunks = [rest]
        have = len(rest)
        while have < need:
            chunk = self.sock.recv(1 << 20)
            assert chunk, f"closed after {have} of {need} body bytes"
            chunks.append(chunk)
            have += len(chunk)
        data = b"".join(chunks)
        self.buf = data[need:]
        return head, data[:need]

    def _chunked(self, data: bytes) -> bytes:
        """A chunked body (no trailers), decoded; what follows it stays in ``buf``."""
        body = b""
        while True:
            while b"\r\n" not in data:
                data += self._recv()
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(data) < size + 2:
                data += self._recv()
            if size == 0:
                self.buf = data[2:]
                return body
            body, data = body + data[:size], data[size + 2:]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        assert chunk, "closed mid-body"
        return chunk

    def closed(self) -> bool:
        """Whether the proxy closes the connection now with nothing more sent."""
        return self.buf == b"" and recv_until_closed(self.sock) == b""


def request(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


def status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


@pytest.fixture(autouse=True)
def no_internal_error():
    """No test here may make the proxy log an internal error (a bug caught by the
    callbacks' or the relay's last-resort handler)."""
    with proxy_log_waiter("internal error") as waiter:
        yield
    assert not waiter.seen.is_set(), [m for m in waiter.messages if "internal error" in m]


def holding_upstream(target: bytes, *, then_answer: bool) -> ScriptedUpstream:
    """An upstream echoing every target (``echo_target``) but holding the request for
    ``target`` until its ``release`` is set, then answering it (``then_answer``) or
    closing without an answer."""

    def script(conn, index, head):
        if target_of(head) == target:
            up.release.wait(WAIT)
            if not then_answer:
                return False
        return echo_target(conn, index, head)

    up = ScriptedUpstream(script)
    return up


@contextlib.contextmanager
def recording_starts() -> Iterator[list[bytes]]:
    """The targets of the requests sent on an idle pooled connection by ``Relay.start``:
    the callback path (a request that had to use ``Relay.run`` is not listed)."""
    targets: list[bytes] = []
    original = Relay.start

    def start(self, headers, target, fields=None):
        conn = original(self, headers, target, fields)
        if conn is not None:
            targets.append(self.head.target)
        return conn

    Relay.start = start
    try:
        yield targets
    finally:
        Relay.start = original


@pytest.fixture
def started() -> Iterator[list[bytes]]:
    with recording_starts() as targets:
        yield targets


def log_lines(px: ProxyThread, tmp_path) -> list[dict]:
    """The access log so far (flushed on the proxy's loop first)."""

    async def flush() -> None:
        px.running.state.access_log.flush()

    px.call(flush())
    path = tmp_path / "access.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(px: ProxyThread, condition: Callable[[ServerState], bool]) -> None:
    """Wait (bounded) until ``condition(state)`` holds on the proxy's loop."""

    async def check() -> None:
        async with asyncio.timeout(WAIT):
            while not condition(px.running.state):
                await asyncio.sleep(0.005)

    px.call(check(), WAIT + 5)


def proxy(pki, tmp_path, up: RawUpstream, **overrides) -> ProxyThread:
    return ProxyThread(proxy_config(pki, service("app", up), tmp_path, **overrides))


def warm(client: Client) -> None:
    """The first request: its upstream connection goes to the pool, idle."""
    head, body = client.get("/warm")
    assert status(head) == 200 and body == b"for /warm"


def send_until_upstream_has_it(up: ScriptedUpstream, client: Client, path: str) -> None:
    """Send a GET for ``path`` and wait (bounded) until the upstream has received it."""
    up.arrived.clear()
    client.send(request(path))
    assert up.arrived.wait(WAIT)


# -- a response in pieces ---------------------------------------------------------------


def test_a_response_in_pieces_is_relayed_whole_and_keep_alive_goes_on(pki, tmp_path, started):
    body = b"0123456789" * 1000

    def script(conn, index, head):
        if target_of(head) != b"/pieces":
            return echo_target(conn, index, head)
        # Three sends with pauses between them, so the proxy receives them apart (the
        # pauses only force the split; the test waits for no event with them).
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Piece: yes\r\n\r\n" % len(body))
        time.sleep(0.05)
        conn.sendall(body[:3000])
        time.sleep(0.05)
        conn.sendall(body[3000:7000])
        time.sleep(0.05)
        conn.sendall(body[7000:])

    with ScriptedUpstream(script) as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        head, got = client.get("/pieces")
        assert status(head) == 200 and b"x-piece: yes" in head.lower()
        assert got == body
        again_head, again = client.get("/again")
        assert status(again_head) == 200 and again == b"for /again"
        assert up.accepts == 1
        assert started == [b"/pieces", b"/again"]


def test_pauses_shorter_than_upstream_response_are_waited_for_each_time(pki, tmp_path, started):
    """upstream_response bounds each wait for the upstream, not the whole response:
    three pauses of 0.2 s each (0.6 s in all) within a 0.5 s timeout are a 200."""

    def script(conn, index, head):
        if target_of(head) != b"/slow":
            return echo_target(conn, index, head)
        time.sleep(0.2)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        time.sleep(0.2)
        conn.sendall(b"abc")
        time.sleep(0.2)
        conn.sendall(b"def")

    with ScriptedUpstream(script) as up, proxy(pki, tmp_path, up, timeouts=Timeouts(upstream_response=0.5)) as px:
        with Client(pki, px.port) as client:
            warm(client)
            head, body = client.get("/slow")
            assert status(head) == 200 and body == b"abcdef"
        assert started == [b"/slow"] and up.accepts == 1


# -- an upstream that stalls --------------------------------------------------------------


def test_an_upstream_stalling_on_the_pooled_connection_gets_504_and_the_next_request_works(
    pki, tmp_path, started
):
    up = holding_upstream(b"/stall", then_answer=False)
    with up, proxy(pki, tmp_path, up, timeouts=Timeouts(upstream_response=0.3)) as px, Client(pki, px.port) as client:
        warm(client)
        head, body = client.get("/stall")
        assert status(head) == 504
        assert b"content-type: text/plain; charset=utf-8" in head.lower()
        assert body == f"service 'app': upstream {up.url} did not respond within 0.3s\n".encode()
        # The client's connection goes on; the stalled upstream connection is not reused.
        head, body = client.get("/next")
        assert status(head) == 200 and body == b"for /next"
        assert up.accepts == 2
        assert started == [b"/stall"]
        lines = log_lines(px, tmp_path)
        assert [(line["path"], line["status"]) for line in lines] == [("/warm", 200), ("/stall", 504), ("/next", 200)]


# -- a pooled connection closed by the upstream without an answer --------------------------


def close_on_second(conn, index, head):
    """Answer a connection's first request; read the second and close without a word."""
    if index == 1:
        return False
    return echo_target(conn, index, head)


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "PUT", "OPTIONS"])
def test_an_idempotent_request_on_a_dead_pooled_connection_goes_again_once(pki, tmp_path, started, method):
    with ScriptedUpstream(close_on_second) as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        head, body = client.get("/again", method, "Content-Length: 0\r\n" if method == "PUT" else "")
        assert status(head) == 200
        assert body == (b"" if method == "HEAD" else b"for /again")
        assert up.accepts == 2  # one fresh connection for the second attempt
        assert [target_of(h) for h in up.heads] == [b"/warm", b"/again", b"/again"]
        assert started == [b"/again"]
        head, body = client.get("/next")
        assert status(head) == 200 and body == b"for /next"
        assert [(line["path"], line["status"]) for line in log_lines(px, tmp_path)] == [
            ("/warm", 200), ("/again", 200), ("/next", 200)]


@pytest.mark.parametrize("extra", ["", "Content-Length: 0\r\n"], ids=["no-length", "length-0"])
def test_a_body_less_post_on_a_dead_pooled_connection_is_sent_once_and_gets_502(pki, tmp_path, started, extra):
    with ScriptedUpstream(close_on_second) as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        head, body = client.get("/pay", "POST", extra)
        assert status(head) == 502
        assert body == f"service 'app': upstream {up.url} closed the connection without a response\n".encode()
        assert [target_of(h) for h in up.heads] == [b"/warm", b"/pay"]  # never a second copy
        assert up.accepts == 1
        assert started == [b"/pay"]
        head, body = client.get("/next")
        assert status(head) == 200 and body == b"for /next"


def test_a_request_whose_second_attempt_dies_too_gets_502(pki, tmp_path, started):
    """At most one more attempt: a fresh connection closing without an answer is the
    upstream's failure."""

    def script(conn, index, head):
        if target_of(head) == b"/dead":
            return False
        return echo_target(conn, index, head)

    with ScriptedUpstream(script) as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        head, _ = client.get("/dead")
        assert status(head) == 502
        assert [target_of(h) for h in up.heads] == [b"/warm", b"/dead", b"/dead"]
        assert up.accepts == 2


# -- a malformed response -------------------------------------------------------------------

MALFORMED = {
    "not-http": b"HELLO THERE\r\n\r\n",
    "bad-status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nno",
    "bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nnope",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nnop",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 4\r\n\r\nnope",
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_response_on_the_pooled_connection_is_502_never_forwarded(pki, tmp_path, started, answer):
    def script(conn, index, head):
        if target_of(head) == b"/bad":
            conn.sendall(answer)
            return False
        return echo_target(conn, index, head)

    with ScriptedUpstream(script) as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        head, body = client.get("/bad")
        assert status(head) == 502 and b"content-type: text/plain; charset=utf-8" in head.lower(), head + body
        # (the 502's text may quote the bad line: it names what was wrong, it is not the response)
        assert body.startswith(b"upstream broke the protocol: ") and body.endswith(b"\n") and body.count(b"\n") == 1
        head, body = client.get("/next")  # the request was whole: the client's connection goes on
        assert status(head) == 200 and body == b"for /next"
        assert up.accepts == 2
        assert started == [b"/bad"]


# -- large bodies and backpressure --------------------------------------------------------


MIB = 1 << 20


def big(conn, index, head):
    target = target_of(head)
    if target.startswith(b"/big"):
        size = int(target.rsplit(b"=", 1)[1])
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for piece in pattern(size):
            conn.sendall(piece)
        return None
    return echo_target(conn, index, head)


def test_a_large_response_on_the_pooled_connection_is_byte_exact_and_logged(pki, tmp_path, started):
    expected = b"".join(pattern(MIB))
    with ScriptedUpstream(big) as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        head, body = client.get(f"/big?size={MIB}")
        assert status(head) == 200 and body == expected
        head, body = client.get("/after")
        assert body == b"for /after"
        assert up.accepts == 1 and started == [f"/big?size={MIB}".encode(), b"/after"]
        lines = log_lines(px, tmp_path)
        assert [(line["path"], line["status"], line["bytes_out"]) for line in lines] == [
            ("/warm", 200, len(b"for /warm")), (f"/big?size={MIB}", 200, MIB), ("/after", 200, len(b"for /after"))]


def test_a_client_that_stops_reading_a_large_response_then_resumes_gets_it_all(pki, tmp_path, started):
    size = 8 * MIB
    expected = b"".join(pattern(size))
    with ScriptedUpstream(big) as up, proxy(pki, tmp_path, up) as px:
        with Client(pki, px.port, rcvbuf=16384) as client:
            warm(client)
            client.send(request(f"/big?size={size}"))
            # The client reads nothing until the proxy's write side to it is paused.
            wait_for(px, lambda state: any(t.down.channel.writing_paused for t in state.connections))
            head, body = client.response()
            assert status(head) == 200 and body == expected
            head, body = client.get("/after")
            assert body == b"for /after"
        assert up.accepts == 1 and started == [f"/big?size={size}".encode(), b"/after"]
        lines = log_lines(px, tmp_path)
        assert [line["bytes_out"] for line in lines][1] == size


# -- the client leaving -------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before-head", "after-head"])
def test_a_client_leaving_before_its_response_never_gets_it_to_another_client(pki, tmp_path, started, when):
    """Client A asks for /a and leaves while the upstream holds the answer (all of it, or
    its body); then B asks on the same pooled upstream path: B gets its own answer, and
    A's request is logged once."""
    body_a = b"A" * 5000

    def script(conn, index, head):
        target = target_of(head)
        if target == b"/a":
            if when == "after-head":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body_a))
            up.release.wait(WAIT)
            try:
                if when == "before-head":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body_a))
                conn.sendall(body_a)
            finally:
                up.done.set()
            return None
        return echo_target(conn, index, head)

    up = ScriptedUpstream(script)
    with up, proxy(pki, tmp_path, up) as px:
        with Client(pki, px.port) as first:
            warm(first)
        with Client(pki, px.port) as a:
            send_until_upstream_has_it(up, a, "/a")
            if when == "after-head":
                assert a.sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        # A is gone (closed: close_notify and FIN); now its answer comes.
        up.release.set()
        assert up.done.wait(WAIT)
        with Client(pki, px.port) as b:
            head, body = b.get("/b")
            assert status(head) == 200 and body == b"for /b"
            assert b.get("/b2")[1] == b"for /b2"
        assert started[:2] == [b"/a", b"/b"] or started[:1] == [b"/a"]  # (B: pooled only if A's answer ended clean)
        assert px.wait_connections_done()
        lines = log_lines(px, tmp_path)
        assert [line["path"] for line in lines].count("/a") == 1
        assert [line["path"] for line in lines if line["path"] != "/a"] == ["/warm", "/b", "/b2"]


# -- pipelining and split heads ------------------------------------------------------------


def test_pipelined_requests_on_a_kept_alive_connection_are_answered_in_order(pki, tmp_path, started):
    with ScriptedUpstream() as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        client.send(request("/p1") + request("/p2", "HEAD") + request("/p3"))
        answers = [client.response(), client.response("HEAD"), client.response()]
        assert [status(h) for h, _ in answers] == [200, 200, 200]
        assert [b for _, b in answers] == [b"for /p1", b"", b"for /p3"]
        assert up.accepts == 1
        assert started == [b"/p1", b"/p2", b"/p3"]
        assert [target_of(h) for h in up.heads] == [b"/warm", b"/p1", b"/p2", b"/p3"]


@pytest.mark.parametrize(
    "cut", [len(b"GET /split HTTP/1.1\r\nHost: loc"), len(b"GE")], ids=["in a header", "in the request line"]
)
def test_a_head_in_two_pieces_on_a_kept_alive_connection(pki, tmp_path, started, cut):
    head_bytes = b"GET /split HTTP/1.1\r\nHost: localhost\r\nX-Two: parts\r\n\r\n"
    with ScriptedUpstream() as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        client.send(head_bytes[:cut])
        # The first piece is in the proxy (the connection is no longer idle) before the rest.
        wait_for(px, lambda state: not any(t.idle for t in state.connections))
        client.send(head_bytes[cut:])
        head, body = client.response()
        assert status(head) == 200 and body == b"for /split"
        assert b"x-two: parts" in up.heads[-1].lower() and b"host: localhost" in up.heads[-1].lower()
        assert client.get("/next")[1] == b"for /next"
        assert up.accepts == 1 and started == [b"/split", b"/next"]


# -- shutdown -----------------------------------------------------------------------------


def test_shutdown_while_a_callback_request_is_in_flight_answers_it_and_closes_the_idle(
    pki, tmp_path, started, shutdown_begun
):
    up = holding_upstream(b"/held", then_answer=True)
    with up:
        px = proxy(pki, tmp_path, up)
        closing = None
        try:
            with Client(pki, px.port) as busy, Client(pki, px.port) as idle:
                warm(busy)
                assert idle.get("/idle-warm")[1] == b"for /idle-warm"  # kept alive, now idle
                send_until_upstream_has_it(up, busy, "/held")
                closing = asyncio.run_coroutine_threadsafe(px.running.close(5.0), px.loop)
                assert shutdown_begun.wait(WAIT)
                assert idle.closed()  # idle: closed at once
                up.release.set()
                head, body = busy.response()
                assert status(head) == 200 and body == b"for /held"
                assert b"connection: close" in head.lower()
                assert busy.closed()
            closing.result(WAIT)
        finally:
            px.close()
        assert b"/held" in started
        assert [line["path"] for line in log_lines_after_close(tmp_path)] == ["/warm", "/idle-warm", "/held"]


def log_lines_after_close(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]


# -- parity: the same request as a first request (coroutine) and a later one (callbacks) ----


ANSWERS = {
    "plain": ok(b"hello"),
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunked-trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
                        b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "304": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    "early-hints": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + ok(b"hello"),
    "100-unasked": b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"hello"),
    "close-delimited": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello until close",
    "connection-close": ok(b"bye", b"Connection: close\r\n"),
    "hop-by-hop": ok(b"hello", b"Connection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"),
    "http-1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "lowercase-reason-less": b"HTTP/1.1 200 \r\ncontent-length: 5\r\n\r\nhello",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 5\r\n\r\nhello",
    "overrun": ok(b"hello") + ok(b"forged"),
    "switching-unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",

    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n0\r\n\r\n",
    "short-body-then-close": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
    **{"malformed-" + name: answer for name, answer in MALFORMED.items()},
}

HALF_CLOSE = "half-close:"  # a request the client follows with a TCP FIN (no close_notify)

REQUESTS = {
    "get": "GET /t HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "head": "HEAD /t HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "http-1.0": "GET /t HTTP/1.0\r\n\r\n",
    "http-1.0-keep-alive": "GET /t HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n",
    "close": "GET /t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "hop-by-hop": "GET /t HTTP/1.1\r\nHost: localhost\r\nConnection: x-mine\r\nX-Mine: 1\r\nTE: trailers\r\n\r\n",
    "padded": "GET /t HTTP/1.1\r\nHost:   localhost  \r\nX-A:  b  \r\n\r\n",
    "expect": "GET /t HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n\r\n",
    "spoof": "GET /t HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 6.6.6.6\r\nX-Request-Id: mine-1\r\n\r\n",
    "post-empty": "POST /t HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    "junk-after": "GET /t HTTP/1.1\r\nHost: localhost\r\n\r\nNOT A REQUEST\r\n\r\n",
    "two-in-one": "GET /t HTTP/1.1\r\nHost: localhost\r\n\r\nGET /t HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "half-close": HALF_CLOSE + "GET /t HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "half-close-1.0": HALF_CLOSE + "GET /t HTTP/1.0\r\nHost: localhost\r\n\r\n",
    "absolute-form": "GET http://localhost/t HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "dot-segments": "GET /a/../t HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "no-host": "GET /t HTTP/1.1\r\n\r\n",
    "options-star": "OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "upgrade": "GET /t HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
}

_VARYING = re.compile(rb"(?im)^(x-request-id: [0-9a-f-]{16,}|forwarded: .*|x-forwarded-port: \d+)\r\n")
_PORT = re.compile(rb"127\.0\.0\.1:\d+")


def _normal(data: bytes) -> bytes:
    return _PORT.sub(b"127.0.0.1:PORT", _VARYING.sub(b"", data))


def _one_chunk(data: bytes) -> bytes:
    """A first response with chunked framing re-framed as one chunk: where its chunks
    split depends on how the body arrived, not on what it is."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return data
    body = b""
    while True:
        size_line, crlf, rest = rest.partition(b"\r\n")
        if not crlf:
            return data  # (cut short: compared as it came)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return head + sep + b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + rest
        body, rest = body + rest[:size], rest[size + 2:]


def _exchange(pki, tmp_path, answer: bytes | tuple, raw: str, *, warm_first: bool) -> tuple:
    """What the upstream received for the request ``raw`` (target /t), what its client
    received (until the proxy closed, after a final ``Connection: close`` request when
    the connection should go on) and the access log's lines, with the request sent on a
    fresh proxy (``warm_first`` False: the coroutine path) or after a warm-up request
    (then on the callback path); and the targets ``Relay.start`` sent. ``answer``: the
    upstream's bytes, or pieces with pauses (floats: seconds, only to force splits)."""
    pieces = answer if isinstance(answer, tuple) else (answer,)
    whole = b"".join(p for p in pieces if isinstance(p, bytes))
    keep_open = not whole.startswith(b"HTTP/1.0") and b"close" not in whole.lower() and b" 101 " not in whole[:13]

    def script(conn, index, head):
        if target_of(head) != b"/t":
            return echo_target(conn, index, head)
        for piece in pieces:
            if isinstance(piece, float):
                time.sleep(piece)
            else:
                conn.sendall(piece)
        return keep_open

    half_close = raw.startswith(HALF_CLOSE)
    raw_request = raw.removeprefix(HALF_CLOSE).encode()
    tmp_path.mkdir()
    with recording_starts() as calls:
        with ScriptedUpstream(script) as up, ProxyThread(
            proxy_config(pki, service("app", up), tmp_path, timeouts=Timeouts(upstream_response=1.0))
        ) as px:
            if warm_first:
                with Client(pki, px.port) as first:
                    warm(first)
            with Client(pki, px.port, timeout=5.0) as client:
                client.send(raw_request)
                if half_close:
                    socket.socket.shutdown(client.sock, socket.SHUT_WR)  # (SSLSocket's would drop TLS)
                elif b"connection: close" not in raw_request.lower() and b"HTTP/1.0\r\n\r\n" not in raw_request:
                    client.send(b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                try:
                    received = recv_until_closed(client.sock, (ssl.SSLError, ConnectionError))
                except TimeoutError:
                    received = b"<hang>"
            assert px.wait_connections_done(5.0), "a client connection never ended"
            heads = [_normal(h) for h in up.heads if target_of(h) != b"/warm"]
            lines = [
                (line["method"], line["path"], line["status"], line["bytes_in"], line["bytes_out"], line["protocol"],
                 line["upstream"] and _normal(line["upstream"].encode()))
                for line in log_lines(px, tmp_path) if line["path"] != "/warm"
            ]
    return heads, _one_chunk(_normal(received)), lines, calls


def _parity(pki, tmp_path, answer, raw: str, *, callbacks: bool = True) -> None:
    first = _exchange(pki, tmp_path / "first", answer, raw, warm_first=False)
    later = _exchange(pki, tmp_path / "later", answer, raw, warm_first=True)
    if callbacks:
        assert later[3][:1] == [b"/t"]  # the callback path was taken
    for name, a, b in zip(("upstream received", "client received", "access log"), first[:3], later[:3]):
        assert b == a, f"{name} differs"


STALL = 3.0  # longer than the exchange's upstream_response (1 s)


@pytest.mark.parametrize("answer", ANSWERS.values(), ids=ANSWERS.keys())
def test_responses_parity_first_request_and_callback_path(pki, tmp_path, answer):
    _parity(pki, tmp_path, answer, REQUESTS["get"])


PIECES = {
    "head-split": (b"HTTP/1.1 200 OK\r\nContent-Le", 0.05, b"ngth: 5\r\n\r\nhel", 0.05, b"lo"),
    "head-split-in-line-end": (b"HTTP/1.1 200 OK\r\nX-A: 1\r", 0.05, b"\nContent-Length: 5\r\n\r", 0.05, b"\nhello"),
    "trickle": tuple(x for byte in ok(b"hello", b"X-T: t\r\n") for x in (bytes([byte]), 0.002)),
    "chunked-split": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r", 0.05, b"\nhello\r\n0\r\n", 0.05,
                      b"\r\n"),
    "interim-then-stall": (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", STALL),
    "head-then-stall": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe", STALL),
    "stall": (STALL,),
    "chunked-then-stall": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", STALL),
    "close-delimited-split": (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nab", 0.05, b"cd"),
    "large-chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                      *[b"%x\r\n" % 70000 + b"z" * 70000 + b"\r\n" for _ in range(3)], b"0\r\n\r\n"),
    "huge-head-split": (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 40000, 0.05, b"b" * 40000 + b"\r\nContent-Length: 2\r\n\r\nok"),
    "http-1.0-keep-alive": (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello",),
    "length-0": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",),
    "408-unasked": (b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",),
    "large-length-split": (b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"q" * 1000, 0.05,
                           b"q" * 199000, 0.05, b"q" * 100000),
}


@pytest.mark.parametrize("answer", PIECES.values(), ids=PIECES.keys())
def test_responses_in_pieces_parity_first_request_and_callback_path(pki, tmp_path, answer):
    _parity(pki, tmp_path, answer, REQUESTS["get"])


@pytest.mark.parametrize("raw", REQUESTS.values(), ids=REQUESTS.keys())
def test_requests_parity_first_request_and_callback_path(pki, tmp_path, raw):
    # (refused requests, and upgrades, do not go out by Relay.start: still compared)
    target = raw.removeprefix(HALF_CLOSE).split(" ", 2)[1]
    _parity(pki, tmp_path, ok(b"hello"), raw, callbacks=target == "/t" and "Upgrade" not in raw and "\r\nHost" in raw)


# -- mixed and concurrent -----------------------------------------------------------------


def test_pipelined_requests_mixing_the_callback_and_the_coroutine_paths(pki, tmp_path, started):
    """A body-less GET (callbacks), a POST with a body (the coroutine), a GET again: in
    one send, answered in order, each request upstream exactly once."""

    def script(conn, index, head):
        conn.sendall(ok(b"for " + head.split(b"\r\n", 1)[0]))

    with ScriptedUpstream(script) as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        client.get("/warm")
        client.send(request("/g1") + request("/p", "POST", "Content-Length: 5\r\n")[:-2] + b"\r\nhello"
                    + request("/g2"))
        bodies = [client.response()[1] for _ in range(3)]
        assert bodies == [b"for GET /g1 HTTP/1.1", b"for POST /p HTTP/1.1", b"for GET /g2 HTTP/1.1"]
        assert [target_of(h) for h in up.heads] == [b"/warm", b"/g1", b"/p", b"/g2"]
        assert started == [b"/g1", b"/g2"] and up.accepts == 1


def test_the_next_request_sent_while_a_response_is_on_its_way(pki, tmp_path, started):
    """The client sends /b after /a's head arrived and before its body: the bytes wait in
    the client's channel (nobody watches it then) and are served after /a."""
    body = b"a" * 20000

    def script(conn, index, head):
        if target_of(head) == b"/a":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            up.release.wait(WAIT)
            conn.sendall(body)
            return None
        return echo_target(conn, index, head)

    up = ScriptedUpstream(script)
    with up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        client.send(request("/a"))
        first = client.sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        client.buf = first
        client.send(request("/b"))
        up.release.set()
        head, got = client.response()
        assert status(head) == 200 and got == body
        head, got = client.response()
        assert got == b"for /b"
        assert started == [b"/a", b"/b"] and up.accepts == 1


def test_many_requests_on_one_connection_keep_their_answers(pki, tmp_path, started):
    """200 requests in a row on one client connection, answers of varied shapes: each
    gets exactly its own (a state kept wrongly across callback-served requests shows)."""
    shapes = [
        lambda t: ok(b"for " + t),
        lambda t: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\nfor %s\r\n0\r\n\r\n" % (len(t) + 4, t),
        lambda t: b"HTTP/1.1 103 Early Hints\r\n\r\n" + ok(b"for " + t),
    ]

    def script(conn, index, head):
        target = target_of(head)
        conn.sendall(shapes[int(target[2:]) % len(shapes)](target))

    with ScriptedUpstream(script) as up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        for number in range(200):
            client.send(request(f"/n{number}"))
            head, body = client.response()
            while status(head) == 103:
                head, body = client.response()
            assert body == b"for /n%d" % number, (number, head, body)
        assert up.accepts == 1 and len(started) == 199


def test_concurrent_clients_never_get_each_others_answers(pki, tmp_path, started):
    """Eight clients, 30 requests each, over a pool of reused connections, the upstream
    answering after random short pauses: every answer is for its own request."""
    import random

    def script(conn, index, head):
        time.sleep(random.random() * 0.003)
        echo_target(conn, index, head)

    failures: list[str] = []

    def client_run(number: int) -> None:
        try:
            with Client(pki, px.port) as client:
                for index in range(30):
                    path = f"/c{number}-{index}"
                    head, body = client.get(path)
                    if body != b"for " + path.encode():
                        failures.append(f"{path}: {head!r} {body!r}")
        except Exception as exc:  # (reported below)
            failures.append(f"client {number}: {exc!r}")

    with ScriptedUpstream(script) as up, proxy(pki, tmp_path, up) as px:
        threads = [threading.Thread(target=client_run, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 2)
        assert failures == []
        assert len(started) > 100  # most went out on pooled connections, by the callbacks
        lines = log_lines(px, tmp_path)
        assert len(lines) == 240 and all(line["status"] == 200 for line in lines)


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_leaving_is_logged_the_same_on_both_paths(pki, tmp_path, reset):
    """The access-log line of a request whose client left before its answer came: the
    same whether it was the first request (coroutine) or a callback-served one."""

    def run(warm_first: bool, where) -> tuple:
        def script(conn, index, head):
            if target_of(head) == b"/a":
                up.release.wait(WAIT)
                try:
                    conn.sendall(ok(b"A" * 5000))
                finally:
                    up.done.set()
                return None
            return echo_target(conn, index, head)

        where.mkdir()
        up = ScriptedUpstream(script)
        with up, proxy(pki, where, up) as px:
            if warm_first:
                with Client(pki, px.port) as first:
                    warm(first)
            a = Client(pki, px.port)
            send_until_upstream_has_it(up, a, "/a")
            if reset:
                a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            a.sock.close()
            up.release.set()
            assert up.done.wait(WAIT)
            assert px.wait_connections_done(5.0)
            before_b = up.accepts
            with Client(pki, px.port) as b:
                assert b.get("/b")[1] == b"for /b"
            lines = [(line["path"], line["status"], line["bytes_out"]) for line in log_lines(px, where)]
            return [line for line in lines if line[0] != "/warm"], up.accepts - before_b  # 1: /a's was not reused

    later, first = run(True, tmp_path / "later"), run(False, tmp_path / "first")
    assert later == first


# -- timeouts around the callbacks ----------------------------------------------------------


def test_the_idle_timeout_does_not_cut_a_response_the_callbacks_await(pki, tmp_path, started):
    """idle (0.3 s) is the wait between requests, not for a response (upstream_response,
    2 s): an answer after 0.8 s is relayed; then the idle connection closes."""

    def script(conn, index, head):
        if target_of(head) == b"/late":
            time.sleep(0.8)  # (the delay under test)
        echo_target(conn, index, head)

    timeouts = Timeouts(idle=0.3, upstream_response=2.0)
    with ScriptedUpstream(script) as up, proxy(pki, tmp_path, up, timeouts=timeouts) as px, \
            Client(pki, px.port) as client:
        warm(client)
        head, body = client.get("/late")
        assert status(head) == 200 and body == b"for /late"
        assert started == [b"/late"]
        began = time.monotonic()
        assert client.closed()  # idle past 0.3 s: closed, nothing sent
        assert time.monotonic() - began < 3.0


@pytest.mark.parametrize("warm_first", [False, True], ids=["coroutine", "callbacks"])
def test_a_request_still_unanswered_when_the_shutdown_grace_ends(pki, tmp_path, shutdown_begun, warm_first):
    """The upstream never answers; the shutdown grace (0.3 s) ends first: the client's
    connection is closed, the request logged once, and nobody logs an internal error."""

    up = holding_upstream(b"/never", then_answer=False)
    with up:
        px = proxy(pki, tmp_path, up)
        try:
            if warm_first:
                with Client(pki, px.port) as first:
                    warm(first)
            with Client(pki, px.port) as client:
                send_until_upstream_has_it(up, client, "/never")
                began = time.monotonic()
                px.call(px.running.close(0.3), WAIT)
                assert recv_until_closed(client.sock) == b""
                assert time.monotonic() - began < 5.0
        finally:
            px.close()
    lines = [(line["path"], line["status"]) for line in log_lines_after_close(tmp_path) if line["path"] != "/warm"]
    assert lines == [("/never", 0)]


def test_a_response_relayed_with_a_pipelined_request_waiting_reaches_the_client_at_shutdown(
    pki, tmp_path, started, monkeypatch
):
    """/b arrives while /a's answer is awaited by the callbacks; when /a's answer is
    relayed, /b's bytes are in the client's channel and the connection's task is woken
    to read them. A shutdown that begins in that same loop iteration, before the task
    runs (as running.close()'s step queued before it does): /a's answer must still reach
    the client (it is logged 200), and /b, received before the shutdown began, is
    answered with Connection: close (README: busy connections, a request in flight or
    part of one received, end after their response)."""
    from proxy.server import connection

    original = connection._RequestLoop._wake
    shutdowns = []

    def wake(self, step):
        original(self, step)
        if step is connection._READ and self.down.channel._chunks and not shutdowns:
            shutdowns.append(self.idle)
            self.state.begin_shutdown()  # (what a SIGTERM handled in this iteration does)

    monkeypatch.setattr(connection._RequestLoop, "_wake", wake)

    up = holding_upstream(b"/a", then_answer=True)
    with up, proxy(pki, tmp_path, up) as px, Client(pki, px.port) as client:
        warm(client)
        send_until_upstream_has_it(up, client, "/a")
        client.send(request("/b"))
        wait_for(px, lambda state: any(t.down.channel._chunks for t in state.connections))
        up.release.set()
        data = recv_until_closed(client.sock)
        assert shutdowns, "the case under test did not arise"
        first = ok(b"for /a").lower()  # (h11 sends header names in lower case)
        assert data.lower().startswith(first), data  # /a was answered (logged 200): it must arrive
        rest = data[len(first):]
        assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"for /b"), rest
        assert b"connection: close" in rest.lower(), rest
        answered_b = [line["status"] for line in log_lines(px, tmp_path) if line["path"] == "/b"]
        assert answered_b == [200], answered_b


@pytest.mark.parametrize("warm_first", [False, True], ids=["coroutine", "callbacks"])
def test_a_response_relayed_just_before_shutdown_reaches_the_client(pki, tmp_path, monkeypatch, warm_first):
    """A response whose last bytes are queued for the end of the loop iteration (the
    channel's send coalescing) when the shutdown begins in that iteration: the
    connection is idle (no byte of a next request), so it is closed, but only after what
    was queued for it is sent: the request was answered (and logged 200)."""
    from proxy.server import connection

    original = connection._RequestLoop.next
    shutdowns = []

    def next_step(self):
        step = original(self)
        if step is connection._PARKED and self.down.channel._unsent and not shutdowns:
            shutdowns.append(self.idle)
            self.state.begin_shutdown()  # (what running.close() does if its step comes next)
        return step

    with ScriptedUpstream() as up, proxy(pki, tmp_path, up) as px:
        if warm_first:
            with Client(pki, px.port) as first:
                warm(first)
        monkeypatch.setattr(connection._RequestLoop, "next", next_step)
        with Client(pki, px.port) as client:
            client.send(request("/a"))
            data = recv_until_closed(client.sock)
        assert shutdowns, "the case under test did not arise"
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"for /a"), data
