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


# -- framing an upstream may read differently: 400, nothing forwarded


def server_verdict(factory: EngineFactory, raw: bytes):
    """The request head ``raw`` parses to, or the refusal's status."""
    engine = factory.server(65536)
    engine.feed(raw)
    try:
        return engine.next_event()
    except HTTPError as exc:
        return exc.status


@pytest.mark.parametrize(
    "length",
    [b"9007199254740992", b"9007199254740993", b"18446744073709551616", b"99999999999999999999"],
)
def test_content_length_of_2_to_the_53_or_more_is_refused(engine, length):
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + length + b"\r\n\r\n"
    assert server_verdict(engine, raw) == 400


def test_content_length_just_below_2_to_the_53_is_accepted(engine):
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9007199254740991\r\n\r\n"
    assert server_verdict(engine, raw).content_length == (1 << 53) - 1


@pytest.mark.parametrize(
    "name", [b"Content_Length", b"content_length", b"Transfer_Encoding", b"TRANSFER_ENCODING", b"tRaNsFeR_eNcOdInG"]
)
def test_framing_names_spelled_with_underscores_are_refused(engine, name):
    raw = b"POST / HTTP/1.1\r\nHost: a\r\n" + name + b": 3\r\nContent-Length: 3\r\n\r\nabc"
    assert server_verdict(engine, raw) == 400


@pytest.mark.parametrize("name", [b"X_Forwarded_Thing", b"Content_Type", b"_host", b"Host_Name"])
def test_other_names_with_underscores_are_forwarded(engine, name):
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + name + b": 1\r\n\r\n"
    assert server_verdict(engine, raw).header(name.lower()) == b"1"


@pytest.mark.parametrize(
    "host",
    [b"", b"a/b", b"a@b", b"user:pass@a", b"a b", b"a:1:2", b"a:", b"a:x", b"a:65536", b"a:-1", b"[::1", b"::1]",
     b"::1", b"[::1]x", b"[::1]:", b"[a.example]", b"[::1%25eth0]", b"a,b", b"a;b", b"%61", b"a?b", b"a#b", b"a\\b",
     b'"a"'],
)
def test_a_host_that_is_not_host_port_is_refused(engine, host):
    raw = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    assert server_verdict(engine, raw) == 400


@pytest.mark.parametrize(
    "host",
    [b"a", b"A.Example.COM", b"a.example:8443", b"127.0.0.1", b"127.0.0.1:1", b"[::1]", b"[::1]:65535",
     b"[2001:db8::1]:443", b"xn--bcher-kva.example", b"under_score.example", b"trailing.dot.", b"a:0"],
)
def test_a_plain_host_is_accepted(engine, host):
    raw = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    assert server_verdict(engine, raw).header(b"host") == host


# -- a refused HEAD request still gets its answer, without a body

REFUSED_HEADS = {
    "bad-host": b"HEAD / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "ctl-in-value": b"HEAD / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    "te-underscore": b"HEAD / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n",
    "bad-host-delegated": b"HEAD / HTTP/1.1\r\nHost: a/b\r\nX: a\r\n b\r\n\r\n",  # obs-fold: h11 reads it
}


def answer(engine, status: int, body: bytes) -> bytes:
    """What the proxy writes for an error (Downstream.send_simple's shape)."""
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
    wire = engine.send_head(ResponseHead(status, headers, b"Refused"))
    return wire + b"".join(engine.send_body(body)) + engine.send_end()


@pytest.mark.parametrize("raw", REFUSED_HEADS.values(), ids=REFUSED_HEADS.keys())
def test_a_refused_head_request_gets_its_status_line_and_no_body(engine, raw):
    server = engine.server(65536)
    server.feed(raw)
    with pytest.raises(HTTPError) as caught:
        server.next_event()
    wire = answer(server, caught.value.status, b"refused\n")
    assert wire.startswith(b"HTTP/1.1 400 ") and wire.endswith(b"\r\n\r\n")
    assert b"refused\n" not in wire


def test_an_answer_to_an_accepted_head_request_has_no_body(engine):
    server = engine.server(65536)
    server.feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert server.next_event().method == b"HEAD"
    wire = answer(server, 404, b"no service\n")
    assert wire.startswith(b"HTTP/1.1 404 ") and wire.endswith(b"\r\n\r\n") and b"no service" not in wire


def test_a_request_refused_after_a_head_request_gets_its_body(engine):
    server = engine.server(65536)
    server.feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    server.next_event()
    server.next_event()
    server.send_head(ResponseHead(200, [(b"content-length", b"5")]))
    server.send_end()
    assert server.start_next_cycle()
    server.feed(b"GET / HTTP/1.1\r\nX A: b\r\n\r\n")
    with pytest.raises(HTTPError):
        server.next_event()
    assert answer(server, 400, b"refused\n").endswith(b"\r\n\r\nrefused\n")


