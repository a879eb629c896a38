"""HTTP/2 upstreams (``h2c://``, ``https://`` with ``http2: true``): pooled connections
that each carry many requests at once.

``H2UpstreamPool.open_stream`` finds, per upstream (round-robin over the service's,
skipping ones that refuse connections, as ``UpstreamPool`` does), a connection with
room under the upstream's SETTINGS_MAX_CONCURRENT_STREAMS, or opens one, and starts a
request on it. A connection is read by one task, which hands each stream its events.
A GOAWAY from the upstream retires the connection: no new streams on it; the streams
it names as processed go on, the later ones fail as "refused" — never processed, so
the relay may send them again (``UpstreamStream.refused``); it closes when its last
stream ends. A broken connection fails all its streams (502, or a reset for a
response already under way).

Flow control both ways: a response DATA piece is acknowledged to the upstream only
when the relay takes it (so a slow client slows its upstream stream, not the
connection), and request DATA is sent only within the upstream's windows
(``send_body`` waits).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from proxy.config.model import Service, Upstream
from proxy.errors import BadGateway, ConnectionFailed, HTTPError
from proxy.http.engine import Body, EndOfMessage, Headers, ResponseHead
from proxy.http.h2.codec import (
    CANCEL,
    ClientCodec,
    InformationalReceived,
    PeerClosing,
    ResponseOpened,
    SettingsReceived,
    StreamData,
    StreamEnded,
    StreamReset,
    StreamTrailers,
    WindowOpened,
    error_name,
)
from proxy.http.h2.messages import response_head, trailer_fields
from proxy.server.channel import Channel, ConnectionLost
from proxy.server.upstream_pool import RoundRobin, connect_failure
from proxy.tls.upstream_context import UpstreamTLS

log = logging.getLogger("tlsproxy")

STREAM_WINDOW = 256 * 1024  # response data an upstream may send on a stream before it is taken
CONNECTION_WINDOW = 4 * 1024 * 1024  # ... on all the streams of one connection
HEADER_LIST_LIMIT = 256 * 1024


class UpstreamStream:
    """One request on an HTTP/2 upstream connection, as the relay drives it."""

    __slots__ = (
        "connection", "stream_id", "refused", "reset_code", "ended", "head_ended", "failure",
        "_events", "_waiter", "_window_waiter", "_flow",
    )

    def __init__(self, connection: UpstreamH2Connection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.refused = False  # the upstream's GOAWAY says it never processed this stream
        self.reset_code: int | None = None  # RST_STREAM from the upstream
        self.ended = False  # the response is complete
        self.head_ended = False  # ... with its header block (a gRPC Trailers-Only response)
        self.failure: BaseException | None = None  # why the request side failed (the body pump)
        self._events: deque = deque()  # ResponseHead / Body / EndOfMessage, in order
        self._flow: deque[int] = deque()  # flow-controlled length of each queued Body
        self._waiter: asyncio.Future | None = None
        self._window_waiter: asyncio.Future | None = None

    # -- from the connection's reader ------------------------------------------------

    def deliver(self, event: object, flow_length: int = 0) -> None:
        self._events.append(event)
        if type(event) is Body:
            self._flow.append(flow_length)
        self._wake()

    def fail(self, failure: BaseException) -> None:
        if self.failure is None:
            self.failure = failure
        self._wake()
        self.window_opened()

    def window_opened(self) -> None:
        waiter = self._window_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- for the relay ---------------------------------------------------------------

    async def next_event(self, timeout: float) -> ResponseHead | Body | EndOfMessage:
        """The next response event; the failure (BadGateway, a reset) when there is one;
        TimeoutError after ``timeout`` without any."""
        events = self._events
        while not events:
            if self.failure is not None:
                raise self.failure
            waiter = self._waiter = self.connection.loop.create_future()
            try:
                async with asyncio.timeout(timeout or None):
                    await waiter
            finally:
                self._waiter = None
        event = events.popleft()
        if type(event) is Body:
            self.connection.ack(self.stream_id, self._flow.popleft())
        return event

    async def send_body(self, data: bytes, timeout: float) -> None:
        """Send a piece of request body within the upstream's windows."""
        connection = self.connection
        view = memoryview(data)
        while view:
            if self.failure is not None:
                raise ConnectionLost(str(self.failure))
            window = connection.codec.window(self.stream_id)
            if window <= 0 or connection.channel.writing_paused:
                waiter = self._window_waiter = connection.loop.create_future()
                if connection.channel.writing_paused:
                    connection.wait_writable(self)
                try:
                    async with asyncio.timeout(timeout or None):
                        await waiter
                finally:
                    self._window_waiter = None
                continue
            size = min(window, connection.codec.max_frame, len(view))
            connection.codec.send_data(self.stream_id, bytes(view[:size]))
            connection.flush()
            view = view[size:]

    def end(self, trailers: Headers | None = None) -> None:
        """The request is complete (with trailers, when the client sent some)."""
        if self.failure is not None:
            raise ConnectionLost(str(self.failure))
        codec = self.connection.codec
        if trailers:
            codec.send_headers(self.stream_id, trailers, end=True)
        else:
            codec.send_data(self.stream_id, b"", end=True)
        self.connection.flush()

    def cancel(self, code: int = CANCEL) -> None:
        """The client went away or the exchange failed: the upstream stops work on it."""
        if not self.ended and self.reset_code is None:
            self.connection.codec.reset(self.stream_id, code)
            self.reset_code = code
            self.connection.stream_done(self)
            try:
                self.connection.flush()
            except ConnectionLost:
                pass

    def finished(self) -> None:
        """The exchange is over (response complete): forget the stream."""
        self.connection.stream_done(self)


