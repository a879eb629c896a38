"""The HTTP engine on httptools (llhttp), behind the same interface as the h11 one.

Why it is built this way: the proxy must refuse exactly the requests the h11 engine
refuses, and llhttp's grammar differs from h11's in both directions (llhttp refuses
bare-LF lines, obs-fold, unknown methods and repeated equal Content-Lengths, which h11
accepts; it accepts double spaces in the request line and repeated Host headers, which
h11 refuses). So:

* The fast path covers ordinary messages: the head (found where h11 would find its end)
  is tokenised by llhttp, and only taken when it is plain — a request line of the form
  ``METHOD SP target SP HTTP/1.x``, exactly one Host, no Transfer-Encoding other than a
  lone ``chunked`` — then the rules of ``proxy.http.head_rules`` apply as in the h11
  engine. Bodies are framed here (Content-Length by slicing, chunked with h11's own
  chunk grammar, close-delimited responses); messages are serialised by hand, except
  a response head the proxy would not change but for its Connection / Keep-Alive
  lines: it is relayed as received, less those lines, as nginx does (names keep
  their case; measured with bench/paired.py against nginx's own upstream answers:
  +3.5 % requests per CPU second).
* Everything else — a head llhttp refuses or that is not plain, a trailer section — is
  handed, for that one message, to the h11 engine (the reference): its verdict and its
  events are the answer, so both engines refuse the same messages by construction,
  and the rare path costs what h11 costs. ``tests/test_engine_parity.py`` holds both to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from operator import itemgetter

import httptools

from proxy.errors import BadGateway, BadRequest, HeadersTooLarge, HTTPError
from proxy.http.engine import (
    HOP_BY_HOP,
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
from proxy.http.h11_engine import H11ClientEngine, H11ServerEngine
from proxy.http.h1.receive import ReceiveBuffer
from proxy.http.h1.hop_by_hop import OTHER_HOP_BY_HOP, without_connection_management
from proxy.http.head_rules import comma_values, request_head

# Where h11 ends a header section; using the same boundary keeps the engines in step.
_HEAD_END = re.compile(rb"\n\r?\n")
# Plain request / status lines (anything else goes to h11 for its verdict).
_PLAIN_REQUEST_LINE = re.compile(rb"[A-Z]+ [\x21-\x7e]+ HTTP/1\.[01]\r\n")
_PLAIN_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [\t\x20-\x7e\x80-\xff]*)?\r\n")
_PARSE_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)
# h11's chunk-size line (its ``chunk_header``), so chunked bodies read the same here.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")
_CRLF = re.compile(rb"\r\n")
_TRAILERS = object()  # the last chunk is followed by trailer lines: h11 reads them
_END = EndOfMessage()
_UNSENDABLE = b"\r\n\x00"
_name_of = itemgetter(0)
# A relayed head loses these lines (values cannot hold CR or LF, so only line starts match).
_CONNECTION_LINES = re.compile(rb"\r\n(?:connection|keep-alive):[^\r]*", re.IGNORECASE)
_KEEP_ALIVE_OR_CLOSE = frozenset({b"keep-alive", b"close"})

# Body framings, for reading and for writing.
_NO_BODY = 0  # nothing follows the head
_LENGTH = 1  # Content-Length bytes
_CHUNKED = 2
_UNTIL_CLOSE = 3  # a response ended by the upstream closing (HTTP/1.0 style)
_DISCARD = 4  # the answer to HEAD: any body handed to the writer is not sent


class _HeadFields:
    """llhttp's callback target for one head: collects the target / reason and headers
    (names lowercased and values stripped as h11 does)."""

    __slots__ = ("target", "reason", "headers")

    def __init__(self) -> None:
        self.target = b""
        self.reason = b""
        self.headers: Headers = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.rstrip(b" \t")))


def _parse_head(parser_class: type, head: bytes) -> _HeadFields | None:
    """Tokenise a complete head with llhttp; None when llhttp refuses it."""
    fields = _HeadFields()
    try:
        parser_class(fields).feed_data(head)
    except _PARSE_ERRORS as exc:
        if type(exc) is not httptools.HttpParserUpgrade:
            return None
    return fields


def _names(headers: Headers) -> list[bytes]:
    return [*map(_name_of, headers)]


def _wants_close(headers: Headers, names: list[bytes], http_version: bytes) -> bool:
    """h11's keep-alive rule: ``Connection: close`` or an HTTP/1.0 peer ends the connection."""
    return http_version < b"1.1" or (b"connection" in names and _has_connection_close(headers, names))