# -- hop-by-hop response headers never reach the client (SPEC 4, last bullet)

KEEP_ALIVE_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5, max=100\r\n"
    b"Content-Length: 2\r\n\r\nok"
)
CLIENTS = {
    "keep-alive": b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "connection-close": b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "http10": b"GET / HTTP/1.0\r\n\r\n",
    "http10-keep-alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", CLIENTS.values(), ids=CLIENTS.keys())
def test_keep_alive_lines_from_the_upstream_never_reach_the_client(engine, request_bytes):
    from proxy.forwarding.headers import downstream_response_headers

    upstream = engine.client(65536)
    headers = [(b"host", b"a")]
    upstream.send_head(RequestHead(b"GET", b"/", headers), headers, b"/")
    upstream.send_end()
    upstream.feed(KEEP_ALIVE_RESPONSE)
    head = upstream.next_event()
    if not head.raw:  # as the relay does: a head not relayed as received loses its hop-by-hop headers
        head = ResponseHead(head.status, downstream_response_headers(head.headers), head.reason)
    server = engine.server(65536)
    server.feed(request_bytes)
    while type(server.next_event()) is not EndOfMessage:
        pass
    wire = server.send_head(head)
    sent = wire.lower()
    assert b"keep-alive:" not in sent and b"connection: keep-alive" not in sent
    assert b"content-type: text/plain" in sent and b"content-length: 2" in sent


# -- EOF seen while h11 reads a message (httptools hands such messages over) is kept

OBS_FOLD_GET = b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"  # h11 reads it on both engines


def answered(server) -> None:
    server.send_head(ResponseHead(200, [(b"content-length", b"0")]))
    server.send_end()


def test_eof_during_a_message_read_by_h11_ends_the_connection_after_it(engine):
    server = engine.server(65536)
    server.feed(OBS_FOLD_GET)
    assert type(server.next_event()) is RequestHead
    server.feed(b"")  # the client closed its side while h11 had the message
    assert type(server.next_event()) is EndOfMessage
    answered(server)
    if server.start_next_cycle():
        assert type(server.next_event()) is Closed


def test_eof_after_a_truncated_pipelined_request_is_a_bad_request(engine):
    server = engine.server(65536)
    server.feed(OBS_FOLD_GET + b"GET /2 HTTP/1.1\r\nHo")
    assert type(server.next_event()) is RequestHead
    server.feed(b"")
    assert type(server.next_event()) is EndOfMessage
    answered(server)
    assert server.start_next_cycle()
    with pytest.raises(HTTPError) as caught:
        server.next_event()
    assert caught.value.status == 400


