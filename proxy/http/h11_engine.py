"""The HTTP engine on h11 (see ``proxy.http.engine`` for the interface).

h11 does the framing; ``proxy.http.h1.heads`` adds what a proxy needs on top of it
and h11 leaves to the application (the httptools engine applies the same rules), and
h11's exceptions become ``BadRequest`` / ``HeadersTooLarge`` / ``BadGateway``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import h11

from proxy.errors import BadGateway, BadRequest, HeadersTooLarge
from proxy.http.engine import (
    Body,
    ClientEngine,
    Closed,
    EndOfMessage,
    Event,
    Headers,
    RequestHead,
    ResponseHead,
    ServerEngine,
)
from proxy.http.h1.hop_by_hop import without_connection_management
from proxy.http.h1.heads import request_head

_NEED = (h11.NEED_DATA, h11.PAUSED)
_END = EndOfMessage()
# h11 quotes the offending bytes as Python reprs (``bytearray(b'Bad Header')``), which a
# client reading a 400 should not have to decode: they become ``'Bad Header'``.
_BYTES_REPR = re.compile(r"""(?:bytearray\()?b(['"])((?:\\.|(?!\1).)*)\1\)?""")


def protocol_error_text(exc: h11.ProtocolError) -> str:
    """h11's message for ``exc`` with the bytes it quotes as plain quoted text."""
    return _BYTES_REPR.sub(lambda match: f"'{match.group(2)}'", str(exc))


class _H11Cycle:
    """What both sides share: bytes in, and keep-alive only when h11 says both directions
    are DONE."""

    _conn: h11.Connection

    def feed(self, data: bytes) -> None:
        self._conn.receive_data(data)

    def start_next_cycle(self) -> bool:
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False

    def switched_data(self) -> bytes:
        return bytes(self._conn.trailing_data[0])

    def has_unread(self) -> bool:
        return bool(self._conn.trailing_data[0])

    def leftover(self) -> tuple[bytes, bool]:
        """The bytes received past the current message, and whether the peer has
        closed: what an engine that handed this one a message takes back."""
        data, closed = self._conn.trailing_data
        return bytes(data), closed


class H11ServerEngine(_H11Cycle, ServerEngine):
    """Client side of a connection: parses requests, writes responses."""

    def __init__(self, max_header_bytes: int = 65536) -> None:
        self._max_header_bytes = max_header_bytes or 65536
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header_bytes)
        # Of the request being answered, even one the head rules refuse: an answer to
        # HEAD has no body, whoever built it (b"": none parsed yet, or h11 refused it).
        self.request_method = b""

    def next_event(self) -> Event | None:
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise HeadersTooLarge(
                    f"request header section larger than {self._max_header_bytes} bytes"
                ) from None
            raise BadRequest(f"malformed request: {protocol_error_text(exc)}") from None
        if event in _NEED:
            return None
        if type(event) is h11.Data:
            return Body(event.data)
        if type(event) is h11.Request:
            self.request_method = event.method
            return self._request_head(event)
        if type(event) is h11.EndOfMessage:
            return _END
        return Closed()

    def _request_head(self, event: h11.Request) -> RequestHead:
        return request_head(
            event.method, event.target, event.http_version, list(event.headers), self._max_header_bytes
        )

    def send_head(self, head: ResponseHead) -> bytes:
        cls = h11.InformationalResponse if head.status < 200 else h11.Response
        headers = head.headers
        if head.raw:  # (another engine's head, whose Connection / Keep-Alive lines only its bytes lost)
            headers = without_connection_management(headers)
        return self._send(cls(status_code=head.status, headers=headers, reason=head.reason))

    def send_body(self, data: bytes) -> Sequence[bytes]:
        if self.request_method == b"HEAD":
            return ()  # h11 frames the answer to HEAD without a body, and would raise
        try:
            return self._conn.send_with_data_passthrough(h11.Data(data=data)) or ()
        except h11.LocalProtocolError as exc:
            raise BadGateway(f"upstream response cannot be relayed: {protocol_error_text(exc)}") from None

    def send_end(self) -> bytes:
        return self._send(h11.EndOfMessage())

    def _send(self, event: object) -> bytes:
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise BadGateway(f"upstream response cannot be relayed: {protocol_error_text(exc)}") from None

    def start_next_cycle(self) -> bool:
        self.request_method = b""
        return super().start_next_cycle()

    @property
    def request_complete(self) -> bool:
        return self._conn.their_state is h11.DONE

    @property
    def can_respond(self) -> bool:
        """No part of a response has been sent yet for the current request."""
        return self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)



class H11ClientEngine(_H11Cycle, ClientEngine):
    """Upstream side of a pooled connection: writes requests, parses responses."""

    def __init__(self, max_header_bytes: int = 65536) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes or 65536)

    def send_head(self, head: RequestHead, headers: Headers, target: bytes) -> bytes:
        if head.chunked and head.content_length is None:
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        try:
            return self._conn.send(h11.Request(method=head.method, target=target, headers=headers))
        except h11.LocalProtocolError as exc:  # e.g. a set_headers value HTTP cannot carry
            raise BadGateway(f"request cannot be sent upstream: {protocol_error_text(exc)}") from None

    def send_body(self, data: bytes) -> Sequence[bytes]:
        return self._conn.send_with_data_passthrough(h11.Data(data=data)) or ()

    def send_end(self) -> bytes:
        return self._conn.send(h11.EndOfMessage()) or b""

    def next_event(self) -> Event | None:
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadGateway(f"upstream broke the protocol: {protocol_error_text(exc)}") from None
        if event in _NEED:
            return None
        if type(event) is h11.Data:
            return Body(event.data)
        if type(event) is h11.Response or type(event) is h11.InformationalResponse:
            return ResponseHead(event.status_code, list(event.headers), event.reason)
        if type(event) is h11.EndOfMessage:
            return _END
        return Closed()

    def start_next_cycle(self) -> bool:
        """Never pooled with bytes past the response (a body on HEAD / 204 / 304, more
        than Content-Length): the next request on it, another client's, would read them
        as its own response (SPEC 4, "never shared between clients"). Nor once the
        upstream has closed."""
        data, closed = self._conn.trailing_data
        if data or closed:
            return False
        return super().start_next_cycle()