def _content_lengths(headers: Headers, names: list[bytes]) -> list[bytes]:
    """``comma_values(headers, b"content-length")``, without its loop for the usual one plain value."""
    count = names.count(b"content-length")
    if count == 1:
        value = headers[names.index(b"content-length")][1]
        if b"," not in value:
            item = value.lower().strip()
            return [item] if item else []
    return comma_values(headers, b"content-length") if count else []


def _header_lines(headers: Headers) -> bytes:
    """``name: value`` CRLF for each header, then the blank line."""
    if not headers:
        return b"\r\n"
    return b"\r\n".join(map(b": ".join, headers)) + b"\r\n\r\n"


def _serialise_head(start_line: bytes, headers: Headers) -> bytes:
    return start_line + _header_lines(headers)


def _sendable(wire: bytes, line_count: int) -> bool:
    """A serialised head holds no CR, LF or NUL beyond the CRLFs ending its
    ``line_count`` lines (blank line included): nothing in a name, value, method or
    target could split or end it. One pass over the bytes instead of one per header."""
    return len(wire) - len(wire.translate(None, _UNSENDABLE)) == 2 * line_count


class _BodyWriter:
    """Frames the body of the message being sent (either direction)."""

    __slots__ = ("framing", "remaining")

    def __init__(self) -> None:
        self.framing = _NO_BODY
        self.remaining = 0

    def body(self, data: bytes, error: type) -> Sequence[bytes]:
        framing = self.framing
        if framing == _CHUNKED:
            return (b"%x\r\n" % len(data), data, b"\r\n") if data else ()
        if framing == _UNTIL_CLOSE:
            return (data,)
        if framing == _DISCARD:
            return ()
        if len(data) > self.remaining:  # _LENGTH and _NO_BODY (a length of 0)
            raise error("too much data for declared Content-Length")
        self.remaining -= len(data)
        return (data,)

    def end(self, error: type) -> bytes:
        if self.framing == _CHUNKED:
            return b"0\r\n\r\n"
        if self.framing < _UNTIL_CLOSE and self.remaining:
            raise error("too little data for declared Content-Length")
        return b""


