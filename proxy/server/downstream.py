"""Downstream: the client's side of one connection (a Channel plus a ServerEngine).

Reads request heads under the idle / request-header timeouts, writes responses with
backpressure, and answers errors in the one plain format every failure uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus

from proxy.http.engine import Body, EndOfMessage, Headers, RequestHead, ResponseHead, ServerEngine
from proxy.server.channel import Channel
from proxy.tls.authz import Decision
from proxy.tls.identity import ClientIdentity


MORE = object()  # Downstream.poll_head: the head is not all here yet


@dataclass(slots=True)
class ClientInfo:
    """What the connection knows about its client, for headers and the access log."""

    ip: str
    port: int
    server_port: int
    scheme: bytes = b"https"  # as the client reached us: X-Forwarded-Proto, Forwarded proto=
    tls_version: str | None = None
    sni: str | None = None
    ssl_object: object | None = None
    identity: ClientIdentity | None = None  # verified client certificate, once per connection
    # Cached per config generation (``proxy.server.generation``): valid only while
    # ``generation`` is the one a request reads; a reload makes them stale by construction.
    generation: object | None = None
    trusted_identity: ClientIdentity | None = None  # ``identity`` if that generation accepts it
    identity_headers: tuple[tuple[bytes, bytes], ...] = ()  # rendered in its forward mode
    decisions: dict[str, Decision] = field(default_factory=dict)  # service name -> admitted?
    address: str = field(init=False)  # "ip:port", "[v6]:port": once, every access-log line has it

    def __post_init__(self) -> None:
        self.address = f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


class Downstream:
    """The client connection as the relay sees it."""

    __slots__ = ("channel", "engine", "info", "bytes_in", "bytes_out", "method", "write_timeout")

    protocol = "HTTP/1.1"  # (the access log says HTTP/1.0 for such requests: see request._record)
    grpc = False  # gRPC calls come over HTTP/2 (h2_stream.StreamDownstream)

    def __init__(self, channel: Channel, engine: ServerEngine, info: ClientInfo, write_timeout: float = 0) -> None:
        self.channel = channel
        self.write_timeout = write_timeout  # how long a client may stop reading our response
        self.engine = engine
        self.info = info
        self.bytes_in = 0  # request body bytes of the current request
        self.bytes_out = 0  # response body bytes of the current request
        self.method = b""  # of the current request (a HEAD response has no body)

    async def read_head(self, first_byte_timeout: float, header_timeout: float) -> RequestHead | None:
        """The next request head, or None when the client closed or went quiet.

        ``first_byte_timeout`` bounds the wait for a new request to begin (idle
        keep-alive); once bytes arrive, ``header_timeout`` bounds the rest of the head.
        Raises BadRequest / HeadersTooLarge from the engine."""
        channel = self.channel
        deadline = 0.0
        try:
            while True:
                head = self.poll_head()
                if head is not MORE:
                    return head
                if not deadline:
                    data = await channel.read(first_byte_timeout)
                    deadline = channel.loop.time() + (header_timeout or 1e9)
                else:
                    remaining = deadline - channel.loop.time()
                    if remaining <= 0:
                        return None
                    data = await channel.read(remaining)
                self.engine.feed(data)
        except TimeoutError:
            return None

    def poll_head(self) -> RequestHead | None | object:
        """``read_head`` without waiting: the head when the engine holds all of it (a
        request usually arrives in one read: then no coroutine is made for it), ``MORE``
        when bytes are missing, None when the client closed. Raises as ``read_head``."""
        self.method = b""  # a request refused before its head parses has no method (not the last one's HEAD)
        engine = self.engine
        event = engine.next_event()
        if event is None:
            return MORE
        if type(event) is RequestHead:
            self.bytes_in = self.bytes_out = 0
            self.method = event.method
            if not event.has_body:
                engine.next_event()  # its EndOfMessage: the request is complete
            return event
        return None  # Closed (or stray events after a close)

    async def next_body_event(self, timeout: float) -> Body | EndOfMessage:
        """The next piece of the request body (raises BadRequest if the client
        closes before the body is complete, TimeoutError if it stalls)."""
        engine = self.engine
        while True:
            event = engine.next_event()
            if event is not None:
                return event  # type: ignore[return-value]
            engine.feed(await self.channel.read(timeout))

    # Response writes go to the channel's write queue, which sends what a loop iteration
    # queued together (a small response is one TLS record and one send()) and large
    # amounts at once: no collecting here.

    def write_head(self, head: ResponseHead, *, end: bool = False) -> None:
        """Send a response head; ``end``: it is the whole response (no body follows)."""
        if end:
            self.channel.writelines((self.engine.send_head(head), self.engine.send_end()))
        else:
            self.channel.write(self.engine.send_head(head))

    def write_body(self, data: bytes) -> bool:
        """Queue a piece of body; True when the client's side is above its high-water
        mark and the caller must ``await drain()`` before the next piece (a plain method,
        not a coroutine: most responses never wait)."""
        self.bytes_out += len(data)
        channel = self.channel
        channel.writelines(self.engine.send_body(data))
        return channel.writing_paused

    async def drain(self) -> None:
        """Wait until the client has taken enough of what was sent (``write_timeout``)."""
        await self.channel.drain(self.write_timeout)

    def write_end(self, trailers: Headers = ()) -> None:
        """Finish the response (HTTP/1.1 clients get no trailers: they are dropped)."""
        self.channel.write(self.engine.send_end())

    def send_error(self, status: int, message: str, *, close: bool = False, unauthenticated: bool = False) -> None:
        """A complete plain-text response; ``close`` also ends the connection after it."""
        self.send_simple(status, (message + "\n").encode(), close=close)

    def send_simple(self, status: int, body: bytes, headers: list | None = None, *, close: bool = False) -> None:
        head, body = plain_response(status, body, headers, head_only=self.method == b"HEAD", close=close)
        engine = self.engine
        pieces = [engine.send_head(head)]
        if body:
            self.bytes_out += len(body)
            pieces.extend(engine.send_body(body))
        pieces.append(engine.send_end())
        self.channel.writelines(pieces)

    # -- the exchange's end (the calls a request handler makes; an HTTP/2 stream has them too)

    @property
    def can_respond(self) -> bool:
        """No byte of a final response went out yet: an error can still be answered."""
        return self.engine.can_respond

    @property
    def request_complete(self) -> bool:
        return self.engine.request_complete

    def next_cycle(self) -> bool:
        """After a complete exchange: True if the connection can carry another request."""
        return self.engine.start_next_cycle()

    def abort(self, code: int | None = None) -> None:
        """The exchange failed mid-way: only closing tells the client (``code``, an
        HTTP/2 error code for a stream, means nothing here)."""
        self.channel.abort()


def plain_response(
    status: int, body: bytes, headers: list | None = None, *, head_only: bool = False, close: bool = False
) -> tuple[ResponseHead, bytes]:
    """The one plain-text response format every failure uses: its head, and the body to
    send (none for a HEAD request)."""
    all_headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *(headers or ()),
    ]
    if close:
        all_headers.append((b"connection", b"close"))
    return ResponseHead(status, all_headers, reason_phrase(status)), (b"" if head_only else body)


_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase (b"" for unknown codes)."""
    return _PHRASES.get(status, b"")
