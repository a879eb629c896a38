"""The one place a message is handed to h11: what the fast path does not read itself.

The httptools engine reads plain messages itself; anything else — a head llhttp refuses
or that is not plain, a trailer section — is read by the h11 engine (the reference), for
that one message: its verdict and its events are the answer, so both engines refuse the
same messages by construction, and the rare path costs what h11 costs.

h11 reads a message only after the head it belongs to, so some hand-overs fabricate
wire text: a trailer section follows a made-up head and last chunk; a response follows
the request it answers (its method and Upgrade matter to how h11 frames it). Once the
message ends, ``take_back`` returns the bytes past it and whether the peer has closed.
"""

from __future__ import annotations

from proxy.http.engine import RequestHead
from proxy.http.h11_engine import H11ClientEngine, H11ServerEngine

Fallback = H11ServerEngine | H11ClientEngine

# What h11 reads before a trailer section handed to it: a head, a body's last chunk.
_TRAILERS_AFTER_REQUEST = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
_TRAILERS_AFTER_RESPONSE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"


def _fed(delegate: Fallback, data: bytes, eof: bool) -> Fallback:
    delegate.feed(data)
    if eof:
        delegate.feed(b"")
    return delegate


def request(data: bytes, eof: bool, max_header_bytes: int) -> H11ServerEngine:
    """h11 reads a request from its first byte (``data``; ``eof``: the client has closed)."""
    return _fed(H11ServerEngine(max_header_bytes), data, eof)


def request_trailers(data: bytes, eof: bool, max_header_bytes: int) -> H11ServerEngine:
    """h11 reads a request's trailer section (``data`` starts with it)."""
    delegate = _fed(H11ServerEngine(max_header_bytes), _TRAILERS_AFTER_REQUEST + data, eof)
    delegate.next_event()  # the made-up head
    return delegate


def response(
    data: bytes, eof: bool, max_header_bytes: int, method: bytes, host: bytes, upgrade_asked: bool
) -> H11ClientEngine:
    """h11 reads a response from its first byte, primed with the request it answers
    (``method``, ``host``, whether it asked for an Upgrade) so it frames HEAD and
    Upgrade answers the way the fast path would."""
    delegate = H11ClientEngine(max_header_bytes)
    headers = [(b"host", host)]
    upgrade = [(b"upgrade", b"x"), (b"connection", b"upgrade")] if upgrade_asked else []
    delegate.send_head(RequestHead(method, b"/", headers), [*headers, *upgrade], b"/")
    delegate.send_end()
    return _fed(delegate, data, eof)


def response_trailers(data: bytes, eof: bool, max_header_bytes: int, host: bytes) -> H11ClientEngine:
    """h11 reads a response's trailer section (``data`` starts with it)."""
    delegate = response(_TRAILERS_AFTER_RESPONSE + data, eof, max_header_bytes, b"GET", host, False)
    delegate.next_event()  # the made-up head
    return delegate


def take_back(delegate: Fallback) -> tuple[bytes, bool]:
    """After h11 read its message: the bytes received past it, and whether the peer closed."""
    return delegate.leftover()