class _Malformed(Exception):
    """A body the engine cannot frame; ``status`` 431 where h11 would hint it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _BodyReader:
    """Reads one message body out of a buffer; ``delegate`` is the h11 engine reading
    a message (or a trailer section) this module does not frame itself."""

    __slots__ = ("framing", "remaining", "delegate", "discard", "last_chunk")

    def __init__(self) -> None:
        self.framing = _NO_BODY
        self.remaining = 0
        self.delegate: H11ServerEngine | H11ClientEngine | None = None
        self.discard = b""  # the CRLF still expected after a chunk's data
        self.last_chunk = False

    def start_chunked(self) -> None:
        self.framing = _CHUNKED
        self.remaining = 0
        self.discard = b""
        self.last_chunk = False

    def sized(self, buf: ReceiveBuffer, eof: bool) -> Body | None:
        """The next piece of a Content-Length body, taken from ``buf``."""
        if not buf:
            if eof:
                raise _Malformed("peer closed connection without sending complete message body")
            return None
        data = buf.take(self.remaining)
        self.remaining -= len(data)
        if not self.remaining:
            self.framing = _NO_BODY
        return Body(data)

    def chunked(self, buf: ReceiveBuffer, eof: bool, limit: int) -> object:
        """The next step through a chunked body, read as h11 reads it: ``Body``, the
        end, None for more data, or ``_TRAILERS``."""
        while True:
            if self.discard:
                size = min(len(self.discard), len(buf))
                if buf.peek(size) != self.discard[:size]:
                    raise _Malformed("malformed chunk footer")
                self.discard = self.discard[size:]
                buf.take(size)
                if self.discard:
                    return _need_more(buf, eof, limit)
            if self.last_chunk:
                if buf.startswith(b"\n"):
                    buf.take(1)
                    return _END
                if buf.startswith(b"\r\n"):
                    buf.take(2)
                    return _END
                if not buf or (len(buf) == 1 and buf.startswith(b"\r") and not eof):
                    return _need_more(buf, eof, limit)
                return _TRAILERS
            if not self.remaining:
                end = buf.find(_CRLF, 1)
                if end < 0:
                    return _need_more(buf, eof, limit)
                match = buf.match(_CHUNK_SIZE_LINE, end)
                if match is None:
                    raise _Malformed("illegal chunk header")
                self.remaining = int(match.group(1), 16)
                buf.take(end)
                if not self.remaining:
                    self.last_chunk = True
                    continue
            if not buf:
                return _need_more(buf, eof, limit)
            data = buf.take(self.remaining)
            self.remaining -= len(data)
            if not self.remaining:
                self.discard = b"\r\n"
            return Body(data)


def _need_more(buf: ReceiveBuffer, eof: bool, limit: int) -> None:
    """h11's rules while waiting for more of a body: too much unparsed -> 431, EOF -> error."""
    if len(buf) > limit:
        raise _Malformed("receive buffer too long", 431)
    if eof:
        raise _Malformed("peer closed connection without sending complete message body")
    return None


def _plain_chunked(headers: Headers, http_version: bytes) -> bool | None:
    """For a fast-path head with a Transfer-Encoding header: True if the body is chunked
    the way h11 accepts it, None when h11 must decide (any other Transfer-Encoding)."""
    codings = [value for name, value in headers if name == b"transfer-encoding"]
    if not codings:
        return False
    if len(codings) == 1 and codings[0] == b"chunked" and http_version == b"1.1":
        return True
    return None


class _BufferedInput:
    """What both engines share: unread bytes, EOF, the body reader (or the h11 engine a
    message was handed to), and the body writer."""

    def __init__(self, max_header_bytes: int) -> None:
        self._max_header_bytes = max_header_bytes or 65536
        self._buf = ReceiveBuffer()
        self._eof = False
        self._reader = _BodyReader()
        self._writer = _BodyWriter()

    def feed(self, data: bytes) -> None:
        delegate = self._reader.delegate
        if delegate is not None:
            delegate.feed(data)
        elif data:
            self._buf.feed(data)
        else:
            self._eof = True

    def _hand_over(self, delegate: H11ServerEngine | H11ClientEngine, data: bytes) -> None:
        """From here on the h11 engine ``delegate`` reads this message: it gets ``data``
        (the unread bytes, after a made-up head where it needs one) and any EOF seen."""
        delegate.feed(data)
        if self._eof:
            delegate.feed(b"")
        self._reader.delegate = delegate

    def _take_back(self, delegate: H11ServerEngine | H11ClientEngine) -> None:
        """After ``delegate`` read its message: the bytes past it, and the EOF if it saw one."""
        data, closed = delegate.leftover()
        self._buf.feed(data)
        if closed:
            self._eof = True

    def switched_data(self) -> bytes:
        delegate = self._reader.delegate
        return delegate.switched_data() if delegate is not None else self._buf.take_all()

    def _read_framed_body(self, framing: object) -> object:
        """The next event of a Content-Length or chunked body (raises _Malformed)."""
        if framing == _LENGTH:
            return self._reader.sized(self._buf, self._eof)
        return self._reader.chunked(self._buf, self._eof, self._max_header_bytes)


