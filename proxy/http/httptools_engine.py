"""The HTTP engine on httptools (llhttp), behind the same interface as the h11 one.

Why it is built this way: the proxy must refuse exactly the requests the h11 engine
refuses, and llhttp's grammar differs from h11's in both directions (llhttp refuses
bare-LF lines, obs-fold, unknown methods and repeated equal Content-Lengths, which h11
accepts; it accepts double spaces in the request line and repeated Host headers, which
h11 refuses). So:

* The fast path covers ordinary messages: a plain head (``proxy.http.h1.heads``) read
  from the ``ReceiveBuffer`` (``h1.receive``), bodies framed by ``h1.bodies``, messages
  serialised by hand — except a response head the proxy would not change but for its
  Connection / Keep-Alive lines: it is relayed as received, less those lines
  (``h1.hop_by_hop.relayable``), as nginx does (names keep their case; measured with
  bench/paired.py against nginx's own upstream answers: +3.5 % requests per CPU second).
* Everything else is handed, for that one message, to the h11 engine
  (``h1.fallback``): its verdict and its events are the answer, so both engines refuse
  the same messages by construction. ``tests/test_engine_parity.py`` holds both to it.

What is left here is glue with one explicit state per direction: ``Reading`` (what the
next bytes received are) and ``Writing`` (what has been sent). ``READ_TRANSITIONS`` /
``WRITE_TRANSITIONS`` list every move either engine makes (the tests hold the engines to
them); the moves are plain assignments so the hot path pays no call for them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import httptools  # noqa: F401  (h1.heads tokenises with it; without it engine_factory falls back to h11)

from proxy.errors import BadGateway, BadRequest, HeadersTooLarge, HTTPError
from proxy.http.engine import (
    Body,
    ClientEngine,
    Closed,
    Event,
    Headers,
    RequestHead,
    ResponseHead,
    ServerEngine,
)
from proxy.http.h1 import fallback
from proxy.http.h1.bodies import CHUNKED, END, LENGTH, NO_BODY, TRAILERS, UNTIL_CLOSE, BodyReader, BodyWriter, Malformed
from proxy.http.h1.heads import (
    HEAD_END,
    HEAD_END_OVERLAP,
    comma_values,
    content_lengths,
    frame_response,
    has_connection_close,
    plain_request,
    plain_response,
    request_wire,
    request_wire_as_received,
    response_wire,
    wants_close,
)
from proxy.http.h1.hop_by_hop import relayable, without_connection_management
from proxy.http.h1.receive import ReceiveBuffer

_HEAD_END = HEAD_END  # (a module global: tests/test_h1_receive.py counts its work)


class Reading(enum.Enum):
    """What the bytes received next belong to."""

    HEAD = "a head: none yet, or part of one"
    BODY = "the body of the message whose head was read (bodies.BodyReader frames it)"
    H11 = "a message h11 reads (fallback): its head, body or trailers"
    DONE = "nothing: the message was read; the next waits for start_next_cycle"
    CLOSED = "nothing ever: the peer closed between messages, or the protocol switched (101)"


class Writing(enum.Enum):
    """What has been sent of the current exchange's message."""

    IDLE = "nothing (but interim 1xx heads)"
    SENDING = "the head, and perhaps part of the body"
    SENT = "all of it"


HEAD, BODY, H11, DONE, CLOSED = Reading
IDLE, SENDING, SENT = Writing

READ_TRANSITIONS = {
    HEAD: {BODY, H11, CLOSED},  # CLOSED: EOF between messages (server), a 101 (client)
    BODY: {DONE, H11},  # H11: a trailer section
    H11: {DONE, CLOSED},  # DONE: taken back after its end; CLOSED: h11 saw EOF between messages, or a 101
    DONE: {HEAD, CLOSED},  # HEAD: start_next_cycle; CLOSED: EOF seen after the message
    CLOSED: set(),
}
WRITE_TRANSITIONS = {IDLE: {SENDING}, SENDING: {SENT}, SENT: {IDLE}}


