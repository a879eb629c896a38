"""Relay: forward one request upstream and stream the response back.

The request body goes upstream through a ``BodyPump`` (``proxy.server.body_pump``)
while this coroutine relays the response, because the upstream may answer before
reading the body (``100 Continue``, an early ``413``) and the client must then see that
answer. Backpressure either way: each side only reads the next chunk after the other
side's write buffer has drained below its high-water mark (``Channel.drain``).

Failures map to ``proxy.errors``: connect problems -> ``BadGateway`` (from the pool),
no response in time -> ``GatewayTimeout``, broken upstream -> ``BadGateway``, a failure
on the request side (the body pump) -> that failure. The caller answers them while no
response byte has gone out, and otherwise closes the client connection (an upstream
dying mid-response must not look like success).

Upgrade (WebSocket...): a request asking for one goes upstream with its Upgrade header;
if the upstream answers ``101``, the 101 is relayed and from then on both connections
are a byte tunnel (``proxy.server.tunnel``); the upstream connection is then closed,
never pooled.

Sending a request again (``may_send_again``): a pooled connection may have been closed
by the upstream just as the request went out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from proxy.config.model import Service, Timeouts
from proxy.errors import BadGateway, GatewayTimeout
from proxy.forwarding.headers import downstream_response_headers
from proxy.http.engine import Body, EndOfMessage, Headers, RequestHead, ResponseHead
from proxy.server.body_pump import BodyPump
from proxy.server.channel import ConnectionLost
from proxy.server.downstream import Downstream, reason_phrase
from proxy.server.tunnel import run_tunnel
from proxy.server.upstream_pool import UpstreamConnection, UpstreamPool
from proxy.tls.upstream_context import UpstreamTLS

log = logging.getLogger("tlsproxy")

SWITCHING_PROTOCOLS = 101

# Where a response's relay stands (``Relay.relay_events``, ``Relay.resume``).
SEND = "send"  # (the head is not written yet)
NEED_DATA = "need data"
DONE = "done"
NEED_DRAIN = "need drain"
FORWARD = "forward"
TUNNEL = "tunnel"
TIMED_OUT = "timed out"  # (nothing arrived within timeouts.upstream_response)
# A Content-Length body with at least this much (one receive's worth) still to come goes past
# the engines (``_forward_body``); a smaller rest is left to the usual events.
FORWARD_FROM = 64 * 1024

# RFC 9110 9.2.2 (idempotent methods), as SPEC section 4 lists them.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def may_send_again(method: bytes, *, reached_upstream: bool, body_events: int) -> bool:
    """Whether a request whose upstream connection failed without any response may be
    sent again on a fresh connection (once). The one place these rules live:

    - not written at all (the pooled connection was found closed when writing the
      head): nothing can have reached the upstream, so any request may go again;
    - written, possibly received (the upstream closed just after): only an idempotent
      method (GET, HEAD, OPTIONS, TRACE, PUT, DELETE), and only when no body byte was
      taken from the client (else it cannot be sent whole again). A POST gets 502, never
      a second copy — the upstream may have acted on the first.
    """
    if not reached_upstream:
        return True
    return method in IDEMPOTENT and body_events == 0


class _SendAgain(Exception):
    """This attempt failed in a way ``may_send_again`` allows to repeat; the message
    is the 502's should the repeat fail too."""


