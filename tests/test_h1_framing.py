"""HTTP/1 framing rules both engines must keep, in memory (no sockets).

Each test runs on the h11 and the httptools engine (``engine`` fixture): what a proxy
must refuse, what it must never pool, what it must never relay.
"""

from __future__ import annotations

import pytest

from proxy.errors import HTTPError
from proxy.http.engine import Body, Closed, EndOfMessage, RequestHead, ResponseHead
from proxy.http.engines import EngineFactory, engine_factory


@pytest.fixture(params=["h11", "httptools"])
def engine(request) -> EngineFactory:
    return engine_factory(request.param)


def client_exchange(factory: EngineFactory, method: bytes, raw: bytes, chunk: int = 0):
    """Send a request, feed the response ``raw`` (in one piece, or ``chunk`` bytes at a
    time); the events up to its end and whether the connection may be pooled."""
    engine = factory.client(65536)
    headers = [(b"host", b"a")]
    engine.send_head(RequestHead(method, b"/", headers), headers, b"/")
    engine.send_end()
    pieces = [raw[i : i + chunk] for i in range(0, len(raw), chunk)] if chunk else [raw]
    events = []
    for piece in pieces:
        engine.feed(piece)
        while (event := engine.next_event()) is not None:
            events.append(event)
            if type(event) is EndOfMessage:
                return events, engine.start_next_cycle()
    return events, None


FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"

OVERRUNS = {
    "head-with-body": (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + FORGED),
    "204-with-body": (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n" + FORGED),
    "304-with-body": (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n" + FORGED),
    "more-than-content-length": (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + FORGED),
    "chunked-then-more": (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + FORGED),
    "delegated-then-more": (b"GET", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n" + FORGED),
}


@pytest.mark.parametrize(("method", "raw"), OVERRUNS.values(), ids=OVERRUNS.keys())
def test_a_connection_with_bytes_past_the_response_is_never_pooled(engine, method, raw):
    events, reusable = client_exchange(engine, method, raw)
    assert type(events[-1]) is EndOfMessage
    assert reusable is False


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["head", "204", "length", "chunked"],
)
@pytest.mark.parametrize("chunk", [0, 1], ids=["whole", "byte-by-byte"])
def test_a_clean_response_leaves_the_connection_poolable(engine, method, raw, chunk):
    assert client_exchange(engine, method, raw, chunk)[1] is True
