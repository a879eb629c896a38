"""Test helpers for the proxy: a real upstream HTTP server and the proxy in a thread.

``TestUpstream`` is a threaded HTTP/1.1 server (h11 on blocking sockets, one thread per
connection) that counts accepted connections, so tests can prove keep-alive reuse
and that refused requests never reached it. Routes:

  /echo...             JSON: method, target, headers, body length + sha256 (reads any body)
  /download?size=N     N pattern bytes streamed (``&chunked=1``: chunked framing)
  /status/NNN          that status, no body (HEAD-safe; 1xx not allowed)
  /hang                no answer until the test ends (for upstream_response timeouts)
  /held                ``holding`` is set, then the /echo answer once the test calls ``let_go()``
  /upgrade             101 to whatever Upgrade asked, then echoes "echo:"+bytes (``?refuse``: 200)
  /close-delimited?size=N  N pattern bytes without length or chunks, then close
  /die                 promises 1 MiB, sends 1 KiB, closes (upstream dies mid-response)
  /early               413 without reading the body, then close
  /close-reused        on a connection's 2nd request: read it whole, close without answering

``RawUpstream`` is the bare part of it for tests that script an upstream's bytes
themselves: listener, accept loop, a thread per connection running ``_serve(conn)``.
``pattern(n)`` / ``pattern_sha256(n)`` give the download bytes without keeping them.
``tls_connect``, ``recv_head`` and ``recv_until_closed`` are the raw TLS client's steps.
``ProxyThread`` runs ``start_proxy`` on a uvloop loop in a background thread so the
sync clients (requests, curl, node) can talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, urlsplit

import h11

from proxy.config.model import (
    AccessLogSettings,
    CertificatePair,
    ListenAddress,
    ProxyConfig,
    Service,
    TLSSettings,
    Upstream,
)

CHUNK = 256 * 1024
_PATTERN = bytes(range(256)) * (CHUNK // 256)
WAIT = 20.0  # bound on every wait in the helpers


def pattern(size: int) -> Iterator[bytes]:
    """``size`` deterministic bytes in CHUNK pieces."""
    while size > 0:
        piece = _PATTERN[: min(size, CHUNK)]
        size -= len(piece)
        yield piece


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


def next_event(conn: socket.socket, http: h11.Connection):
    """The next h11 event of ``http``, receiving on ``conn`` as it needs."""
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(conn.recv(CHUNK))
            continue
        return event


def tls_connect(pki, port: int, cert=None, *, timeout: float = WAIT, rcvbuf: int = 0,
                sndbuf: int = 0) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:``port`` trusting the session CA (SNI localhost),
    presenting ``cert`` (a (cert, key) pair) if given; ``rcvbuf`` / ``sndbuf`` set the
    socket's kernel buffers before it connects."""
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    sock = socket.socket()
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        return context.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def recv_head(sock: socket.socket, data: bytes = b"") -> bytes:
    """Receive until ``data`` holds a whole HTTP head (through its blank line) or the
    peer closes; everything received (a head without its blank line: EOF came first)."""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    return data


def recv_until_closed(sock: socket.socket,
                      ends: tuple[type[BaseException], ...] = (ssl.SSLError, ConnectionResetError)) -> bytes:
    """Everything the peer sends until it closes; one of ``ends`` (a reset, a TLS
    error) ends it too, and what came counts."""
    chunks = []
    with contextlib.suppress(*ends):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