class Exchange:
    """What a relay holds, whichever protocol the upstream speaks (``Relay`` for
    HTTP/1.1, ``h2_relay.H2Relay`` for HTTP/2): the request, where it goes, and how it
    went — ``run(headers, target)`` returns the response status."""

    __slots__ = (
        "down", "head", "service", "pool", "timeouts", "max_body_bytes", "closing", "upstream_url", "status",
        "upstream_tls", "_pump", "_answered", "_responded",
    )

    def __init__(
        self,
        down: Downstream,
        head: RequestHead,
        service: Service,
        pool: object,
        timeouts: Timeouts,
        max_body_bytes: int = 0,
        closing: Callable[[], bool] = lambda: False,
        upstream_tls: UpstreamTLS | None = None,
    ) -> None:
        self.down = down
        self.head = head
        self.service = service
        self.pool = pool  # the pool for the upstream's protocol
        self.timeouts = timeouts
        self.max_body_bytes = max_body_bytes
        self.closing = closing  # True once shutting down: tell the client this is the last response
        self.upstream_tls = upstream_tls  # the service's context in this request's generation (https://)
        self.upstream_url: str | None = None
        self.status = 0
        self._pump = None  # the request body's way upstream, while it runs
        self._answered = False  # a response head (100 Continue included) went to the client
        self._responded = False  # a byte came from the upstream (no second attempt after that)


