"""Relay: forward one request upstream and stream the response back.

The request body is pumped by a task of its own while this coroutine relays the
response, because the upstream may answer before reading the body (``100 Continue``,
an early ``413``) and the client must then see that answer. Backpressure either way:
each side only reads the next chunk after the other side's write buffer has drained
below its high-water mark (``Channel.drain``).

Failures map to ``proxy.errors``: connect problems -> ``BadGateway`` (from the pool),
no response in time -> ``GatewayTimeout``, broken upstream -> ``BadGateway``. The caller
answers them while no response byte has gone out, and otherwise closes the client
connection (an upstream dying mid-response must not look like success).

Upgrade (WebSocket...): a request asking for one goes upstream with its Upgrade header;
if the upstream answers ``101``, the 101 is relayed and from then on both connections
are a byte tunnel (``_tunnel``) until either side closes; the upstream connection is
then closed, never pooled.

Retry: a pooled connection may have been closed by the upstream just as the request
went out. Then — and only when the upstream sent nothing at all and no part of the
request body has been consumed (so the request can be sent again whole) — the request
is re-sent once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from proxy.config.model import Service, Timeouts
from proxy.errors import BadGateway, GatewayTimeout, PayloadTooLarge
from proxy.http.engine import Body, Headers, RequestHead, ResponseHead
from proxy.forwarding.headers import downstream_response_headers
from proxy.server.channel import Channel, ConnectionLost
from proxy.server.downstream import Downstream, reason_phrase
from proxy.server.upstream_pool import UpstreamConnection, UpstreamPool

SWITCHING_PROTOCOLS = 101


class _RetryOnFreshConnection(Exception):
    """The pooled connection was dead before the upstream saw the request."""


class Relay:
    """One request's trip upstream and back; ``run`` returns the response status."""

    __slots__ = (
        "down", "head", "service", "pool", "timeouts", "max_body_bytes", "closing", "upstream_url", "status",
        "_body_events", "_upstream_responded", "_pump",
    )

    def __init__(
        self,
        down: Downstream,
        head: RequestHead,
        service: Service,
        pool: UpstreamPool,
        timeouts: Timeouts,
        *,
        max_body_bytes: int = 0,
        closing: Callable[[], bool] = lambda: False,
    ) -> None:
        self.down = down
        self.head = head
        self.service = service
        self.pool = pool
        self.timeouts = timeouts
        self.max_body_bytes = max_body_bytes
        self.closing = closing  # True once shutting down: tell the client this is the last response
        self.upstream_url: str | None = None
        self.status = 0
        self._body_events = 0  # request-body events consumed from the client
        self._upstream_responded = False
        self._pump: asyncio.Task | None = None

    async def run(self, headers: Headers, target: bytes) -> int:
        conn = await self.pool.acquire(self.service)
        try:
            return await self._exchange(conn, headers, target)
        except _RetryOnFreshConnection:
            conn = await self.pool.acquire(self.service, fresh=True)
            return await self._exchange(conn, headers, target)

    async def _exchange(self, conn: UpstreamConnection, headers: Headers, target: bytes) -> int:
        self.upstream_url = conn.upstream.url
        retry_allowed = conn.reused
        if self.head.header(b"host") is None:  # HTTP/1.0 without Host: HTTP/1.1 upstream needs one
            headers = [*headers, (b"host", conn.authority)]
        try:
            head_bytes = conn.engine.send_head(self.head, headers, target)
            if not self.head.has_body:
                head_bytes += conn.engine.send_end()
            try:
                conn.channel.write(head_bytes)
            except ConnectionLost:
                raise _RetryOnFreshConnection() from None
            if self.head.has_body:
                self._pump = asyncio.create_task(self._pump_body(conn))
            await self._relay_response(conn, retry_allowed)
        except BaseException:
            conn.abort()
            await self._stop_pump()
            raise
        # A pump still running means the upstream answered before the body was read:
        # the engine then refuses reuse below. A finished one is just collected.
        if self._pump is not None:
            await self._stop_pump()
        if conn.engine.start_next_cycle():
            self.pool.release(conn)
        else:
            conn.close()
        return self.status

    async def _stop_pump(self) -> None:
        pump = self._pump
        self._pump = None
        if pump is None:
            return
        if not pump.done():
            pump.cancel()
        with contextlib.suppress(BaseException):
            await pump  # also marks a failure as retrieved

    def _raise_pump_failure(self) -> None:
        """If the request-body pump failed, that failure is the real cause."""
        pump = self._pump
        if pump is not None and pump.done() and not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()

    async def _relay_response(self, conn: UpstreamConnection, retry_allowed: bool) -> None:
        engine = conn.engine
        channel = conn.channel
        down = self.down
        read_timeout = self.timeouts.upstream_response
        while True:
            try:
                event = engine.next_event()
            except BadGateway:
                self._raise_pump_failure()
                raise
            if event is None:
                try:
                    data = await channel.read(read_timeout)
                except TimeoutError:
                    raise GatewayTimeout(
                        f"service {self.service.name!r}: upstream {conn.upstream.url} did not respond "
                        f"within {self.timeouts.upstream_response:g}s"
                    ) from None
                if data:
                    self._upstream_responded = True
                else:
                    self._raise_pump_failure()
                    if not self._upstream_responded:
                        if retry_allowed and self._body_events == 0:
                            raise _RetryOnFreshConnection()
                        raise BadGateway(
                            f"service {self.service.name!r}: upstream {conn.upstream.url} "
                            "closed the connection without a response"
                        )
                engine.feed(data)
                continue
            kind = type(event)
            if kind is Body:
                if down.write_body(event.data):
                    await down.drain()
            elif kind is ResponseHead:
                if self._relay_head(event):
                    await self._tunnel(conn)
                    return
            else:  # EndOfMessage (Closed cannot come mid-response: the engine raises)
                down.write_end()
                return

    def _relay_head(self, head: ResponseHead) -> bool:
        """Pass a response head on; True when it is a 101 that starts a tunnel."""
        switching = head.status == SWITCHING_PROTOCOLS
        if switching and not self.head.upgrade:
            raise BadGateway(f"service {self.service.name!r}: upstream switched protocols unasked")
        if head.status < 200 and not switching and self.head.http_version == b"1.0":
            return False  # HTTP/1.0 clients get no interim responses (RFC 9110 15.2)
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

    async def _tunnel(self, conn: UpstreamConnection) -> None:
        """After a 101: bytes both ways, unparsed, until either side closes or the
        connection is idle for ``timeouts.idle`` (WebSocket, or any Upgrade)."""
        down = self.down
        client, upstream = down.channel, conn.channel
        early_upstream = conn.engine.switched_data()
        early_client = down.engine.switched_data()
        if early_upstream:
            client.write(early_upstream)
        if early_client:
            upstream.write(early_client)
        down.bytes_out += len(early_upstream)
        down.bytes_in += len(early_client)
        to_upstream = asyncio.create_task(self._pipe(client, upstream, "bytes_in"))
        to_client = asyncio.create_task(self._pipe(upstream, client, "bytes_out"))
        try:
            await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, return_exceptions=True)
            conn.close()  # a tunnel never goes back to the pool

    async def _pipe(self, source: Channel, sink: Channel, counter: str) -> None:
        timeout = self.timeouts.idle
        down = self.down
        while data := await source.read(timeout):
            setattr(down, counter, getattr(down, counter) + len(data))
            sink.write(data)
            await sink.drain(timeout)

    async def _pump_body(self, conn: UpstreamConnection) -> None:
        """Client body -> upstream, one chunk at a time, waiting for the upstream to drain."""
        down = self.down
        engine = conn.engine
        channel = conn.channel
        limit = self.max_body_bytes
        timeout = self.timeouts.idle
        try:
            while True:
                event = await down.next_body_event(timeout)
                self._body_events += 1
                if type(event) is not Body:
                    channel.write(engine.send_end())
                    return
                down.bytes_in += len(event.data)
                if limit and down.bytes_in > limit:
                    raise PayloadTooLarge(f"request body larger than {limit} bytes")
                channel.writelines(engine.send_body(event.data))
                await channel.drain(timeout)
        except ConnectionLost:
            return  # the upstream closed; its response (if any) is still relayed
        except Exception:
            conn.abort()  # the request cannot complete: stop waiting for the response
            raise