def test_an_upstream_that_closed_during_a_response_read_by_h11_is_not_pooled(engine):
    upstream = engine.client(65536)
    headers = [(b"host", b"a")]
    upstream.send_head(RequestHead(b"GET", b"/", headers), headers, b"/")
    upstream.send_end()
    upstream.feed(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\n")
    assert isinstance(upstream.next_event(), ResponseHead)
    upstream.feed(b"ok")
    upstream.feed(b"")
    events = []
    while (event := upstream.next_event()) is not None:
        events.append(event)
        if type(event) is EndOfMessage:
            break
    assert [type(e) for e in events] == [Body, EndOfMessage]
    assert upstream.start_next_cycle() is False


# -- the httptools engine's states move only as its transition tables say


def test_the_httptools_engine_states_move_only_along_their_tables():
    from test_engine_parity import REQUESTS, RESPONSES

    from proxy.http import httptools_engine as engine_module

    moves = set()

    def recording(cls):
        class Recording(cls):
            def __setattr__(self, name, value):
                if name in ("_reading", "_writing") and name in self.__dict__:
                    moves.add((name, self.__dict__[name], value))
                super().__setattr__(name, value)

        return Recording

    server_class = recording(engine_module.HttptoolsServerEngine)
    client_class = recording(engine_module.HttptoolsClientEngine)
    for raw in REQUESTS.values():
        server = server_class(65536)
        for piece in (raw, b""):
            server.feed(piece)
            try:
                while (event := server.next_event()) is not None:
                    if type(event) is EndOfMessage:
                        server.send_head(ResponseHead(200, [(b"content-length", b"0")]))
                        server.send_end()
                        server.start_next_cycle()
            except HTTPError:
                break
    for method, raw in RESPONSES.values():
        client = client_class(65536)
        headers = [(b"host", b"a")]
        client.send_head(RequestHead(method, b"/", headers), headers, b"/")
        client.send_end()
        for piece in (raw, b""):
            client.feed(piece)
            try:
                while (event := client.next_event()) is not None:
                    if type(event) is EndOfMessage:
                        client.start_next_cycle()
            except HTTPError:
                break
    tables = {"_reading": engine_module.READ_TRANSITIONS, "_writing": engine_module.WRITE_TRANSITIONS}
    illegal = {(name, old, new) for name, old, new in moves if old is not new and new not in tables[name][old]}
    assert not illegal
    seen_reads = {(old, new) for name, old, new in moves if name == "_reading" and old is not new}
    assert len(seen_reads) >= 8  # the corpus exercises most of the table


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 \r\nX-Empty:\r\nX-Spaces:  a  b \t\r\nSet-Cookie: a=b; Path=/\r\nset-cookie: c=d\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: http://x/\xc3\xa9\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_a_plain_response_head_lists_its_headers_as_the_tokeniser_would(raw):
    """The httptools engine splits a response's header list from its bytes only when
    asked (LazyResponseHead): the same list llhttp's callbacks give, equal to a
    ResponseHead with it either way round, and dataclasses.replace still works."""
    import dataclasses

    import httptools

    from proxy.http.h1.heads import plain_response

    class Callbacks:  # what the tokeniser calls back, one call per header
        def __init__(self):
            self.headers, self.reason = [], b""

        def on_status(self, reason):
            self.reason += reason

        def on_header(self, name, value):
            self.headers.append((name.lower(), value.rstrip(b" \t")))

    head = plain_response(raw, False)[0]
    fields = Callbacks()
    httptools.HttpResponseParser(fields).feed_data(raw)
    eager = ResponseHead(head.status, fields.headers, fields.reason)
    assert head.headers == fields.headers and head.reason == fields.reason
    assert head == eager and eager == head
    assert dataclasses.replace(head, raw=b"x") == eager
    head.headers = [(b"x", b"1")]
    assert head.headers == [(b"x", b"1")] and head != eager


def test_a_relayed_response_head_loses_exactly_its_connection_lines():
    """``relayable`` cuts a lone Connection line with finds, anything else with the
    regex: the bytes are the regex substitution's either way, or b"" (re-framed) when a
    Connection token names a header to drop."""
    import random

    from proxy.http.h1.heads import plain_response
    from proxy.http.h1.hop_by_hop import CONNECTION_LINES, relayable

    random.seed(5)
    lines = [b"Server: x", b"Connection: keep-alive", b"connection:close", b"Keep-Alive: timeout=5",
             b"X-Connection: a", b"Content-Length: 5", b"CONNECTION:  Keep-Alive  ", b"Connection: x-drop"]
    lone = 0
    for _ in range(3000):
        chosen = random.sample(lines, random.randint(0, len(lines)))
        raw = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in chosen) + b"\r\n"
        _head, control, names = plain_response(raw, False)
        relayed = relayable(raw, control, names)
        if b"Connection: x-drop" in chosen:
            assert relayed == b""
        else:
            assert relayed == CONNECTION_LINES.sub(b"", raw)
            lone += names.count(b"connection") == 1 and b"keep-alive" not in names
    assert lone > 100  # (the find path was taken)


def test_a_plain_response_heads_framing_headers_are_the_tokenisers():
    """``plain_response`` finds the framing and hop-by-hop headers with one regex over
    the lowercased head, values stripped by the regex itself: exactly what llhttp's
    callbacks give for those names (lowercased, stripped as h11 strips), in order, for
    heads of random lines — several of those headers in a row, empty values, values
    ending in spaces and tabs, names as prefixes of other names."""
    import random

    import httptools

    from proxy.http.h1.heads import plain_response

    control_names = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                     b"proxy-connection", b"te", b"trailer", b"upgrade"}

    class Callbacks:
        def __init__(self):
            self.headers = []

        def on_header(self, name, value):
            self.headers.append((name.lower(), value.rstrip(b" \t")))

    random.seed(7)
    names = [b"Content-Length", b"connection", b"TE", b"Keep-Alive", b"Trailer", b"X-Te", b"Tex",
             b"Server", b"Upgrade", b"Proxy-Connection"]
    values = [b"", b" ", b"5", b"5 \t", b"  keep-alive ", b"close,\tx", b"a b", b"\t"]
    checked = 0
    for _ in range(3000):
        lines = [random.choice(names) + b":" + random.choice(values) for _ in range(random.randint(0, 7))]
        raw = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
        parsed = plain_response(raw, False)
        if parsed is None:  # (refused to the h11 path: a second Content-Length, say)
            continue
        fields = Callbacks()
        httptools.HttpResponseParser(fields).feed_data(raw)
        expected = [(name, value) for name, value in fields.headers if name in control_names]
        assert parsed[1] == expected, raw
        assert parsed[2] == [name for name, _ in expected]
        checked += 1
    assert checked > 1000