class HttptoolsServerEngine(_BufferedInput, ServerEngine):
    """Client side of a connection: parses requests, writes responses."""

    def __init__(self, max_header_bytes: int = 65536) -> None:
        super().__init__(max_header_bytes)
        self._reading_head = True
        self._request_done = False  # the current request's body has been read
        self._closed = False
        self._method = b""
        self._version: bytes | None = None  # None until a request parsed (then assume HTTP/1.0)
        self._keep_alive = True
        self._response_started = False
        self._response_done = False

    # -- reading requests (feed: _BufferedInput)

    def next_event(self) -> Event | None:
        if self._request_done:
            if self._eof and not self._buf and not self._closed:
                self._closed = True
                return Closed()
            return None  # a pipelined request waits until the response is done
        reader = self._reader
        if reader.delegate is not None:
            return self._delegated_event()
        if self._reading_head:
            return self._next_head()
        framing = reader.framing
        if framing != _NO_BODY:
            try:
                event = self._read_framed_body(framing)
            except _Malformed as exc:
                if exc.status == 431:  # (h11's hint for an over-long line, whatever the state)
                    limit = self._max_header_bytes
                    raise HeadersTooLarge(f"request header section larger than {limit} bytes") from None
                raise BadRequest(f"malformed request: {exc}") from None
            if event is None:
                return None
            if type(event) is Body:
                return event
            if event is _TRAILERS:
                return self._delegate_trailers()
        self._request_done = True
        return _END

    def _delegate_trailers(self) -> Event | None:
        """h11 reads the trailer section (after the head and last chunk it would have seen)."""
        delegate = H11ServerEngine(self._max_header_bytes)
        made_up = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        self._hand_over(delegate, made_up + self._buf.take_all())
        delegate.next_event()  # that head
        return self._delegated_event()

    def _delegated_event(self) -> Event | None:
        reader = self._reader
        delegate = reader.delegate
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
        reader.delegate = None
        if kind is Closed:
            self._closed = True
            return event
        self._take_back(delegate)  # a pipelined request, if any
        self._request_done = True
        return _END

    def _next_head(self) -> Event | None:
        buf = self._buf
        if not buf:
            if self._eof and not self._closed:
                self._closed = True
                return Closed()
            return None
        if buf.first() < 0x21:  # h11 refuses this at once (blank line, whitespace, TLS bytes)
            return self._delegate_request()
        end = buf.find(_HEAD_END, 2)
        if end < 0:
            if len(buf) > self._max_header_bytes or self._eof:
                return self._delegate_request()  # h11 raises 431 / "peer closed"
            return None
        raw = buf.take(end)
        head = self._plain_request(raw)
        if head is None:
            return self._delegate_request(raw)
        reader = self._reader
        if head.chunked:
            reader.start_chunked()
        elif head.content_length:
            reader.framing = _LENGTH
            reader.remaining = head.content_length
        else:
            reader.framing = _NO_BODY
        return head

    def _plain_request(self, raw: bytes) -> RequestHead | None:
        """The head via llhttp, or None when it is not plain (h11 decides then)."""
        line = _PLAIN_REQUEST_LINE.match(raw)
        if line is None:
            return None
        fields = _parse_head(httptools.HttpRequestParser, raw)
        if fields is None:
            return None
        headers = fields.headers
        names = _names(headers)
        end = line.end()
        version = raw[end - 5 : end - 2]  # "HTTP/1.x\r\n", as llhttp read it
        if names.count(b"host") != 1 or (b"transfer-encoding" in names and _plain_chunked(headers, version) is None):
            return None
        method = self._method = raw[: raw.index(b" ")]  # (also when refused: HEAD's answer has no body)
        head = request_head(method, fields.target, version, headers, self._max_header_bytes, names)
        self._start_request(head, names)
        return head

    def _delegate_request(self, head: bytes = b"") -> Event | None:
        """Hand this request to the h11 engine: its head (or its refusal) and its body
        (``head``: its bytes, when already taken from the buffer)."""
        self._hand_over(H11ServerEngine(self._max_header_bytes), head + self._buf.take_all())
        return self._delegated_event()

    def _start_request(self, head: RequestHead, names: list[bytes] | None = None) -> None:
        self._reading_head = False
        self._method = head.method
        self._version = head.http_version
        if names is None:
            names = _names(head.headers)
        self._keep_alive = not _wants_close(head.headers, names, head.http_version)

    # -- writing responses

    def send_head(self, head: ResponseHead) -> bytes:
        status = head.status
        if head.raw and self._keep_alive and self._version == b"1.1" and self._method != b"HEAD":
            # Relayed as received: _frame_response would change nothing in it but its
            # spelling (names' case, spaces), which nginx also passes through as sent.
            writer = self._writer
            writer.framing = _LENGTH
            writer.remaining = head.content_length
            self._response_started = True
            return head.raw
        start = b"HTTP/1.1 %d %s\r\n" % (status, head.reason)
        if status < 200:
            return _serialise_head(start, head.headers)
        headers = head.headers
        if head.raw:  # re-framed after all (closing, HTTP/1.0, HEAD): its Connection / Keep-Alive go
            headers = without_connection_management(headers)
        headers = self._frame_response(status, headers)  # (never changed in place)
        lines = _header_lines(headers)
        if not _sendable(lines, len(headers) + 1):
            raise BadGateway("upstream response cannot be relayed: illegal header")
        self._response_started = True
        return start + lines

    def _frame_response(self, status: int, headers: Headers) -> Headers:
        """Choose the response framing and fix its headers as h11 does."""
        method = self._method
        writer = self._writer
        need_close = False
        framing = _LENGTH
        names = _names(headers)
        if status in (204, 304) or (method == b"CONNECT" and 200 <= status < 300):
            framing = _NO_BODY
            writer.remaining = 0
        else:
            chunked = b"transfer-encoding" in names
            lengths = _content_lengths(headers, names)
            if lengths and not chunked:
                writer.remaining = int(lengths[0])
            else:
                headers = [(n, v) for n, v in headers if n != b"content-length" and n != b"transfer-encoding"]
                names = _names(headers)
                if self._version is None or self._version < b"1.1":
                    framing = _UNTIL_CLOSE
                    need_close = method != b"HEAD"
                else:
                    framing = _CHUNKED
                    headers.append((b"transfer-encoding", b"chunked"))
        if method == b"HEAD":
            framing = _DISCARD
            writer.remaining = 0
        writer.framing = framing
        if need_close or not self._keep_alive or (b"connection" in names and _has_connection_close(headers, names)):
            self._keep_alive = False
            tokens = set(comma_values(headers, b"connection"))
            tokens.discard(b"keep-alive")
            tokens.add(b"close")
            headers = [(n, v) for n, v in headers if n != b"connection"]
            headers.append((b"connection", b", ".join(sorted(tokens))))
        return headers

    def send_body(self, data: bytes) -> Sequence[bytes]:
        return self._writer.body(data, _unrelayable)

    def send_end(self) -> bytes:
        self._response_done = True
        return self._writer.end(_unrelayable)

    @property
    def request_complete(self) -> bool:
        return self._request_done

    @property
    def can_respond(self) -> bool:
        return not self._response_started

    def start_next_cycle(self) -> bool:
        if not (self._request_done and self._response_done and self._keep_alive) or self._closed:
            return False
        self._reading_head = True
        self._request_done = self._response_started = self._response_done = False
        self._reader.framing = _NO_BODY
        self._method = b""  # an error answer before the next head is a GET's (as in h11)
        return True


