"""The HTTP engine interface: HTTP/1.1 framing with no I/O.

The relay in ``proxy.server`` never parses HTTP itself. It feeds the bytes it read
into an engine and acts on the events that come out; to send, it hands the engine
events and writes the bytes that come back. One engine object per connection side:

* ``ServerEngine`` talks to the client: parses requests, serialises responses.
* ``ClientEngine`` talks to the upstream: serialises requests, parses responses.

Pull style (``feed`` then ``next_event`` until ``None``) fits both h11 (pull) and
httptools (callbacks that fill a queue), and lets a server engine hold back a
pipelined request until the current response is done.

Parse errors surface as ``proxy.errors`` exceptions (``BadRequest``, ``HeadersTooLarge``
on the client side, ``BadGateway`` on the upstream side), so the relay picks the status
in one place. Header names are lowercase bytes; values bytes.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.http.h1.hop_by_hop import HOP_BY_HOP, without_connection_management

__all__ = ["HOP_BY_HOP"]  # (re-exported: its home is proxy.http.h1.hop_by_hop)

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestHead:
    """A request line and header section.

    ``content_length`` / ``chunked`` describe the body framing the client used, so
    the upstream side can re-frame it (``Transfer-Encoding`` itself is hop-by-hop and
    is removed before the head goes upstream).
    """

    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes = b"1.1"
    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False
    upgrade: bool = False  # Upgrade + Connection: upgrade (e.g. WebSocket): may become a tunnel
    # The header lines as the client sent them, from the request line's CRLF up to the
    # last line's end (its CRLF and the blank line not included), when they may be relayed
    # as they are (``proxy.forwarding.headers.as_received``); set by the httptools
    # engine's fast path for a plain head, its Host line moved first when the client
    # sent it later. Wire detail, so not part of equality.
    raw_fields: bytes = field(default=b"", compare=False, repr=False)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(slots=True)
class ResponseHead:
    """A status line and header section; 1xx heads are informational.

    ``raw``: the head's bytes as a proxy relays them (as received, less Connection and
    Keep-Alive lines), set by a client engine when nothing else in it needs changing
    (see ``ClientEngine.next_event``), with the ``content_length`` that frames its
    body; wire details, so not part of equality."""

    status: int
    headers: Headers = field(default_factory=list)
    reason: bytes = b""
    raw: bytes = field(default=b"", compare=False, repr=False)
    content_length: int = field(default=0, compare=False, repr=False)

    @property
    def informational(self) -> bool:
        return self.status < 200


@dataclass(slots=True)
class Body:
    """A piece of a message body (never the whole body: bodies are streamed)."""

    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    """The body is complete. ``trailers``: what an HTTP/2 peer sent after it (gRPC's
    status); HTTP/1.1 engines drop trailers and leave it empty."""

    trailers: Headers = ()  # type: ignore[assignment]


@dataclass(slots=True)
class Closed:
    """The peer closed its side cleanly between messages."""


Event = RequestHead | ResponseHead | Body | EndOfMessage | Closed


class ServerEngine(abc.ABC):
    """The client-facing side of one connection."""

    @abc.abstractmethod
    def feed(self, data: bytes) -> None:
        """Bytes read from the client; ``b""`` means the client closed its side."""

    @abc.abstractmethod
    def next_event(self) -> Event | None:
        """The next parsed event, or None when more data is needed or the next
        request must wait until the current response is complete.

        Raises ``BadRequest`` / ``HeadersTooLarge`` for requests that cannot be
        framed unambiguously; the connection must then be answered and closed."""

    @abc.abstractmethod
    def send_head(self, head: ResponseHead) -> bytes:
        """Serialise a response head (1xx heads may precede the final one)."""

    @abc.abstractmethod
    def send_body(self, data: bytes) -> Sequence[bytes]:
        """Serialise a piece of body; a list so large data is written without a copy."""

    @abc.abstractmethod
    def send_end(self) -> bytes:
        """Finish the response (terminating chunk where the framing needs one)."""

    @property
    @abc.abstractmethod
    def request_complete(self) -> bool:
        """The current request's body has been read to its end."""

    @property
    @abc.abstractmethod
    def can_respond(self) -> bool:
        """No byte of a final response has been sent for the current request yet,
        so an error response is still possible."""

    @abc.abstractmethod
    def start_next_cycle(self) -> bool:
        """After a complete exchange: True if the connection can carry another
        request (keep-alive on both ends), False if it must be closed."""

    @abc.abstractmethod
    def switched_data(self) -> bytes:
        """After a ``101`` went out: bytes the client sent beyond the request (the
        start of the tunnelled protocol)."""

    @abc.abstractmethod
    def has_unread(self) -> bool:
        """Bytes past the current request were received already (a pipelined request):
        the next head can be parsed without reading. Unlike ``switched_data`` it takes
        nothing out."""

    # A response body moved past both engines (``Channel.forward``): not every engine can.

    def takes_body_as_is(self, count: int) -> bool:
        """The next ``count`` response body bytes would go out exactly as given (no
        framing around them: a Content-Length with room for them, or until close)."""
        return False

    def body_sent_as_is(self, count: int) -> None:
        """``count`` body bytes went out without ``send_body`` (``takes_body_as_is``)."""
        raise NotImplementedError


