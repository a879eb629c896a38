"""The admin listener: plain HTTP for probes, scrapers and clients that need the local CA.

::

    GET /          200 HTML status page          per ``status()`` (``proxy.ops.status_page``)
    GET /healthz   200 "ok"                      the process is alive (liveness probe)
    GET /readyz    200 "ready" | 503 "draining"  per ``ready()`` (readiness probe)
    GET /metrics   200 Prometheus text 0.0.4     ``metrics.render()`` (every worker's:
                                                 ``proxy.server.worker_stats``)
    GET /ca.pem    200 the local CA | 404        per ``ca_pem()`` (clients fetch what to trust)
    GET /ca.crt    200 it as DER | 404           (also /ca.der) what phones install
    GET /trust     200 HTML | 404                how to trust it on each platform (``trust_page``)

HEAD works wherever GET does; another method on a known path is 405 (with ``Allow``),
an unknown path 404, an unparseable request 400 (h11's hint, so 431 for a huge head).
``AdminRoutes`` decides the answer without I/O; the connection loop below only moves
bytes (asyncio streams + h11, keep-alive, like ``proxy.echo``) and keeps every
connection bounded: one deadline per request, small head and body limits, at most
``MAX_CONNECTIONS`` at once. Nothing a client sends can raise out of it.

It is plain HTTP on purpose (like Envoy's admin port): bind it to 127.0.0.1 or a
private interface, never to where untrusted clients reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import h11

from proxy.config.model import ListenAddress
from proxy.http.h11_engine import protocol_error_text
from proxy.server import trust_page
from proxy.server.metrics import CONTENT_TYPE

__all__ = ["AdminResponse", "AdminRoutes", "AdminServer", "start_admin"]

log = logging.getLogger("tlsproxy")

READ_SIZE = 16 * 1024
MAX_HEADER_BYTES = 16 * 1024  # probes and scrapers send a few hundred bytes
MAX_BODY_BYTES = 64 * 1024  # no admin request has a body; one is read and dropped, up to this
REQUEST_TIMEOUT = 60.0  # from the end of one response until the next one is sent, idle wait included
MAX_CONNECTIONS = 64
ALLOWED_METHODS = (b"GET", b"HEAD")
TEXT = b"text/plain; charset=utf-8"
HTML = b"text/html; charset=utf-8"


class MetricsPage(Protocol):
    """What /metrics shows: a ``Registry`` or a ``ProxyMetrics``."""

    def render(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class AdminResponse:
    status: int
    body: bytes
    content_type: bytes = TEXT
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def text(cls, status: int, text: str, *headers: tuple[bytes, bytes]) -> AdminResponse:
        return cls(status, text.encode("utf-8", "replace"), TEXT, headers)


class AdminRoutes:
    """What each admin path answers. Callables are read per request, so a reload (a new
    CA, draining) shows up at once; one that raises becomes a 500, not a dead listener."""

    def __init__(
        self,
        *,
        metrics: MetricsPage,
        ready: Callable[[], bool],
        ca_pem: Callable[[], bytes | None],
        status: Callable[[], bytes] | None = None,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._ca_pem = ca_pem
        self._handlers: dict[str, Callable[[], AdminResponse]] = {
            "/healthz": lambda: AdminResponse.text(200, "ok\n"),
            "/readyz": self._readyz,
            "/metrics": self._render_metrics,
            "/ca.pem": self._ca,
            "/ca.crt": self._ca_der,
            "/ca.der": self._ca_der,
            "/trust": self._trust_page,
        }
        if status is not None:
            self._handlers["/"] = lambda: AdminResponse(200, status(), HTML)

    def respond(self, method: bytes, target: bytes) -> AdminResponse:
        path = request_path(target)
        if path is None:
            return AdminResponse.text(400, "bad request target\n")
        handler = self._handlers.get(path)
        if handler is None:
            return AdminResponse.text(404, f"not found: {path}\nadmin paths: {' '.join(self._handlers)}\n")
        if method not in ALLOWED_METHODS:
            allow = b", ".join(ALLOWED_METHODS)
            return AdminResponse.text(405, f"{path} allows GET and HEAD only\n", (b"allow", allow))
        try:
            return handler()
        except Exception:
            log.exception("admin: %s failed", path)
            return AdminResponse.text(500, "internal error (see the proxy's log)\n")

    def _readyz(self) -> AdminResponse:
        return AdminResponse.text(200, "ready\n") if self._ready() else AdminResponse.text(503, "draining\n")

    def _render_metrics(self) -> AdminResponse:
        return AdminResponse(200, self._metrics.render(), CONTENT_TYPE.encode())

    def _ca(self) -> AdminResponse:
        pem = self._ca_pem()
        if pem is None:
            return AdminResponse.text(404, "no local CA is in use\n")
        return AdminResponse(200, pem, b"application/x-pem-file")

    def _ca_der(self) -> AdminResponse:
        return self._from_ca(lambda pem: AdminResponse(
            200, trust_page.ca_der(pem), trust_page.DER, ((b"content-disposition", trust_page.der_filename(pem)),)
        ))

    def _trust_page(self) -> AdminResponse:
        return self._from_ca(lambda pem: AdminResponse(200, trust_page.render_trust_page(pem), trust_page.HTML))

    def _from_ca(self, respond: Callable[[bytes], AdminResponse]) -> AdminResponse:
        pem = self._ca_pem()
        return AdminResponse.text(404, "no local CA is in use\n") if pem is None else respond(pem)


def request_path(target: bytes) -> str | None:
    """The path of an origin-form (``/x?q``) or absolute-form (``http://h/x``) target."""
    text = target.decode("latin-1")
    if text.startswith("/"):
        return text.partition("?")[0]
    if text.lower().startswith(("http://", "https://")):
        with contextlib.suppress(ValueError):
            return urlsplit(text).path or "/"
    return None


class AdminServer:
    """The listening admin server and its open connections.

    Like ``asyncio.Server`` (``sockets``, ``close()``, ``wait_closed()``, ``async with``),
    except that closing also ends keep-alive connections: on Python 3.11 the plain
    server leaves them open, and a scraper keeps one open for good.
    """

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def sockets(self) -> tuple:
        return self.server.sockets if self.server is not None else ()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): port 0 in the config is the real port here."""
        return self.sockets[0].getsockname()[:2]

    def close(self) -> None:
        """Stop listening and end every open connection."""
        if self.server is not None:
            self.server.close()
        for task in self._connections:
            task.cancel()

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()
        if self._connections:
            await asyncio.wait(set(self._connections))

    async def __aenter__(self) -> AdminServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's client_connected_cb: each connection in a task of our own, not the
        one asyncio.streams would make. ``close`` cancels them, and on Python 3.11 that
        one's done-callback asks a cancelled task for its exception: a CancelledError
        traceback in the log at every shutdown with a scraper connected."""
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self.handle(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection."""
        try:
            await _serve_connection(self.routes, reader, writer)
        finally:
            writer.close()


async def start_admin(
    listen: ListenAddress,
    *,
    metrics: MetricsPage,
    ready: Callable[[], bool],
    ca_pem: Callable[[], bytes | None],
    status: Callable[[], bytes] | None = None,
) -> AdminServer:
    """Listen on ``listen`` (port 0 = any free port) and answer admin requests.

    Raises OSError when the address cannot be bound (as the proxy's own listeners do).
    """
    admin = AdminServer(AdminRoutes(metrics=metrics, ready=ready, ca_pem=ca_pem, status=status))
    admin.server = await asyncio.start_server(admin.accept, listen.host, listen.port)
    return admin


# --- one connection ---------------------------------------------------------------------


async def _serve_connection(routes: AdminRoutes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    try:
        while True:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await _next_request(conn, reader)
                if request is None:
                    return
                head_only = request.method == b"HEAD"
                response = routes.respond(request.method, request.target)
                if conn.they_are_waiting_for_100_continue:
                    # The answer does not depend on a body: answer now, so the client
                    # need not send it, and close (it may send it anyway).
                    await _send(conn, writer, response, head_only=head_only, close=True)
                    return
                if not await _discard_body(conn, reader):
                    await _send(conn, writer, AdminResponse.text(413, "admin requests take no body\n"), close=True)
                    return
                await _send(conn, writer, response, head_only=head_only)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close, HTTP/1.0 without keep-alive
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        with contextlib.suppress(OSError, TimeoutError, h11.LocalProtocolError):
            async with asyncio.timeout(REQUEST_TIMEOUT):
                error = AdminResponse.text(exc.error_status_hint, f"bad request: {protocol_error_text(exc)}\n")
                await _send(conn, writer, error, close=True)
    except (OSError, TimeoutError, h11.LocalProtocolError):
        return


async def _next_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The next request head, or None when the client closed between requests."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed
            return None


async def _discard_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bool:
    """Read the request body to its end, keeping none; False once it passes MAX_BODY_BYTES."""
    seen = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Data):
            seen += len(event.data)
            if seen > MAX_BODY_BYTES:
                return False
        else:  # EndOfMessage (a close mid-body raises RemoteProtocolError)
            return True


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    response: AdminResponse,
    *,
    head_only: bool = False,
    close: bool = False,
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return  # a response is already under way: nothing more can be said
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
        *response.headers,
    ]
    if close:
        headers.append((b"connection", b"close"))
    writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)))
    if not head_only:
        writer.write(conn.send(h11.Data(data=response.body)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