class RawUpstream:
    """A TCP upstream on 127.0.0.1 (port from the OS): accepts connections on a thread,
    counting them in ``accepts``, and serves each on a thread of its own with
    ``_serve(conn)``, which subclasses define (under a WAIT timeout; a socket error or
    an HTTP protocol error ends the connection, which is then closed). ``close()``
    (or leaving the ``with`` block) closes the listener and every connection.

    Nothing connects before the constructor returns (nobody knows the port), so a
    subclass may set its own fields after calling ``super().__init__()``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self.accepts = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        accept = threading.Thread(target=self._accept_loop, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def model(self) -> Upstream:
        return Upstream(self.url, self.host, self.port)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        for thread in self._threads:
            thread.join(WAIT)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepts += 1
                self._conns.append(conn)
            thread = threading.Thread(target=self._connection, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _connection(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(WAIT)  # may fail: close() can shut the socket before we run
            self._serve(conn)
        except (OSError, h11.ProtocolError):
            return
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


# The default answer of a ScriptedUpstream.
GENUINE = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ngenuine"
# A ScriptedUpstream answer ending in STALL sends nothing more (the proxy must give up).
STALL = object()


class ScriptedUpstream(RawUpstream):
    """A raw-socket HTTP/1.1 upstream: each request head (no body) on any connection gets
    ``answers[target]`` in one send, ``GENUINE`` for other targets. An answer is bytes,
    or a tuple of bytes ending, optionally, in None (close the connection after it) or
    STALL (send nothing more); ``accepts`` counts connections."""

    def __init__(self, answers: dict[bytes, bytes | tuple]) -> None:
        super().__init__()
        self.answers = answers

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            buf = recv_head(conn, buf)
            if b"\r\n\r\n" not in buf:
                return
            head, _, buf = buf.partition(b"\r\n\r\n")
            answer = self.answers.get(head.split(b" ", 2)[1], GENUINE)
            if isinstance(answer, bytes):
                answer = (answer,)
            conn.sendall(b"".join(piece for piece in answer if isinstance(piece, bytes)))
            if answer[-1] is None:
                return
            if answer[-1] is STALL:
                conn.recv(1)  # until the proxy gives up on us (or WAIT)
                return


class TestUpstream(RawUpstream):
    """A threaded HTTP/1.1 upstream on 127.0.0.1 (port from the OS)."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.closed_by_peer = 0  # connections the proxy closed (EOF between requests)
        self.download_bytes_sent = 0  # /download body bytes the proxy has taken so far
        self.requests: list[dict] = []
        self._changed = threading.Condition(self._lock)
        self._release = threading.Event()
        self.holding = threading.Event()  # a /held request is waiting for let_go()
        self._let_go = threading.Event()

    def close(self) -> None:
        self._release.set()
        self._let_go.set()
        super().close()

    def let_go(self) -> None:
        """Answer the /held requests."""
        self._let_go.set()

    def wait_closed_by_peer(self, count: int, timeout: float = WAIT) -> bool:
        """Wait until the proxy has closed ``count`` connections to us."""
        with self._changed:
            return self._changed.wait_for(lambda: self.closed_by_peer >= count, timeout)

    def _serve(self, conn: socket.socket) -> None:
        http = h11.Connection(h11.SERVER)
        served = 0
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                request = next_event(conn, http)
                if not isinstance(request, h11.Request):
                    if isinstance(request, h11.ConnectionClosed):
                        with self._changed:
                            self.closed_by_peer += 1
                            self._changed.notify_all()
                    return
                served += 1
                path = request.target.decode()
                if path.startswith("/close-reused") and served > 1:
                    self._read_body(conn, http)  # the whole request arrived: only then close
                    return
                self.requests.append(
                    {"method": request.method.decode(), "target": path,
                     "headers": [(k.decode(), v.decode("latin-1")) for k, v in request.headers]}
                )
                if not self._respond(conn, http, request):
                    return
                if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                    return
                http.start_next_cycle()
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _read_body(self, conn: socket.socket, http: h11.Connection) -> tuple[int, str]:
        if http.they_are_waiting_for_100_continue:
            conn.sendall(http.send(h11.InformationalResponse(status_code=100, headers=[])))
        digest = hashlib.sha256()
        size = 0
        while True:
            event = next_event(conn, http)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return size, digest.hexdigest()
            else:
                raise h11.RemoteProtocolError("body ended early")

    def _respond(self, conn: socket.socket, http: h11.Connection, request: h11.Request) -> bool:
        url = urlsplit(request.target.decode())
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        path = url.path
        send = conn.sendall
        if path == "/held":  # then answered like /echo
            self.holding.set()
            self._let_go.wait(WAIT)
        if path.startswith("/status/"):
            self._read_body(conn, http)
            status = int(path.rsplit("/", 1)[1])
            send(http.send(h11.Response(status_code=status, headers=[("content-length", "0")]
                                        if status not in (204, 304) else [])))
            send(http.send(h11.EndOfMessage()))
        elif path == "/download":
            self._read_body(conn, http)
            size = int(query.get("size", "0"))
            framing = [("transfer-encoding", "chunked")] if query.get("chunked") else [("content-length", str(size))]
            send(http.send(h11.Response(status_code=200, reason="OK", headers=framing)))
            if request.method != b"HEAD":
                for piece in pattern(size):
                    send(http.send(h11.Data(data=piece)))
                    self.download_bytes_sent += len(piece)
            send(http.send(h11.EndOfMessage()))
        elif path == "/close-delimited":  # HTTP/1.0 style: the body ends when the connection does
            self._read_body(conn, http)
            send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
            for piece in pattern(int(query.get("size", "0"))):
                send(piece)
            return False
        elif path == "/upgrade" and request.method == b"GET" and "refuse" not in query:
            self._read_body(conn, http)
            upgrade = dict(request.headers).get(b"upgrade", b"")
            send(http.send(h11.InformationalResponse(
                status_code=101, headers=[("upgrade", upgrade), ("connection", "upgrade")])))
            data, _closed = http.trailing_data
            while True:  # echo until the client closes
                if data:
                    send(b"echo:" + bytes(data))
                data = conn.recv(CHUNK)
                if not data:
                    return False
        elif path == "/hang":
            self._release.wait(WAIT)
            return False
        elif path == "/die":
            send(http.send(h11.Response(status_code=200, headers=[("content-length", str(1 << 20))])))
            send(http.send(h11.Data(data=b"x" * 1024)))
            return False
        elif path == "/early":
            body = b"too big\n"
            send(http.send(h11.Response(status_code=413, headers=[
                ("content-length", str(len(body))), ("connection", "close")])))
            send(http.send(h11.Data(data=body)))
            send(http.send(h11.EndOfMessage()))
            return False
        else:  # /echo and anything else
            size, sha = self._read_body(conn, http)
            body = json.dumps({
                "method": request.method.decode(),
                "target": request.target.decode(),
                "headers": [[k.decode(), v.decode("latin-1")] for k, v in request.headers],
                "body_bytes": size,
                "body_sha256": sha,
                "server_port": self.port,
            }).encode()
            # Spelled as most servers spell it (reason phrase, capitalised names): a head
            # the proxy needs not change is relayed as received (httptools engine).
            send(http.send(h11.Response(status_code=200, reason="OK", headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])))
            if request.method != b"HEAD":
                send(http.send(h11.Data(data=body)))
            send(http.send(h11.EndOfMessage()))
        return True