class _Side:
    """What both engines share: the receive buffer and EOF, the body reader and writer,
    the h11 engine reading a message for this one (``fallback``), and the two states."""

    def __init__(self, max_header_bytes: int) -> None:
        self._max_header_bytes = max_header_bytes or 65536
        self._buf = ReceiveBuffer()
        self._eof = False
        self._reader = BodyReader()
        self._writer = BodyWriter()
        self._fallback: fallback.Fallback | None = None
        self._reading = HEAD
        self._writing = IDLE
        self._method = b""  # of the request being answered

    def feed(self, data: bytes) -> None:
        if self._fallback is not None:  # (H11, or CLOSED after a 101 h11 read: its bytes follow it)
            self._fallback.feed(data)
        elif data:
            self._buf.feed(data)
        else:
            self._eof = True

    def _unread(self, head: bytes = b"") -> bytes:
        """Everything unread (``head``: bytes already taken, put back in front), for the
        h11 engine that reads from here on (the move to ``H11``)."""
        self._reading = H11
        return head + self._buf.take_all()

    def _take_back(self) -> None:
        """h11 read its message: the bytes past it, and the EOF if it saw one, are ours."""
        data, closed = fallback.take_back(self._fallback)
        self._fallback = None
        self._buf.feed(data)
        if closed:
            self._eof = True

    def switched_data(self) -> bytes:
        if self._fallback is not None:
            return self._fallback.switched_data()
        return self._buf.take_all()

    def has_unread(self) -> bool:
        if self._fallback is not None:
            return self._fallback.has_unread()
        return bool(self._buf.data)


class HttptoolsServerEngine(_Side, ServerEngine):
    """Client side of a connection: parses requests, writes responses."""

    def __init__(self, max_header_bytes: int = 65536) -> None:
        super().__init__(max_header_bytes)
        self._version: bytes | None = None  # None until a request parsed (then assume HTTP/1.0)
        self._keep_alive = True

    # -- reading requests

    def next_event(self) -> Event | None:
        reading = self._reading
        if reading is BODY:
            if self._reader.framing == NO_BODY:  # (most requests: no call to the reader)
                self._reading = DONE
                return END
            try:
                event = self._reader.read(self._buf, self._eof, self._max_header_bytes)
            except Malformed as exc:
                if exc.status == 431:  # (h11's hint for an over-long line, whatever the state)
                    limit = self._max_header_bytes
                    raise HeadersTooLarge(f"request header section larger than {limit} bytes") from None
                raise BadRequest(f"malformed request: {exc}") from None
            if event is END:
                self._reading = DONE
            elif event is TRAILERS:
                self._fallback = fallback.request_trailers(self._unread(), self._eof, self._max_header_bytes)
                return self._h11_event()
            return event
        if reading is HEAD:
            return self._next_head()
        if reading is H11:
            return self._h11_event()
        if reading is DONE and self._eof and not self._buf.data:
            self._reading = CLOSED
            return Closed()
        return None  # DONE: a pipelined request waits until the response is done; CLOSED

    def _next_head(self) -> Event | None:
        buf = self._buf
        if not buf.data:  # (the relay asks once before reading: no call for that)
            if self._eof:
                self._reading = CLOSED
                return Closed()
            return None
        raw = buf.take_through(_HEAD_END, HEAD_END_OVERLAP)
        if raw is None:
            if len(buf) > self._max_header_bytes or self._eof or buf.first() < 0x21:
                return self._to_h11()  # h11 raises 431 / "peer closed" / refuses at once
            return None
        try:
            parsed = plain_request(raw, self._max_header_bytes) if raw[0] > 0x20 else None
        except HTTPError:
            self._method = raw[: raw.find(b" ")]  # the answer to a refused HEAD has no body either
            raise
        if parsed is None:
            return self._to_h11(raw)
        head, names = parsed
        self._method = head.method
        version = self._version = head.http_version
        self._keep_alive = version >= b"1.1" and not (b"connection" in names and has_connection_close(head.headers, names))
        if head.chunked:
            self._reader.start(CHUNKED)
        elif head.content_length:
            self._reader.start(LENGTH, head.content_length)
        else:
            self._reader.framing = NO_BODY
        self._reading = BODY
        return head

    def _to_h11(self, head: bytes = b"") -> Event | None:
        """h11 reads this request: its head (or its refusal) and its body."""
        self._fallback = fallback.request(self._unread(head), self._eof, self._max_header_bytes)
        return self._h11_event()

    def _h11_event(self) -> Event | None:
        delegate = self._fallback
        try:
            event = delegate.next_event()
        except HTTPError:
            self._method = delegate.request_method  # a refused HEAD is still answered as one
            raise
        kind = type(event)
        if event is None or kind is Body:
            return event
        if kind is RequestHead:
            self._start_request(event)
            return event
        if kind is Closed:
            self._fallback = None
            self._reading = CLOSED
            return event
        self._take_back()  # a pipelined request, if any
        self._reading = DONE
        return END

    def _start_request(self, head: RequestHead, names: list[bytes] | None = None) -> None:
        self._method = head.method
        self._version = head.http_version
        if names is None:
            names = [name for name, _ in head.headers]
        self._keep_alive = not wants_close(head.headers, names, head.http_version)

    # -- writing responses

    def send_head(self, head: ResponseHead) -> bytes:
        status = head.status
        raw = head.raw
        if raw and self._version == b"1.1" and self._method != b"HEAD":
            # Relayed as received: frame_response would change nothing in it but its
            # spelling (names' case, spaces), which nginx also passes through as sent --
            # and, when the client asked to close, add the one ``connection: close`` line
            # (``raw`` has no Connection or Keep-Alive line left: ``relayable``). That
            # re-framing cost ~19 us a response (every new-connection-per-request client).
            # (plain_response makes raw heads only of CRLF-ended lines; the endswith guards
            # the splice should that ever change.)
            keep_alive = self._keep_alive
            if keep_alive or raw.endswith(b"\r\n\r\n"):
                writer = self._writer
                writer.framing = LENGTH
                writer.remaining = head.content_length
                self._writing = SENDING
                return raw if keep_alive else raw[:-2] + b"connection: close\r\n\r\n"
        if status < 200:
            return response_wire(status, head, head.headers)
        headers = head.headers
        if raw:  # re-framed after all (HTTP/1.0, HEAD): its Connection / Keep-Alive go
            headers = without_connection_management(headers)
        headers, self._keep_alive = frame_response(
            status, headers, self._method, self._version, self._keep_alive, self._writer
        )
        wire = response_wire(status, head, headers)
        self._writing = SENDING
        return wire

    def send_body(self, data: bytes) -> Sequence[bytes]:
        return self._writer.body(data, _unrelayable)

    def send_end(self) -> bytes:
        self._writing = SENT
        return self._writer.end(_unrelayable)

    def takes_body_as_is(self, count: int) -> bool:
        writer = self._writer
        framing = writer.framing
        return (framing == LENGTH and count <= writer.remaining) or framing == UNTIL_CLOSE

    def body_sent_as_is(self, count: int) -> None:
        writer = self._writer
        if writer.framing == LENGTH:
            writer.remaining -= count

    @property
    def request_complete(self) -> bool:
        return self._reading is DONE

    @property
    def can_respond(self) -> bool:
        return self._writing is IDLE

    def start_next_cycle(self) -> bool:
        if self._reading is not DONE or self._writing is not SENT or not self._keep_alive:
            return False
        self._reading = HEAD
        self._writing = IDLE
        self._method = b""  # an error answer before the next head is a GET's (as in h11)
        return True