def _has_connection_close(headers: Headers, names: list[bytes]) -> bool:
    """``close`` among the Connection tokens (h11's rule), without a loop for the usual
    single plain value such as ``keep-alive``."""
    if names.count(b"connection") == 1:
        value = headers[names.index(b"connection")][1].lower()
        if b"," not in value:
            return value.strip() == b"close"
    return b"close" in comma_values(headers, b"connection")


def _relayable(raw: bytes, headers: Headers, names: list[bytes]) -> bytes:
    """``raw`` as the client may get it: without its Connection and Keep-Alive lines
    (most servers send ``Connection: keep-alive``), or b"" when anything else in it is
    for this hop only (``ClientEngine.next_event``)."""
    if HOP_BY_HOP.isdisjoint(names):
        return raw
    if not OTHER_HOP_BY_HOP.isdisjoint(names):
        return b""
    if b"connection" in names and not _KEEP_ALIVE_OR_CLOSE.issuperset(comma_values(headers, b"connection")):
        return b""  # it names headers to drop
    return _CONNECTION_LINES.sub(b"", raw)


def _unrelayable(message: str) -> BadGateway:
    return BadGateway(f"upstream response cannot be relayed: {message}")


def _unsendable(message: str) -> BadGateway:
    return BadGateway(f"request cannot be sent upstream: {message}")


