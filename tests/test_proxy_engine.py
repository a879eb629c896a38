"""The h11 engine and the redirect rule, in memory (no sockets)."""

from __future__ import annotations

import h11
import pytest

from proxy.errors import BadGateway, BadRequest, HeadersTooLarge
from proxy.http.engine import Body, EndOfMessage, RequestHead, ResponseHead
from proxy.http.engines import engine_factory
from proxy.server.redirect import redirect_location

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools

ENGINES = engine_factory("h11")


def events(engine, data: bytes) -> list:
    engine.feed(data)
    out = []
    while (event := engine.next_event()) is not None:
        out.append(event)
        if type(event) is EndOfMessage:
            break
    return out


def test_request_head_and_body_framing():
    engine = ENGINES.server(65536)
    head, body, end = events(
        engine, b"POST /x?q=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert (head.method, head.target, head.chunked, head.content_length) == (b"POST", b"/x?q=1", True, None)
    assert head.header(b"host") == b"a"
    assert bytes(body.data) == b"abc" and type(end) is EndOfMessage


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    ],
    ids=["cl+te", "two-cl", "ctl-byte", "space-in-name", "te-not-chunked", "no-host"],
)
def test_ambiguous_or_malformed_requests_are_refused(raw):
    with pytest.raises(BadRequest):
        events(ENGINES.server(65536), raw)


def test_same_content_length_twice_is_fine():
    head, _body, _end = events(
        ENGINES.server(65536), b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert head.content_length == 3


@pytest.mark.parametrize("complete", [True, False])
def test_header_limit_applies_to_complete_and_incomplete_heads(complete):
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2000 + (b"\r\n\r\n" if complete else b"")
    with pytest.raises(HeadersTooLarge):
        events(ENGINES.server(1024), raw)
    head, _end = events(ENGINES.server(4096), raw + (b"" if complete else b"\r\n\r\n"))
    assert len(head.header(b"x-big")) == 2000


def test_pipelined_request_waits_for_the_response():
    engine = ENGINES.server(65536)
    first = events(engine, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert first[0].target == b"/1" and engine.next_event() is None
    engine.send_head(ResponseHead(200, [(b"content-length", b"0")]))
    engine.send_end()
    assert engine.start_next_cycle()
    assert engine.next_event().target == b"/2"


def test_client_engine_reframes_a_chunked_request_and_parses_the_response():
    server = ENGINES.server(65536)
    head, body, end = events(
        server, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    client = ENGINES.client(65536)
    headers = [(k, v) for k, v in head.headers if k != b"transfer-encoding"]
    wire = client.send_head(head, headers, b"/up") + b"".join(client.send_body(body.data)) + client.send_end()
    upstream = h11.Connection(h11.SERVER)
    upstream.receive_data(wire)
    request = upstream.next_event()
    assert request.target == b"/up" and (b"transfer-encoding", b"chunked") in list(request.headers)
    assert bytes(upstream.next_event().data) == b"abc"
    client.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    response = client.next_event()
    assert isinstance(response, ResponseHead) and response.status == 204
    assert type(client.next_event()) is EndOfMessage
    assert client.start_next_cycle()


def test_client_engine_reports_a_broken_upstream():
    client = ENGINES.client(65536)
    client.send_head(RequestHead(b"GET", b"/", [(b"host", b"a")]), [(b"host", b"a")], b"/")
    client.send_end()
    client.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert isinstance(client.next_event(), ResponseHead)
    assert type(client.next_event()) is Body
    client.feed(b"")
    with pytest.raises(BadGateway):
        client.next_event()


@pytest.mark.parametrize(
    ("host", "target", "port", "expected"),
    [
        (b"example.com:8080", b"/a?b=1", 8443, b"https://example.com:8443/a?b=1"),
        (b"Example.com", b"/", 443, b"https://example.com/"),
        (b"[::1]:8080", b"/x", 9443, b"https://[::1]:9443/x"),
        (b"localhost", b"http://localhost:8080/p?q", 8443, b"https://localhost:8443/p?q"),
    ],
)
def test_redirect_location(host, target, port, expected):
    assert redirect_location(host, target, port) == expected


@pytest.mark.parametrize("host", [None, b"", b"evil.com/x", b"a@b"])
def test_redirect_refuses_hosts_that_would_send_the_client_elsewhere(host):
    with pytest.raises(BadRequest):
        redirect_location(host, b"/", 8443)
