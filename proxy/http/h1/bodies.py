"""HTTP/1 message bodies: Content-Length and chunked readers and writers.

The reader reads as h11 reads (its chunk-size grammar, its "too much unparsed" 431, its
early-EOF error), so a body gets the same verdict on either engine; a trailer section
is not read here but reported (``TRAILERS``) for h11 to read (``proxy.http.h1.fallback``).
The writer frames what a proxy sends and refuses more or less body than a declared
Content-Length.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from proxy.http.engine import Body, EndOfMessage
from proxy.http.h1.receive import ReceiveBuffer

# Body framings, for reading and for writing (ints: compared on every body event).
NO_BODY = 0  # nothing follows the head
LENGTH = 1  # Content-Length bytes
CHUNKED = 2
UNTIL_CLOSE = 3  # a response ended by the upstream closing (HTTP/1.0 style)
DISCARD = 4  # (writing) the answer to HEAD: any body handed to the writer is not sent

END = EndOfMessage()
TRAILERS = object()  # the last chunk is followed by trailer lines: h11 reads them
# h11's chunk-size line (its ``chunk_header``), so chunked bodies read the same here.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")
_CRLF = re.compile(rb"\r\n")


class Malformed(Exception):
    """A body the reader cannot frame; ``status`` 431 where h11 would hint it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class BodyWriter:
    """Frames the body of the message being sent (either direction)."""

    __slots__ = ("framing", "remaining")

    def __init__(self) -> None:
        self.framing = NO_BODY
        self.remaining = 0

    def body(self, data: bytes, error: Callable[[str], Exception]) -> Sequence[bytes]:
        framing = self.framing
        if framing == CHUNKED:
            return (b"%x\r\n" % len(data), data, b"\r\n") if data else ()
        if framing == UNTIL_CLOSE:
            return (data,)
        if framing == DISCARD:
            return ()
        if len(data) > self.remaining:  # LENGTH and NO_BODY (a length of 0)
            raise error("too much data for declared Content-Length")
        self.remaining -= len(data)
        return (data,)

    def end(self, error: Callable[[str], Exception]) -> bytes:
        if self.framing == CHUNKED:
            return b"0\r\n\r\n"
        if self.framing < UNTIL_CLOSE and self.remaining:
            raise error("too little data for declared Content-Length")
        return b""


class BodyReader:
    """Reads one message body out of a ``ReceiveBuffer``."""

    __slots__ = ("framing", "remaining", "discard", "last_chunk")

    def __init__(self) -> None:
        self.framing = NO_BODY
        self.remaining = 0
        self.discard = b""  # the CRLF still expected after a chunk's data
        self.last_chunk = False

    def start(self, framing: int, length: int = 0) -> None:
        self.framing = framing
        self.remaining = length
        self.discard = b""
        self.last_chunk = False

    def read(self, buf: ReceiveBuffer, eof: bool, limit: int) -> object:
        """The next step through the body: a ``Body``, ``END``, None for more data, or
        ``TRAILERS``; raises ``Malformed``. ``limit``: unparsed bytes allowed (h11's)."""
        framing = self.framing
        if framing == LENGTH:
            data = buf.take(self.remaining)
            if not data:
                if eof:
                    raise Malformed("peer closed connection without sending complete message body")
                return None
            self.remaining -= len(data)
            if not self.remaining:
                self.framing = NO_BODY
            return Body(data)
        if framing == CHUNKED:
            return self._chunked(buf, eof, limit)
        if framing == UNTIL_CLOSE:
            if buf:
                return Body(buf.take_all())
            return END if eof else None
        return END

    def _chunked(self, buf: ReceiveBuffer, eof: bool, limit: int) -> object:
        """A chunked body, read as h11 reads it."""
        while True:
            if self.discard:
                size = min(len(self.discard), len(buf))
                if buf.peek(size) != self.discard[:size]:
                    raise Malformed("malformed chunk footer")
                self.discard = self.discard[size:]
                buf.take(size)
                if self.discard:
                    return _need_more(buf, eof, limit)
            if self.last_chunk:
                if buf.startswith(b"\n"):
                    buf.take(1)
                    self.framing = NO_BODY
                    return END
                if buf.startswith(b"\r\n"):
                    buf.take(2)
                    self.framing = NO_BODY
                    return END
                if not buf or (len(buf) == 1 and buf.startswith(b"\r") and not eof):
                    return _need_more(buf, eof, limit)
                return TRAILERS
            if not self.remaining:
                end = buf.find(_CRLF, 1)
                if end < 0:
                    return _need_more(buf, eof, limit)
                match = buf.match(_CHUNK_SIZE_LINE, end)
                if match is None:
                    raise Malformed("illegal chunk header")
                self.remaining = int(match.group(1), 16)
                buf.take(end)
                if not self.remaining:
                    self.last_chunk = True
                    continue
            data = buf.take(self.remaining)
            if not data:
                return _need_more(buf, eof, limit)
            self.remaining -= len(data)
            if not self.remaining:
                self.discard = b"\r\n"
            return Body(data)


def _need_more(buf: ReceiveBuffer, eof: bool, limit: int) -> None:
    """h11's rules while waiting for more of a body: too much unparsed -> 431, EOF -> error."""
    if len(buf) > limit:
        raise Malformed("receive buffer too long", 431)
    if eof:
        raise Malformed("peer closed connection without sending complete message body")
    return None