class HttptoolsClientEngine(_BufferedInput, ClientEngine):
    """Upstream side of a pooled connection: writes requests, parses responses."""

    def __init__(self, max_header_bytes: int = 65536) -> None:
        super().__init__(max_header_bytes)
        self._method = b""
        self._upgrade_asked = False
        self._keep_alive = True
        self._reading_head = True
        self._response_done = False
        self._request_done = False
        self._switched = False
        self._request_host = b""
        self._names: list[bytes] = []  # of the response head being started

    # -- writing requests

    def send_head(self, head: RequestHead, headers: Headers, target: bytes) -> bytes:
        writer = self._writer
        if head.content_length is not None:
            writer.framing = _LENGTH
            writer.remaining = head.content_length
        elif head.chunked:
            writer.framing = _CHUNKED
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        else:
            writer.framing = _NO_BODY
            writer.remaining = 0
        names = _names(headers)
        if names.count(b"host") != 1:
            raise _unsendable("exactly one Host header is needed")
        at = names.index(b"host")
        if at:  # Host first, like h11 (some servers look for it there).
            headers = [headers[at], *headers[:at], *headers[at + 1 :]]
        wire = b"%s %s HTTP/1.1\r\n" % (head.method, target) + _header_lines(headers)
        if not _sendable(wire, len(headers) + 2) or b" " in target:
            raise _unsendable("illegal byte in the request head")
        self._method = head.method
        self._request_host = headers[0][1]
        self._upgrade_asked = b"upgrade" in names
        self._keep_alive = not (b"connection" in names and b"close" in comma_values(headers, b"connection"))
        return wire

    def send_body(self, data: bytes) -> Sequence[bytes]:
        return self._writer.body(data, _unsendable)

    def send_end(self) -> bytes:
        self._request_done = True
        return self._writer.end(_unsendable)

    # -- reading responses (feed: _BufferedInput)

    def next_event(self) -> Event | None:
        if self._switched or self._response_done:
            return None
        reader = self._reader
        if reader.delegate is not None:
            return self._delegated_event()
        if self._reading_head:
            return self._next_head()
        framing = reader.framing
        if framing == _LENGTH or framing == _CHUNKED:
            try:
                event = self._read_framed_body(framing)
            except _Malformed as exc:
                raise BadGateway(f"upstream broke the protocol: {exc}") from None
            if event is None or type(event) is Body:
                return event
            if event is _TRAILERS:
                return self._delegate_trailers()
        elif framing == _UNTIL_CLOSE:
            if self._buf:
                return Body(self._buf.take_all())
            if not self._eof:
                return None
        self._response_done = True
        return _END

    def _delegate_trailers(self) -> Event | None:
        """h11 reads the trailer section (after the head and last chunk it would have seen)."""
        made_up = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        method, self._method = self._method, b"GET"
        try:
            self._delegate_response(made_up)  # that head
        finally:
            self._method = method
        return self._delegated_event()

    def _delegated_event(self) -> Event | None:
        reader = self._reader
        delegate = reader.delegate
        event = delegate.next_event()
        kind = type(event)
        if event is None or kind is Body:
            return event
        if kind is ResponseHead:
            if event.status == 101:
                self._switched = True
            elif event.status >= 200:
                self._reading_head = False
            return event
        if kind is Closed:
            return event
        self._take_back(delegate)
        if not delegate.start_next_cycle():
            self._keep_alive = False
        reader.delegate = None
        self._response_done = True
        return _END

    def _next_head(self) -> Event | None:
        buf = self._buf
        if not buf:
            if self._eof:
                return self._delegate_response()  # h11 decides what an early close means
            return None
        end = buf.find(_HEAD_END, 2)
        if end < 0:
            if len(buf) > self._max_header_bytes or self._eof or buf.first() < 0x21:
                return self._delegate_response()
            return None
        raw = buf.take(end)
        head = self._plain_response(raw)
        if head is None:
            return self._delegate_response(raw)
        return self._start_response(head, raw)

    def _plain_response(self, raw: bytes) -> ResponseHead | None:
        if _PLAIN_STATUS_LINE.match(raw) is None:
            return None
        fields = _parse_head(httptools.HttpResponseParser, raw)
        if fields is None:
            return None
        headers = fields.headers
        names = _names(headers)
        version = raw[5:8]  # "HTTP/1.x ", as llhttp read it
        if b"transfer-encoding" in names and _plain_chunked(headers, version) is None:
            return None
        status = int(raw[9:12])  # the plain status line's three digits, as llhttp read them
        if status == 101 and not self._upgrade_asked:
            return None  # h11 refuses a switch nobody proposed
        if _wants_close(headers, names, version):
            self._keep_alive = False
        self._names = names
        return ResponseHead(status, headers, fields.reason)

    def _start_response(self, head: ResponseHead, raw: bytes) -> Event:
        status = head.status
        if status < 200:
            if status == 101:
                self._switched = True
            return head
        self._reading_head = False
        reader = self._reader
        if status in (204, 304) or self._method == b"HEAD" or (self._method == b"CONNECT" and status < 300):
            reader.framing = _NO_BODY
        elif b"transfer-encoding" in self._names:
            reader.start_chunked()  # (_plain_chunked let only a lone "chunked" through)
        else:
            lengths = _content_lengths(head.headers, self._names)
            if lengths:
                reader.framing = _LENGTH
                reader.remaining = length = int(lengths[0])
                if not length:
                    reader.framing = _NO_BODY
                if len(lengths) == 1 and raw[5:8] == b"1.1" and head.reason:
                    head.raw = _relayable(raw, head.headers, self._names)
                    head.content_length = length
            else:
                reader.framing = _UNTIL_CLOSE
                self._keep_alive = False
        return head

    def _delegate_response(self, head: bytes = b"") -> Event | None:
        """Hand this response to the h11 engine (its verdict, its events), primed with
        the request it answers so it frames HEAD / Upgrade answers the same way
        (``head``: bytes to put before the unread ones)."""
        delegate = H11ClientEngine(self._max_header_bytes)
        host = [(b"host", self._request_host)]
        upgrade = [(b"upgrade", b"x"), (b"connection", b"upgrade")] if self._upgrade_asked else []
        delegate.send_head(RequestHead(self._method, b"/", host), [*host, *upgrade], b"/")
        delegate.send_end()
        self._hand_over(delegate, head + self._buf.take_all())
        return self._delegated_event()

    def start_next_cycle(self) -> bool:
        if not (self._request_done and self._response_done and self._keep_alive) or self._buf or self._eof:
            return False
        self._reading_head = True
        self._request_done = self._response_done = False
        return True