class Relay(Exchange):
    """One request's trip to an HTTP/1.1 upstream and back."""

    __slots__ = ()

    pool: UpstreamPool
    _pump: BodyPump | None

    async def run(self, headers: Headers, target: bytes, fields: bytes | None = None) -> int:
        """Send the request and relay the response; the response status. ``fields``:
        the client's header lines as they go upstream, ``headers`` then being only what
        the proxy adds after them (``forwarding.headers.as_received``). A pooled
        connection found closed may be replaced once (``may_send_again``)."""
        conn = self.pool.idle_for(self.service, self.upstream_tls) or await self.pool.acquire(
            self.service, tls=self.upstream_tls
        )
        return await self.resume(conn, headers, target, fields, SEND)

    def start(self, headers: Headers, target: bytes, fields: bytes | None = None) -> UpstreamConnection | None:
        """``run``'s first half without a coroutine, for a request without a body: its
        head written on an idle pooled connection, which is returned; its response is
        then taken by ``relay_events`` as it arrives, and ``resume`` does whatever needs
        waiting for. None when no connection is idle (nothing was sent: ``run``)."""
        conn = self.pool.idle_for(self.service, self.upstream_tls)
        if conn is None:
            return None
        try:
            self._send_head(conn, headers, target, fields)
        except _SendAgain:  # (idle_for hands out open connections only: not expected)
            conn.abort()
            return None
        except BaseException:
            conn.abort()
            raise
        return conn

    async def resume(
        self, conn: UpstreamConnection, headers: Headers, target: bytes, fields: bytes | None, step: object
    ) -> int:
        """The request's trip on ``conn`` from ``step``: SEND (``run``: nothing written
        yet), or where ``relay_events`` (or the connection's deadline, TIMED_OUT) stopped
        for a request ``start`` sent. The response relayed, once more on a fresh
        connection when ``may_send_again`` allows; then the connection goes back to the
        pool or is closed; the response status."""
        pool, service, tls = self.pool, self.service, self.upstream_tls
        retried = False
        while True:
            try:
                if step is SEND:
                    self._send_head(conn, headers, target, fields)
                    step = None
                await self._relay_response(conn, step)
                break
            except _SendAgain as again:
                conn.abort()
                if self._pump is not None:
                    await self._stop_pump()
                if retried:  # at most once: now it is the upstream's failure
                    raise BadGateway(str(again)) from None
                retried = True
                step = SEND
                self._responded = False
                conn = await pool.acquire(service, fresh=True, tls=tls)
            except BaseException:
                conn.abort()
                if self._pump is not None:
                    await self._stop_pump()
                raise
        # A pump still running means the upstream answered before the body was read:
        # the engine then refuses reuse below, and the body bytes still queued for it
        # are for nobody (a close would wait for an upstream that may never read them).
        # A finished pump is just collected. Stopping it waits: a cancellation then (an
        # HTTP/2 stream reset, the client's connection ending) must not leave the
        # upstream connection open, in no pool and owned by nobody.
        if self._pump is not None:
            try:
                unsent_body = await self._stop_pump()
            except BaseException:
                conn.abort()
                raise
            if unsent_body:
                conn.abort()
                return self.status
        return self.finish(conn)

    def finish(self, conn: UpstreamConnection) -> int:
        """The response relayed whole (no body pump left): the connection back to the
        pool, or closed when the exchange leaves it unusable; the response status."""
        if conn.engine.start_next_cycle():
            self.pool.release(conn)
        else:
            conn.close()
        return self.status

    def _send_head(self, conn: UpstreamConnection, headers: Headers, target: bytes, fields: bytes | None) -> None:
        """Write the request head (and start the body pump); ``_SendAgain`` when the
        pooled connection was found closed before a byte of it was written."""
        self.upstream_url = conn.upstream.url
        head = self.head
        if fields is not None:  # (Host among them)
            head_bytes = conn.engine.send_head_as_received(head, fields, headers, target)
        else:
            if head.header(b"host") is None:  # HTTP/1.0 without Host: HTTP/1.1 upstream needs one
                headers = [*headers, (b"host", conn.authority)]
            head_bytes = conn.engine.send_head(head, headers, target)
        if not head.has_body:
            head_bytes += conn.engine.send_end()
        try:
            conn.channel.write(head_bytes)
        except ConnectionLost:  # found closed: nothing of this request was written
            if may_send_again(head.method, reached_upstream=False, body_events=0):
                raise _SendAgain(self._no_response(conn)) from None
            raise
        if head.has_body:
            self._pump = BodyPump(
                self.down, conn, limit=self.max_body_bytes,
                read_timeout=self.timeouts.request_header, drain_timeout=self.timeouts.idle,
                awaiting_continue=self._awaiting_continue,
            )

    async def _stop_pump(self) -> bool:
        """Stop the body pump; True when it had not sent the whole body."""
        pump = self._pump
        if pump is None:
            return False
        self._pump = None
        return await pump.stop()

    def _no_response(self, conn: UpstreamConnection) -> str:
        tls_failure = conn.tls_failure()  # a TLS 1.3 upstream refusing our certificate says so only now
        if tls_failure is not None:
            log.warning("service %r: upstream %s: TLS: %s", self.service.name, conn.upstream.url, tls_failure)
            return f"service {self.service.name!r}: upstream {conn.upstream.url}: TLS: {tls_failure}"
        return f"service {self.service.name!r}: upstream {conn.upstream.url} closed the connection without a response"

    def received(self, conn: UpstreamConnection, data: bytes) -> object:
        """Response bytes the upstream's receive callback took (``start``): relayed as far
        as they go (``relay_events``)."""
        self._responded = True
        conn.engine.feed(data)
        return self.relay_events(conn)

    def relay_events(self, conn: UpstreamConnection) -> object:
        """Pass on what the upstream's engine has parsed, as far as it goes without
        waiting; where it stopped: NEED_DATA, DONE (the response is whole), NEED_DRAIN
        (the client is above its high-water mark), FORWARD (a large Content-Length rest:
        ``_forward_body``) or TUNNEL (a 101 went out). The one place the response's
        events are handled, whether a coroutine or a receive callback called it."""
        engine = conn.engine
        down = self.down
        while True:
            try:
                event = engine.next_event()
            except BadGateway:
                if conn.failure is not None:  # the body pump failed first: that is the cause
                    raise conn.failure from None
                raise
            if event is None:
                return NEED_DATA
            kind = type(event)
            if kind is Body:
                if down.write_body(event.data):
                    return NEED_DRAIN
                if engine.unparsed_body() >= FORWARD_FROM:
                    return FORWARD
            elif kind is EndOfMessage:
                down.write_end()
                return DONE
            # a ResponseHead (the httptools engine's may be a LazyResponseHead); Closed
            # cannot come mid-response: the engine raises
            elif self._relay_head(event):
                return TUNNEL

    async def _relay_response(self, conn: UpstreamConnection, step: object | None) -> None:
        """Relay the response to its end from ``step``: where ``relay_events`` last
        stopped, or None to start with what the engine holds."""
        engine = conn.engine
        channel = conn.channel
        down = self.down
        while True:
            if step is None:
                step = self.relay_events(conn)
            if step is NEED_DATA:
                try:
                    data = await channel.read(self.timeouts.upstream_response)
                except TimeoutError:
                    raise self._no_response_in_time() from None
                if data:
                    self._responded = True
                else:
                    if conn.failure is not None:
                        raise conn.failure from None
                    if not self._responded:
                        pump = self._pump
                        if conn.reused and may_send_again(
                            self.head.method, reached_upstream=True, body_events=pump.events if pump else 0
                        ):
                            raise _SendAgain(self._no_response(conn))
                        raise BadGateway(self._no_response(conn))
                engine.feed(data)
            elif step is DONE:
                return
            elif step is NEED_DRAIN:
                await down.drain()
                if engine.unparsed_body() >= FORWARD_FROM:
                    await self._forward_body(conn)
            elif step is FORWARD:
                await self._forward_body(conn)
            elif step is TIMED_OUT:
                raise self._no_response_in_time()
            else:  # TUNNEL
                await self._stop_pump()  # a request with a body is not upgraded on its way
                try:
                    await run_tunnel(down, channel, down.engine.switched_data(), engine.switched_data(), self.timeouts.idle)
                finally:
                    conn.close()  # a tunnel never goes back to the pool
                return
            step = None

    def _no_response_in_time(self) -> GatewayTimeout:
        return GatewayTimeout(
            f"service {self.service.name!r}: upstream {self.upstream_url} did not respond "
            f"within {self.timeouts.upstream_response:g}s"
        )

    async def _forward_body(self, conn: UpstreamConnection) -> None:
        """The rest of a Content-Length body the client gets as it is: straight from the
        upstream's receives to the client (``Channel.forward``), past both engines."""
        down = self.down
        if type(down) is not Downstream or not conn.channel.quiet:
            # An HTTP/2 stream: its body is framed as DATA. Bytes received unread (they
            # came while the connection's task took over from its callbacks): the engine
            # takes them first, as events, and the next FORWARD step goes on from there.
            return
        engine = conn.engine
        count = engine.unparsed_body()
        if not down.engine.takes_body_as_is(count):
            return
        while count:
            moved, failure = await conn.channel.forward(down.channel, count, self.timeouts.upstream_response)
            engine.body_read_elsewhere(moved)
            down.engine.body_sent_as_is(moved)
            down.bytes_out += moved
            count -= moved
            if failure is not None:
                if isinstance(failure, TimeoutError):
                    raise self._no_response_in_time()
                raise failure
            if down.channel.writing_paused:
                await down.drain()
            elif moved == 0 or count and not conn.channel.quiet:
                return  # EOF, or bytes to parse after all: the engine says what they mean

    def _awaiting_continue(self) -> bool:
        """The client sent ``Expect: 100-continue`` and has had no answer yet, so its
        silence is the upstream's delay, not a stalled body."""
        return self.head.expect_continue and not self._answered

    def _relay_head(self, head: ResponseHead) -> bool:
        """Pass a response head on; True when it is a 101 that starts a tunnel."""
        switching = head.status == SWITCHING_PROTOCOLS
        if switching and not self.head.upgrade:
            raise BadGateway(f"service {self.service.name!r}: upstream switched protocols unasked")
        if head.status < 200 and not switching and self.head.http_version == b"1.0":
            return False  # HTTP/1.0 clients get no interim responses (RFC 9110 15.2)
        self._answered = True
        if head.raw and not self.closing():  # the engine found nothing to change in it
            self.status = head.status
            self.down.write_head(head)
            return False
        headers = downstream_response_headers(head.headers, upgrade=switching)
        if head.status >= 200 or switching:
            self.status = head.status
            if self.closing() and not switching:
                headers.append((b"connection", b"close"))
        self.down.write_head(ResponseHead(head.status, headers, head.reason or reason_phrase(head.status)))
        return switching