def _unrelayable(message: str) -> BadGateway:
    return BadGateway(f"upstream response cannot be relayed: {message}")


def _unsendable(message: str) -> BadGateway:
    return BadGateway(f"request cannot be sent upstream: {message}")


class HttptoolsClientEngine(_Side, ClientEngine):
    """Upstream side of a pooled connection: writes requests, parses responses."""

    def __init__(self, max_header_bytes: int = 65536) -> None:
        super().__init__(max_header_bytes)
        self._upgrade_asked = False
        self._keep_alive = True
        self._request_host = b""

    # -- writing requests

    def send_head(self, head: RequestHead, headers: Headers, target: bytes) -> bytes:
        if head.chunked and head.content_length is None:
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        wire, headers, names = request_wire(head.method, target, headers)
        keep_alive = not (b"connection" in names and b"close" in comma_values(headers, b"connection"))
        self._head_sent(head, headers[0][1], b"upgrade" in names, keep_alive)
        return wire

    def send_head_as_received(self, head: RequestHead, fields: bytes, added: Headers, target: bytes) -> bytes:
        # Only plain heads have fields to relay, and no hop-by-hop header is among them
        # (as_received): no Transfer-Encoding, Upgrade or Connection: close goes up.
        wire = request_wire_as_received(head.method, target, fields)
        self._head_sent(head, head.header(b"host"), False, True)  # (a plain head has one Host)
        return wire

    def _head_sent(self, head: RequestHead, host: bytes, upgrade_asked: bool, keep_alive: bool) -> None:
        """A request head went: its body's framing, and what its response is read by."""
        writer = self._writer
        if head.content_length is not None:
            writer.framing = LENGTH
            writer.remaining = head.content_length
        elif head.chunked:
            writer.framing = CHUNKED
        else:
            writer.framing = NO_BODY
            writer.remaining = 0
        self._method = head.method
        self._request_host = host
        self._upgrade_asked = upgrade_asked
        self._keep_alive = keep_alive
        self._writing = SENDING

    def send_body(self, data: bytes) -> Sequence[bytes]:
        return self._writer.body(data, _unsendable)

    def send_end(self) -> bytes:
        self._writing = SENT
        return self._writer.end(_unsendable)

    # -- reading responses

    def next_event(self) -> Event | None:
        reading = self._reading
        if reading is BODY:
            if self._reader.framing == NO_BODY:  # (a body read to its end, or none)
                self._reading = DONE
                return END
            try:
                event = self._reader.read(self._buf, self._eof, self._max_header_bytes)
            except Malformed as exc:
                raise BadGateway(f"upstream broke the protocol: {exc}") from None
            if event is END:
                self._reading = DONE
            elif event is TRAILERS:
                self._fallback = fallback.response_trailers(
                    self._unread(), self._eof, self._max_header_bytes, self._request_host
                )
                return self._h11_event()
            return event
        if reading is HEAD:
            return self._next_head()
        if reading is H11:
            return self._h11_event()
        return None  # DONE, CLOSED (switched protocols)

    def _next_head(self) -> Event | None:
        buf = self._buf
        if not buf.data:  # (the relay asks once before reading: no call for that)
            return self._to_h11() if self._eof else None  # h11 decides what an early close means
        raw = buf.take_through(_HEAD_END, HEAD_END_OVERLAP)
        if raw is None:
            if len(buf) > self._max_header_bytes or self._eof or buf.first() < 0x21:
                return self._to_h11()
            return None
        parsed = plain_response(raw, self._upgrade_asked)
        if parsed is None:
            return self._to_h11(raw)
        head, control, names = parsed  # (control: the framing and hop-by-hop headers alone)
        status = head.status
        if status < 200:
            if status == 101:
                self._reading = CLOSED
            return head
        if raw[5:8] < b"1.1" or (b"connection" in names and has_connection_close(control, names)):
            self._keep_alive = False  # (h11's rule)
        self._reading = BODY
        reader = self._reader
        method = self._method
        if status in (204, 304) or method == b"HEAD" or (method == b"CONNECT" and status < 300):
            reader.framing = NO_BODY
        elif b"transfer-encoding" in names:
            reader.start(CHUNKED)  # (plain_response let only a lone "chunked" through)
        else:
            lengths = content_lengths(control, names)
            if lengths:
                length = int(lengths[0])
                if length:
                    reader.framing = LENGTH
                    reader.remaining = length
                else:
                    reader.framing = NO_BODY
                if len(lengths) == 1 and raw[5:8] == b"1.1" and head.reason:
                    head.raw = relayable(raw, control, names)
                    head.content_length = length
            else:
                reader.framing = UNTIL_CLOSE
                self._keep_alive = False
        return head

    def _to_h11(self, head: bytes = b"") -> Event | None:
        """h11 reads this response (its verdict, its events)."""
        self._fallback = fallback.response(
            self._unread(head), self._eof, self._max_header_bytes, self._method, self._request_host,
            self._upgrade_asked,
        )
        return self._h11_event()

    def _h11_event(self) -> Event | None:
        delegate = self._fallback
        event = delegate.next_event()
        kind = type(event)
        if event is None or kind is Body or kind is Closed:
            return event
        if kind is ResponseHead:
            if event.status == 101:
                self._reading = CLOSED
            return event
        self._take_back()
        if not delegate.start_next_cycle():
            self._keep_alive = False
        self._reading = DONE
        return END

    def unparsed_body(self) -> int:
        reader = self._reader
        if self._reading is BODY and reader.framing == LENGTH and not (self._buf.data or self._eof):
            return reader.remaining
        return 0

    def body_read_elsewhere(self, count: int) -> None:
        reader = self._reader
        reader.remaining -= count
        if not reader.remaining:
            reader.framing = NO_BODY  # (next_event: the END)

    def start_next_cycle(self) -> bool:
        if self._reading is not DONE or self._writing is not SENT or not self._keep_alive:
            return False
        if self._buf.data or self._eof:
            return False  # bytes past the response, or a closed upstream: never pooled
        self._reading = HEAD
        self._writing = IDLE
        return True