class UpstreamH2Connection:
    """One HTTP/2 connection to an upstream and the streams it carries."""

    __slots__ = (
        "upstream", "channel", "codec", "loop", "streams", "retired", "service", "key",
        "reader", "settled", "idle_timeout", "_on_closed", "_writer", "_waiting_write", "_idle_timer",
    )

    def __init__(
        self, upstream: Upstream, channel: Channel, service: str, on_closed: Callable, key: str,
        idle_timeout: float = 0.0,
    ) -> None:
        self.upstream = upstream
        # Closed after this long without a stream (timeouts.idle), as the HTTP/1.1 pool does:
        # connections of an older generation's TLS context are not used again, and an
        # upstream should not keep connections for a proxy that no longer needs them.
        self.idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self.key = key  # the pool's: the upstream, and the TLS context it was made with
        self.channel = channel
        self.service = service
        self.loop = channel.loop
        self.codec = ClientCodec(
            header_list_limit=HEADER_LIST_LIMIT, stream_window=STREAM_WINDOW, connection_window=CONNECTION_WINDOW
        )
        self.streams: dict[int, UpstreamStream] = {}
        self.retired = False  # GOAWAY or broken: no new streams
        self._on_closed = on_closed
        self._writer: asyncio.Task | None = None
        self._waiting_write: set[UpstreamStream] = set()
        # Set when the upstream's SETTINGS arrive: until then its stream limit is unknown.
        self.settled: asyncio.Future = self.loop.create_future()
        self.flush()  # the preface and our SETTINGS
        self.reader = self.loop.create_task(self._read())  # ends when the connection does

    @property
    def has_room(self) -> bool:
        return not self.retired and not self.channel.closed and self.codec.room > 0

    def open(self, fields: Headers, *, end: bool) -> UpstreamStream:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        stream_id = self.codec.next_stream_id()
        stream = UpstreamStream(self, stream_id)
        self.streams[stream_id] = stream
        self.codec.send_headers(stream_id, fields, end=end)
        self.flush()
        return stream

    def flush(self) -> None:
        data = self.codec.bytes_to_send()
        if data:
            self.channel.write(data)

    def ack(self, stream_id: int, flow_length: int) -> None:
        self.codec.ack(stream_id, flow_length)
        try:
            self.flush()
        except ConnectionLost:
            pass

    def stream_done(self, stream: UpstreamStream) -> None:
        self.streams.pop(stream.stream_id, None)
        if self.streams:
            return
        if self.retired:
            self.channel.close()
        elif self.idle_timeout > 0 and self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.streams:
            self.close()

    def wait_writable(self, stream: UpstreamStream) -> None:
        self._waiting_write.add(stream)
        if self._writer is None:
            self._writer = self.loop.create_task(self._wait_writable())

    async def _wait_writable(self) -> None:
        try:
            await self.channel.drain()
        except ConnectionError:
            pass
        finally:
            self._writer = None
            waiting, self._waiting_write = self._waiting_write, set()
            for stream in waiting:
                stream.window_opened()

    def close(self) -> None:
        self.retired = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.channel.close()

    async def _read(self) -> None:
        reason = "closed the connection"
        try:
            while True:
                data = await self.channel.read()
                if not data:
                    break
                try:
                    events = self.codec.feed(data)
                except ConnectionFailed as exc:
                    reason = f"broke HTTP/2: {exc}"
                    self.flush()
                    break
                for event in events:
                    self._dispatch(event)
                self.flush()
        except (ConnectionError, OSError) as exc:
            reason = f"connection failed ({exc})"
        finally:
            self.retired = True
            if not self.settled.done():
                self.settled.set_exception(ConnectionError(reason))
                self.settled.exception()
            failure = BadGateway(f"service {self.service!r}: upstream {self.upstream.url} {reason}")
            for stream in list(self.streams.values()):
                stream.fail(failure)
            self.streams.clear()
            self.channel.abort()
            self._on_closed(self)

    def _dispatch(self, event: object) -> None:
        kind = type(event)
        stream = self.streams.get(getattr(event, "stream_id", 0))
        if kind is StreamData:
            if stream is None:
                self.codec.ack(event.stream_id, event.flow_length)  # cancelled meanwhile
            else:
                stream.deliver(Body(event.data), event.flow_length)
        elif kind is ResponseOpened:
            if stream is not None:
                try:
                    stream.deliver(response_head(event.fields, self.service))
                except HTTPError as exc:
                    stream.fail(exc)
                    stream.cancel()
                    return
                if event.ended:  # Trailers-Only (gRPC): the head is the whole response
                    stream.head_ended = stream.ended = True
        elif kind is InformationalReceived:
            if stream is not None:
                try:
                    stream.deliver(response_head(event.fields, self.service))
                except HTTPError:
                    pass  # an interim response is only a hint
        elif kind is StreamTrailers:
            if stream is not None:
                try:
                    stream.deliver(EndOfMessage(trailer_fields(event.fields, self.service)))
                except HTTPError as exc:
                    stream.fail(exc)
                    return
                stream.ended = True
        elif kind is StreamEnded:
            if stream is not None and not stream.ended:
                stream.ended = True
                stream.deliver(EndOfMessage())
        elif kind is StreamReset:
            if stream is not None:
                stream.reset_code = event.code
                self.streams.pop(event.stream_id, None)
                stream.fail(UpstreamReset(
                    f"service {self.service!r}: upstream {self.upstream.url} reset the stream "
                    f"({error_name(event.code)})", code=event.code,
                ))
        elif kind is SettingsReceived:
            if not self.settled.done():
                self.settled.set_result(None)
        elif kind is WindowOpened:
            if event.stream_id == 0:
                for each in self.streams.values():
                    each.window_opened()
            elif stream is not None:
                stream.window_opened()
        elif kind is PeerClosing:
            self.retired = True
            for stream_id, each in list(self.streams.items()):
                if stream_id > event.last_stream_id:  # never processed: may be sent again
                    each.refused = True
                    self.streams.pop(stream_id)
                    each.fail(BadGateway(
                        f"service {self.service!r}: upstream {self.upstream.url} refused the request (GOAWAY)"
                    ))
            if not self.streams:
                self.channel.close()