def proxy_config(pki, services: list[Service] | Service, tmp_path: Path, **overrides) -> ProxyConfig:
    """A ProxyConfig for tests: 127.0.0.1 port 0, the session PKI's server cert,
    the access log in ``tmp_path``."""
    cert, key = pki.server
    if isinstance(services, Service):
        services = [services]
    fields = {
        "services": tuple(services),
        "listen": (ListenAddress("127.0.0.1", 0),),
        "tls": TLSSettings(certificates=(CertificatePair(Path(cert), Path(key)),)),
        "access_log": AccessLogSettings(format="json", path=str(tmp_path / "access.log")),
    }
    fields.update(overrides)
    return ProxyConfig(**fields)


def service(name: str, *upstreams: RawUpstream | Upstream, **fields) -> Service:
    models = tuple(up.model() if isinstance(up, RawUpstream) else up for up in upstreams)
    return Service(name=name, upstreams=models, **fields)


async def _loop_turns(count: int) -> None:
    """Let the loop run ``count`` iterations: a transport closed or aborted just before
    (an upstream connection of a stream cancelled at shutdown) is only gone after one,
    and uvloop's ``loop.close()`` complains of any still there (ResourceWarning, an
    error under pytest's warnings-as-errors)."""
    for _ in range(count):
        await asyncio.sleep(0)


class ProxyThread:
    """``start_proxy(config)`` on a uvloop event loop in a background thread."""

    def __init__(self, config: ProxyConfig, **options) -> None:
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        from proxy.server import start_proxy

        try:
            self.running = self.call(start_proxy(config, **options))
        except BaseException:
            self._stop_loop()
            raise
        self.port = self.running.addresses[0][1]

    def call(self, coroutine, timeout: float = WAIT):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def wait_connections_done(self, timeout: float = WAIT) -> bool:
        """Wait until every client connection the proxy has open now has ended."""

        async def wait() -> bool:
            tasks = set(self.running.connection_tasks)
            if not tasks:
                return True
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            return not pending

        return self.call(wait(), timeout + 5)

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"

    def close(self, grace: float = 5.0) -> None:
        try:
            self.call(self.running.close(grace), WAIT + grace)
            self.call(_loop_turns(3))  # transports closed in close()'s last steps finish closing
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()

    def __enter__(self) -> ProxyThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogWaiter(logging.Handler):
    """Collects the proxy's log lines (any thread); ``seen`` is set once a line
    containing ``text`` arrives."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if self.text in message:
            self.seen.set()


@contextlib.contextmanager
def proxy_log_waiter(text: str) -> Iterator[LogWaiter]:
    """A LogWaiter on the "tlsproxy" logger (at INFO) for the duration of the block."""
    logger = logging.getLogger("tlsproxy")
    handler = LogWaiter(text)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