class ClientEngine(abc.ABC):
    """The upstream-facing side of one pooled connection."""

    @abc.abstractmethod
    def send_head(self, head: RequestHead, headers: Headers, target: bytes) -> bytes:
        """Serialise a request head with the rewritten ``headers`` and ``target``;
        the body framing follows ``head.content_length`` / ``head.chunked``."""

    def send_head_as_received(self, head: RequestHead, fields: bytes, added: Headers, target: bytes) -> bytes:
        """``send_head`` for a request whose header lines go upstream as the client sent
        them: ``fields`` (``head.raw_fields``, its Connection / Keep-Alive lines cut, then
        the proxy's lines), ``added`` (the proxy's lines as a list). An engine without that
        path sends the parsed headers, less the same lines, and ``added``: the same
        request, spelled its way."""
        return self.send_head(head, [*without_connection_management(head.headers), *added], target)

    @abc.abstractmethod
    def send_body(self, data: bytes) -> Sequence[bytes]:
        """Serialise a piece of request body."""

    @abc.abstractmethod
    def send_end(self) -> bytes:
        """Finish the request body."""

    @abc.abstractmethod
    def feed(self, data: bytes) -> None:
        """Bytes read from the upstream; ``b""`` means the upstream closed."""

    @abc.abstractmethod
    def next_event(self) -> Event | None:
        """The next response event or None (need data). Raises ``BadGateway`` when the
        upstream breaks the protocol or closes before the response is complete.

        An engine may give a final ``ResponseHead`` its ``raw`` bytes when, but for
        ``Connection: keep-alive`` / ``close`` and Keep-Alive lines (cut from ``raw``),
        nothing in them is for this connection only: HTTP/1.1, a reason phrase, a body
        framed by one Content-Length, no other hop-by-hop header (``HOP_BY_HOP``). A
        server engine may then send those bytes as they are (names keep their case)."""

    @abc.abstractmethod
    def start_next_cycle(self) -> bool:
        """After a complete exchange: True if the connection can go back to the pool."""

    @abc.abstractmethod
    def switched_data(self) -> bytes:
        """After a ``101`` arrived: bytes the upstream sent beyond it."""

    def unparsed_body(self) -> int:
        """Bytes of the response body being read that the caller may read past this
        engine (a Content-Length body, nothing of it buffered here); 0: none now."""
        return 0

    def body_read_elsewhere(self, count: int) -> None:
        """``count`` bytes of ``unparsed_body`` were read (and relayed) without ``feed``."""
        raise NotImplementedError