class UpstreamReset(BadGateway):
    """The upstream reset the stream; ``code`` is passed on to an HTTP/2 client."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


Connect = Callable[[Upstream, "UpstreamTLS | None"], Awaitable[Channel]]


class H2UpstreamPool:
    """HTTP/2 connections per upstream; ``open_stream`` starts a request on one."""

    def __init__(self, connect: Connect, *, connect_timeout: float, idle_timeout: float = 0.0) -> None:
        self._connect = connect  # a connected Channel to the upstream (TCP, or TLS with ALPN h2)
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout  # a connection without streams this long is closed
        self._connections: dict[str, list[UpstreamH2Connection]] = {}
        self.order = RoundRobin().order  # (as the HTTP/1.1 pool: upstream_pool.RoundRobin)
        # A connection being opened, per key: requests arriving meanwhile wait for it
        # rather than each opening its own (HTTP/2's point is one connection).
        self._opening: dict[str, asyncio.Future] = {}

    def configure(self, *, connect_timeout: float, idle_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout

    async def open_stream(
        self, service: Service, fields: Headers, *, end: bool, tls: UpstreamTLS | None = None
    ) -> UpstreamStream:
        """A new stream on a connection to one of the service's upstreams (BadGateway
        naming the service when none accepts a connection); ``tls``: the service's
        context in the request's generation (https:// upstreams, ALPN h2)."""
        failures = []
        for upstream in self.order(service):
            key = upstream.url if tls is None else tls.pool_key(upstream)
            connection = self._with_room(key)
            opening = self._opening.get(key)
            if connection is None and opening is not None:
                try:
                    await asyncio.shield(opening)
                except Exception:  # noqa: BLE001 - its opener reports why
                    pass
                connection = self._with_room(key)
            if connection is None:
                try:
                    connection = await self._opened(upstream, key, service.name, tls)
                except (OSError, TimeoutError) as exc:
                    failures.append(connect_failure(exc, service, upstream, tls, self._connect_timeout))
                    continue
                except HTTPError as exc:
                    failures.append(str(exc))
                    continue
            return connection.open(fields, end=end)
        raise BadGateway(f"service {service.name!r}: " + "; ".join(failures))

    def _with_room(self, key: str) -> UpstreamH2Connection | None:
        for connection in self._connections.get(key, ()):
            if connection.has_room:
                return connection
        return None

    async def _opened(
        self, upstream: Upstream, key: str, service: str, tls: UpstreamTLS | None
    ) -> UpstreamH2Connection:
        """A new connection, announced to requests arriving while it is being opened."""
        opening = self._opening[key] = asyncio.get_running_loop().create_future()
        try:
            connection = await self._new_connection(upstream, key, service, tls)
        except BaseException as exc:
            opening.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            opening.exception()  # (retrieved: the waiters only wanted to know it ended)
            raise
        finally:
            if self._opening.get(key) is opening:
                del self._opening[key]
        opening.set_result(connection)
        return connection

    async def _new_connection(
        self, upstream: Upstream, key: str, service: str, tls: UpstreamTLS | None
    ) -> UpstreamH2Connection:
        async with asyncio.timeout(self._connect_timeout or None):
            channel = await self._connect(upstream, tls)
        if tls is not None:
            protocol = channel.transport.get_extra_info("ssl_object").selected_alpn_protocol()
            if protocol != "h2":
                channel.abort()
                raise BadGateway(
                    f"upstream {upstream.url} did not choose HTTP/2 by ALPN ({protocol or 'no ALPN'}), and "
                    "upstream_tls.http2 is true: turn it off for an HTTP/1.1 upstream"
                )
        connection = UpstreamH2Connection(upstream, channel, service, self._closed, key, self._idle_timeout)
        try:  # its limits first (within what is left of upstream_connect)
            await asyncio.wait_for(asyncio.shield(connection.settled), self._connect_timeout or None)
        except ConnectionError as exc:
            raise BadGateway(f"upstream {upstream.url} closed the connection before its HTTP/2 SETTINGS ({exc})")
        except BaseException:
            connection.close()
            raise
        self._connections.setdefault(key, []).append(connection)
        return connection

    def _closed(self, connection: UpstreamH2Connection) -> None:
        connections = self._connections.get(connection.key)
        if connections and connection in connections:
            connections.remove(connection)

    async def close_and_wait(self, timeout: float) -> None:
        """Close every connection (TLS: with its close_notify), wait up to ``timeout``
        for them to be gone, then drop the rest (shutdown)."""
        connections = [each for group in self._connections.values() for each in group]
        self._connections.clear()
        for connection in connections:
            connection.close()
        readers = [connection.reader for connection in connections if not connection.reader.done()]
        if readers:
            await asyncio.wait(readers, timeout=timeout)
        for connection in connections:
            connection.channel.abort()
