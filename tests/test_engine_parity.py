"""Both HTTP engines give the same verdict on the same bytes (in memory, no sockets).

Each request below goes through the h11 and the httptools ``ServerEngine``: either both
accept it with the same events, or both refuse it with the same status. Likewise for
responses through each ``ClientEngine``. Smuggling shapes are the point of the table.
"""

from __future__ import annotations

import dataclasses

import pytest

from proxy.errors import HTTPError
from proxy.http.engine import Body, Closed, EndOfMessage, RequestHead, ResponseHead
from proxy.http.engines import engine_factory

H11 = engine_factory("h11")
HTTPTOOLS = engine_factory("httptools")

GET = b"GET / HTTP/1.1\r\nHost: a\r\n"
POST = b"POST / HTTP/1.1\r\nHost: a\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

REQUESTS = {
    "plain-get": GET + b"\r\n",
    "get-with-headers": GET + b"User-Agent: x\r\nAccept: */*\r\nX-Tab:\ta\tb \t\r\n\r\n",
    "absolute-form": b"GET http://a/x?y HTTP/1.1\r\nHost: a\r\n\r\n",
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    "content-length": POST + b"Content-Length: 3\r\n\r\nabc",
    "content-length-zero": POST + b"Content-Length: 0\r\n\r\n",
    "chunked": CHUNKED + b"3\r\nabc\r\n0\r\n\r\n",
    "chunk-extension": CHUNKED + b"3;a=b\r\nabc\r\n0\r\n\r\n",
    "chunk-extension-odd": CHUNKED + b'3;"\x01\r\nabc\r\n0\r\n\r\n',
    "chunk-size-space": CHUNKED + b"3 \r\nabc\r\n0\r\n\r\n",
    "chunk-size-overflow": CHUNKED + b"1ffffffffffffffffffff\r\nabc",
    "chunk-size-negative": CHUNKED + b"-3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-0x": CHUNKED + b"0x3\r\nabc\r\n0\r\n\r\n",
    "chunk-data-too-long": CHUNKED + b"3\r\nabcX\r\n0\r\n\r\n",
    "chunk-bare-lf": CHUNKED + b"3\nabc\n0\n\n",
    "trailers": CHUNKED + b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
    "trailer-obs-fold": CHUNKED + b"0\r\nX-T: a\r\n b\r\n\r\n",
    "trailer-too-long": CHUNKED + b"0\r\nX-T: " + b"a" * 70000,
    "chunks-several": CHUNKED + b"1\r\na\r\n2\r\nbc\r\n0\r\n\r\n",
    "chunk-size-20-digits": CHUNKED + b"00000000000000000003\r\nabc\r\n0\r\n\r\n",
    "chunk-size-21-digits": CHUNKED + b"000000000000000000003\r\nabc\r\n0\r\n\r\n",
    "chunk-size-line-too-long": CHUNKED + b"3;" + b"x" * 70000,
    "last-chunk-bare-lf": CHUNKED + b"3\r\nabc\r\n0\r\n\n",
    "last-chunk-cr-then-eof": CHUNKED + b"3\r\nabc\r\n0\r\n\r",
    "last-chunk-cr-x": CHUNKED + b"3\r\nabc\r\n0\r\n\rX",
    "bad-trailer": CHUNKED + b"3\r\nabc\r\n0\r\nX T: 1\r\n\r\n",
    "cl-and-te": POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-and-cl": POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-identity": POST + b"Transfer-Encoding: identity\r\n\r\n",
    "te-xchunked": POST + b"Transfer-Encoding: xchunked\r\n\r\n",
    "te-gzip-chunked": POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-gzip": POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-chunked-twice": POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-uppercase": POST + b"Transfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-on-http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl-twice-same": POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "cl-twice-different": POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-list-same": POST + b"Content-Length: 3, 3\r\n\r\nabc",
    "cl-list-different": POST + b"Content-Length: 3, 4\r\n\r\nabc",
    "cl-negative": POST + b"Content-Length: -1\r\n\r\n",
    "cl-plus": POST + b"Content-Length: +3\r\n\r\nabc",
    "cl-hex": POST + b"Content-Length: 0x3\r\n\r\nabc",
    "cl-inner-space": POST + b"Content-Length: 1 2\r\n\r\nabc",
    "cl-trailing-space": POST + b"Content-Length: 3 \r\n\r\nabc",
    "cl-20-digits": POST + b"Content-Length: 99999999999999999999\r\n\r\nabc",
    "cl-21-digits": POST + b"Content-Length: 999999999999999999999\r\n\r\nabc",
    "bare-lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare-lf-mixed": b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\rHost: a\r\r\n\r\n",
    "space-before-colon": GET + b"X : a\r\n\r\n",
    "obs-fold": GET + b"X: a\r\n b\r\n\r\n",
    "fold-first-line": b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    "nul-in-value": GET + b"X: a\x00b\r\n\r\n",
    "ctl-in-value": GET + b"X: a\x01b\r\n\r\n",
    "del-in-value": GET + b"X: a\x7fb\r\n\r\n",
    "cr-in-value": GET + b"X: a\rb\r\n\r\n",
    "vt-in-value": GET + b"X: a\x0bb\r\n\r\n",
    "obs-text-value": GET + b"X: \xc3\xa9\r\n\r\n",
    "empty-value": GET + b"X:\r\n\r\n",
    "empty-name": GET + b": x\r\n\r\n",
    "bad-name": GET + b"X@Y: x\r\n\r\n",
    "ctl-in-name": GET + b"X\x01: x\r\n\r\n",
    "no-colon": GET + b"XY\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": GET + b"Host: b\r\n\r\n",
    "http10-no-host": b"GET / HTTP/1.0\r\n\r\n",
    "http10-keep-alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "unknown-method": b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n",
    "lowercase-method": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    "http-1.2": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    "http-0.9-line": b"GET /\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "lowercase-http": b"GET / http/1.1\r\nHost: a\r\n\r\n",
    "two-spaces": b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    "tab-separator": b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "trailing-space-line": b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    "non-ascii-target": b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
    "leading-crlf": b"\r\n" + GET + b"\r\n",
    "tls-bytes": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "garbage-line": b"hello world\r\n\r\n",
    "expect-100": POST + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    "expect-100-http10": b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    "upgrade": GET + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "connect": b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    "long-header": GET + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n",
    "long-incomplete-header": GET + b"X-Big: " + b"a" * 70000,
    "many-headers": GET + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(700)) + b"\r\n",
    "truncated-head": GET,
    "truncated-body": POST + b"Content-Length: 10\r\n\r\nabc",
    "truncated-chunked": CHUNKED + b"3\r\nab",
    "empty": b"",
    "cl-2^53": POST + b"Content-Length: 9007199254740992\r\n\r\nabc",
    "cl-2^53-minus-1": POST + b"Content-Length: 9007199254740991\r\n\r\nabc",
    "cl-underscore": POST + b"Content_Length: 3\r\n\r\nabc",
    "te-underscore": POST + b"Transfer_Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-underscore-lowercase": POST + b"transfer_encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-underscore-and-cl": POST + b"Content-Length: 3\r\nTRANSFER_ENCODING: chunked\r\n\r\nabc",
    "underscore-other-name": GET + b"X_Custom_Name: 1\r\n\r\n",
    "host-uppercase-name": b"GET / HTTP/1.1\r\nHOST: A.Example:8443\r\n\r\n",
    "host-port": b"GET / HTTP/1.1\r\nHost: a.example:8443\r\n\r\n",
    "host-ipv4": b"GET / HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n",
    "host-ipv6": b"GET / HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n",
    "host-empty": b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
    "host-slash": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "host-at": b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
    "host-space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "host-two-ports": b"GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n",
    "host-empty-port": b"GET / HTTP/1.1\r\nHost: a:\r\n\r\n",
    "host-port-not-digits": b"GET / HTTP/1.1\r\nHost: a:8o\r\n\r\n",
    "host-port-too-big": b"GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n",
    "host-unbalanced-bracket": b"GET / HTTP/1.1\r\nHost: [::1:8443\r\n\r\n",
    "host-bare-ipv6": b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n",
    "host-bracketed-not-ipv6": b"GET / HTTP/1.1\r\nHost: [a.example]\r\n\r\n",
    "host-comma": b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n",
    "host-percent": b"GET / HTTP/1.1\r\nHost: %61\r\n\r\n",
    "host-http10": b"GET / HTTP/1.0\r\nHost: a/b\r\n\r\n",
}


def _normalise(event):
    """Events compared by value (h11 hands out bytearrays where httptools has bytes)."""
    if type(event) is Body:
        return ("body", bytes(event.data))
    return event


def run_server(factory, raw: bytes, *, close: bool = True) -> tuple[list, int | None]:
    """Feed ``raw`` then EOF; the events up to the first request's end, and the status
    of the error the engine raised (None when it raised none)."""
    engine = factory.server(65536)
    engine.feed(raw)
    events = []
    try:
        while (event := engine.next_event()) is not None:
            events.append(_normalise(event))
            if type(event) in (EndOfMessage, Closed):
                break
        else:
            if close:
                engine.feed(b"")
                while (event := engine.next_event()) is not None:
                    events.append(_normalise(event))
                    if type(event) in (EndOfMessage, Closed):
                        break
    except HTTPError as exc:
        return events, exc.status
    return events, None


@pytest.mark.parametrize("raw", REQUESTS.values(), ids=REQUESTS.keys())
def test_server_engines_agree(raw):
    expected = run_server(H11, raw)
    assert run_server(HTTPTOOLS, raw) == expected


def _trickle(engine, raw: bytes) -> tuple[list, int | None]:
    """Feed ``raw`` one byte at a time (then EOF) up to the end of the first message:
    the events seen (bodies merged) and the refusal status, if any."""
    events = []
    status = None
    try:
        for i in range(len(raw) + 1):
            engine.feed(raw[i : i + 1])  # the last one is b"": EOF
            while (event := engine.next_event()) is not None:
                events.append(_normalise(event))
                if type(event) in (EndOfMessage, Closed):
                    break
            if events and type(events[-1]) in (EndOfMessage, Closed):
                break
    except HTTPError as exc:
        status = exc.status
    return _merge_bodies(events), status


# Long inputs are covered in one piece above; byte by byte they would only cost time.
SHORT_REQUESTS = {name: raw for name, raw in REQUESTS.items() if len(raw) <= 2000}


@pytest.mark.parametrize("raw", SHORT_REQUESTS.values(), ids=SHORT_REQUESTS.keys())
def test_server_engines_agree_byte_by_byte(raw):
    """The same verdict when the bytes trickle in one at a time."""
    results = []
    for factory in (H11, HTTPTOOLS):
        engine = factory.server(65536)
        results.append(_trickle(engine, raw))
    assert results[1] == results[0]


def _merge_bodies(events: list) -> list:
    merged = []
    for event in events:
        if merged and type(event) is tuple and type(merged[-1]) is tuple:
            merged[-1] = ("body", merged[-1][1] + event[1])
        else:
            merged.append(event)
    return merged


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (REQUESTS["cl-and-te"], 400),
        (REQUESTS["cl-twice-different"], 400),
        (REQUESTS["te-identity"], 400),
        (REQUESTS["te-xchunked"], 400),
        (REQUESTS["te-gzip-chunked"], 400),
        (REQUESTS["space-before-colon"], 400),
        (REQUESTS["nul-in-value"], 400),
        (REQUESTS["ctl-in-value"], 400),
        (REQUESTS["no-host"], 400),
        (REQUESTS["two-hosts"], 400),
        (REQUESTS["chunk-size-negative"], 400),
        (REQUESTS["cl-2^53"], 400),
        (REQUESTS["cl-underscore"], 400),
        (REQUESTS["te-underscore"], 400),
        (REQUESTS["te-underscore-and-cl"], 400),
        (REQUESTS["host-empty"], 400),
        (REQUESTS["host-slash"], 400),
        (REQUESTS["host-at"], 400),
        (REQUESTS["host-space"], 400),
        (REQUESTS["host-two-ports"], 400),
        (REQUESTS["host-port-too-big"], 400),
        (REQUESTS["host-unbalanced-bracket"], 400),
        (REQUESTS["host-http10"], 400),
        (REQUESTS["long-header"], 431),
        (REQUESTS["long-incomplete-header"], 431),
    ],
)
def test_smuggling_shapes_are_refused_by_both(raw, status):
    for factory in (H11, HTTPTOOLS):
        assert run_server(factory, raw)[1] == status, factory.name


def test_pipelined_requests_come_one_at_a_time_on_both():
    raw = REQUESTS["content-length"] + REQUESTS["plain-get"] + REQUESTS["chunked"]
    for factory in (H11, HTTPTOOLS):
        engine = factory.server(65536)
        engine.feed(raw)
        targets = []
        for _ in range(3):
            while (event := engine.next_event()) is not None:
                if type(event) is RequestHead:
                    targets.append(event.method)
                if type(event) is EndOfMessage:
                    break
            assert engine.next_event() is None  # held back until the response is done
            engine.send_head(ResponseHead(200, [(b"content-length", b"0")]))
            engine.send_end()
            assert engine.start_next_cycle()
        assert targets == [b"POST", b"GET", b"POST"], factory.name


# -- responses through the ClientEngine


def run_client(factory, method: bytes, raw: bytes, *, upgrade: bool = False) -> tuple[list, int | None, bool]:
    """Send a request, feed the response ``raw`` then EOF: (events, error status, reusable)."""
    engine = factory.client(65536)
    headers = [(b"host", b"a")]
    if upgrade:
        headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    engine.send_head(RequestHead(method, b"/", headers), headers, b"/")
    engine.send_end()
    engine.feed(raw)
    events = []
    try:
        for eof in (False, True):
            if eof:
                engine.feed(b"")
            while (event := engine.next_event()) is not None:
                events.append(_normalise(event))
                if type(event) in (EndOfMessage, Closed) or (
                    isinstance(event, ResponseHead) and event.status == 101
                ):
                    return _merge_bodies(events), None, engine.start_next_cycle()
    except HTTPError as exc:
        return _merge_bodies(events), exc.status, False
    return _merge_bodies(events), None, False


OK = b"HTTP/1.1 200 OK\r\n"
RESPONSES = {
    "content-length": (b"GET", OK + b"Content-Length: 3\r\n\r\nabc"),
    "chunked": (b"GET", OK + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    "chunked-and-cl": (b"GET", OK + b"Transfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    "close-delimited": (b"GET", OK + b"\r\nabc"),
    "http10-close-delimited": (b"GET", b"HTTP/1.0 200 OK\r\n\r\nabc"),
    "http10-content-length": (b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc"),
    "connection-close": (b"GET", OK + b"Connection: close\r\nContent-Length: 3\r\n\r\nabc"),
    "head-with-length": (b"HEAD", OK + b"Content-Length: 30\r\n\r\n"),
    "head-chunked": (b"HEAD", OK + b"Transfer-Encoding: chunked\r\n\r\n"),
    "204": (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    "204-with-length": (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n"),
    "304": (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
    "304-with-length": (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 30\r\n\r\n"),
    "100-then-200": (b"POST", b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"Content-Length: 2\r\n\r\nok"),
    "103-then-200": (b"GET", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK + b"Content-Length: 0\r\n\r\n"),
    "no-reason": (b"GET", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"),
    "cl-twice-same": (b"GET", OK + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    "cl-twice-different": (b"GET", OK + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    "te-gzip": (b"GET", OK + b"Transfer-Encoding: gzip\r\n\r\nabc"),
    "ctl-in-value": (b"GET", OK + b"X: a\x01b\r\nContent-Length: 0\r\n\r\n"),
    "obs-fold": (b"GET", OK + b"X: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    "bare-lf": (b"GET", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    "status-600": (b"GET", b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n"),
    "status-2-digits": (b"GET", b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n"),
    "garbage": (b"GET", b"hello\r\n\r\n"),
    "garbage-no-newline": (b"GET", b"SSH-2.0-OpenSSH"),
    "closed-at-once": (b"GET", b""),
    "truncated-head": (b"GET", OK + b"Content-Length: 3\r\n"),
    "truncated-body": (b"GET", OK + b"Content-Length: 10\r\n\r\nabc"),
    "truncated-chunked": (b"GET", OK + b"Transfer-Encoding: chunked\r\n\r\n3\r\nab"),
    "extra-bytes": (b"GET", OK + b"Content-Length: 3\r\n\r\nabcEXTRA"),
    "101-unasked": (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
    "huge-head": (b"GET", OK + b"X: " + b"a" * 70000 + b"\r\n\r\n"),
}


@pytest.mark.parametrize(("method", "raw"), RESPONSES.values(), ids=RESPONSES.keys())
def test_client_engines_agree(method, raw):
    events, status, reusable = run_client(HTTPTOOLS, method, raw)
    h11_events, h11_status, h11_reusable = run_client(H11, method, raw)
    assert (events, status) == (h11_events, h11_status)
    # httptools may be stricter about pooling: h11 would pool a connection that ended a
    # close-delimited response. (Neither pools one that carried bytes beyond the response.)
    assert reusable <= h11_reusable
    if b"Content-Length: 0" in raw and not raw.startswith(b"HTTP/1.0") and status is None:
        assert reusable == h11_reusable


SHORT_RESPONSES = {name: case for name, case in RESPONSES.items() if len(case[1]) <= 2000}


@pytest.mark.parametrize(("method", "raw"), SHORT_RESPONSES.values(), ids=SHORT_RESPONSES.keys())
def test_client_engines_agree_byte_by_byte(method, raw):
    """The same verdict when the response trickles in one byte at a time."""
    results = []
    for factory in (H11, HTTPTOOLS):
        engine = factory.client(65536)
        headers = [(b"host", b"a")]
        engine.send_head(RequestHead(method, b"/", headers), headers, b"/")
        engine.send_end()
        results.append(_trickle(engine, raw))
    assert results[1] == results[0]


def test_upgrade_response_hands_over_the_rest():
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nFRAME"
    for factory in (H11, HTTPTOOLS):
        engine = factory.client(65536)
        headers = [(b"host", b"a"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")]
        engine.send_head(RequestHead(b"GET", b"/", headers, upgrade=True), headers, b"/")
        engine.send_end()
        engine.feed(raw)
        assert engine.next_event().status == 101
        assert engine.switched_data() == b"FRAME", factory.name


def test_garbage_from_upstream_is_a_bad_gateway_on_both():
    for factory in (H11, HTTPTOOLS):
        assert run_client(factory, b"GET", b"hello\r\n\r\n")[1] == 502, factory.name


# -- responses written by the ServerEngine

import h11  # noqa: E402  (only this part reads the bytes back with h11)

WRITES = {
    "length": (REQUESTS["plain-get"], 200, [(b"content-length", b"5")], [b"he", b"llo"]),
    "unknown-length-http11": (REQUESTS["plain-get"], 200, [(b"x", b"y")], [b"he", b"", b"llo"]),
    "unknown-length-http10": (REQUESTS["http10-no-host"], 200, [(b"x", b"y")], [b"hello"]),
    "head": (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", 200, [(b"content-length", b"5")], []),
    "head-unknown-length": (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", 200, [], []),
    "204": (REQUESTS["plain-get"], 204, [], []),
    "304-with-length": (REQUESTS["plain-get"], 304, [(b"content-length", b"5")], []),
    "client-asked-close": (GET + b"Connection: close\r\n\r\n", 200, [(b"content-length", b"2")], [b"ok"]),
    "we-close": (REQUESTS["plain-get"], 200, [(b"content-length", b"2"), (b"connection", b"close")], [b"ok"]),
    "after-continue": (REQUESTS["expect-100"], 201, [(b"content-length", b"0")], []),
}


def write_response(factory, request: bytes, status: int, headers: list, body: list) -> tuple[bytes, bool]:
    engine = factory.server(65536)
    engine.feed(request)
    while type(engine.next_event()) is not EndOfMessage:
        pass
    wire = engine.send_head(ResponseHead(status, list(headers), b"X"))
    for piece in body:
        wire += b"".join(engine.send_body(piece))
    return wire + engine.send_end(), engine.start_next_cycle()


def read_back(request: bytes, wire: bytes) -> list:
    """What an HTTP client makes of the bytes (h11 as the client)."""
    client = h11.Connection(h11.CLIENT)
    server = h11.Connection(h11.SERVER)
    server.receive_data(request)
    sent = server.next_event()
    headers = list(sent.headers) or [(b"host", b"a")]  # (h11 only sends HTTP/1.1 requests)
    client.send(h11.Request(method=sent.method, target=sent.target, headers=headers))
    client.receive_data(wire)
    client.receive_data(b"")
    out = []
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or type(event) is h11.ConnectionClosed:
            return out
        if type(event) is h11.Response:
            out.append((event.status_code, sorted(event.headers)))
        elif type(event) is h11.Data:
            out.append(bytes(event.data))
        elif type(event) is h11.EndOfMessage:
            out.append("end")
            return out


@pytest.mark.parametrize(("request_bytes", "status", "headers", "body"), WRITES.values(), ids=WRITES.keys())
def test_server_engines_write_equivalent_responses(request_bytes, status, headers, body):
    wire, keep_alive = write_response(HTTPTOOLS, request_bytes, status, headers, body)
    h11_wire, h11_keep_alive = write_response(H11, request_bytes, status, headers, body)
    assert keep_alive == h11_keep_alive
    expected = read_back(request_bytes, h11_wire)
    got = read_back(request_bytes, wire)
    # Header names: h11 may title-case the ones it sets itself; compare lowercased.
    lower = [(e[0], sorted((k.lower(), v) for k, v in e[1])) if type(e) is tuple else e for e in expected]
    assert [(e[0], sorted((k.lower(), v) for k, v in e[1])) if type(e) is tuple else e for e in got] == lower


def test_too_much_or_too_little_body_is_a_bad_gateway_on_both():
    for factory in (H11, HTTPTOOLS):
        engine = factory.server(65536)
        engine.feed(REQUESTS["plain-get"])
        engine.next_event()
        engine.send_head(ResponseHead(200, [(b"content-length", b"2")]))
        with pytest.raises(HTTPError):
            engine.send_body(b"abc")
    for factory in (H11, HTTPTOOLS):
        engine = factory.server(65536)
        engine.feed(REQUESTS["plain-get"])
        engine.next_event()
        engine.send_head(ResponseHead(200, [(b"content-length", b"2")]))
        engine.send_body(b"a")
        with pytest.raises(HTTPError):
            engine.send_end()


# -- a response head relayed as received (httptools: ClientEngine.next_event's ``raw``)

AS_SENT = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Mixed-Case:  kept\r\nContent-Length: 2\r\n\r\n"


def parsed_response(method: bytes, raw: bytes) -> ResponseHead:
    engine = HTTPTOOLS.client(65536)
    headers = [(b"host", b"a")]
    engine.send_head(RequestHead(method, b"/", headers), headers, b"/")
    engine.send_end()
    engine.feed(raw)
    return engine.next_event()


def test_a_response_head_needing_no_change_keeps_its_bytes():
    head = parsed_response(b"GET", AS_SENT + b"ok")
    assert (head.raw, head.content_length) == (AS_SENT, 2)
    assert head == ResponseHead(200, [(b"content-type", b"text/plain"), (b"x-mixed-case", b"kept"),
                                      (b"content-length", b"2")], b"OK")  # the parsed view as before


@pytest.mark.parametrize(
    "lines",
    [b"Connection: keep-alive\r\n", b"connection: Close\r\n", b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
     b"KEEP-ALIVE: max=3\r\nConnection: keep-alive, close\r\n"],
    ids=["nginx", "close", "node", "shouting"],
)
def test_a_raw_head_loses_only_its_connection_and_keep_alive_lines(lines):
    head = parsed_response(b"GET", AS_SENT.replace(b"Content-Type", lines + b"Content-Type"))
    assert head.raw == AS_SENT


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        (b"GET", AS_SENT.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive, X-Mixed-Case\r\n\r\n")),
        (b"GET", AS_SENT.replace(b"\r\n\r\n", b"\r\nTrailer: X-T\r\n\r\n")),
        (b"GET", AS_SENT.replace(b"Content-Length: 2", b"Transfer-Encoding: chunked")),
        (b"GET", AS_SENT.replace(b"Content-Length: 2", b"X-No-Length: 1")),
        (b"GET", AS_SENT.replace(b"Content-Length: 2", b"Content-Length: 2, 2")),
        (b"GET", AS_SENT.replace(b"HTTP/1.1", b"HTTP/1.0")),
        (b"GET", AS_SENT.replace(b" OK", b" ")),
        (b"GET", AS_SENT.replace(b"200 OK", b"304 Not Modified")),
        (b"HEAD", AS_SENT),
        (b"GET", AS_SENT.replace(b"200 OK", b"100 Continue")),
    ],
    ids=["connection-names-a-header", "trailer", "chunked", "close-delimited", "length-list", "http10", "no-reason", "304",
         "head", "interim"],
)
def test_a_response_head_the_proxy_changes_is_not_kept_raw(method, raw):
    assert parsed_response(method, raw).raw == b""


@pytest.mark.parametrize(
    "request_bytes",
    [REQUESTS["plain-get"], GET + b"Connection: close\r\n\r\n", REQUESTS["http10-no-host"]],
    ids=["keep-alive", "client-asked-close", "http10"],
)
def test_server_engine_sends_a_raw_head_as_received_only_where_it_would_change_nothing(request_bytes):
    head = parsed_response(b"GET", AS_SENT)
    assert head.raw
    sent = []
    for relayed in (head, dataclasses.replace(head, raw=b"")):
        engine = HTTPTOOLS.server(65536)
        engine.feed(request_bytes)
        while type(engine.next_event()) is not EndOfMessage:
            pass
        wire = engine.send_head(relayed) + b"".join(engine.send_body(b"ok")) + engine.send_end()
        sent.append((read_back(request_bytes, wire), engine.start_next_cycle(), wire))
    (as_read, keep_alive, wire), (as_read_parsed, keep_alive_parsed, wire_parsed) = sent
    assert (as_read, keep_alive) == (as_read_parsed, keep_alive_parsed)  # the client sees no difference
    if request_bytes == REQUESTS["plain-get"]:
        assert wire == AS_SENT + b"ok" and wire_parsed != wire  # byte for byte: names keep their case
    elif request_bytes == REQUESTS["http10-no-host"]:
        assert wire == wire_parsed  # HTTP/1.0: re-framed as without raw bytes
    else:  # closing: as sent, plus the one line re-framing would add
        assert wire == AS_SENT[:-2] + b"connection: close\r\n\r\nok" and wire_parsed != wire
        assert not keep_alive


def test_a_raw_head_ending_in_bare_line_feeds_is_re_framed_when_closing():
    """``raw`` that does not end in CRLF CRLF gets no line spliced in: re-framed instead."""
    head = dataclasses.replace(parsed_response(b"GET", AS_SENT), raw=AS_SENT[:-4] + b"\n\n")
    engine = HTTPTOOLS.server(65536)
    engine.feed(GET + b"Connection: close\r\n\r\n")
    while type(engine.next_event()) is not EndOfMessage:
        pass
    wire = engine.send_head(head)
    assert wire.endswith(b"connection: close\r\n\r\n") and b"Content-Type" not in wire  # (re-spelled)


def test_a_raw_head_still_bounds_the_body_by_its_length():
    engine = HTTPTOOLS.server(65536)
    engine.feed(REQUESTS["plain-get"])
    engine.next_event()
    engine.send_head(parsed_response(b"GET", AS_SENT))
    with pytest.raises(HTTPError):
        engine.send_body(b"abc")


@pytest.mark.parametrize(
    "head",
    [
        RequestHead(b"GET", b"/", [(b"host", b"a")]),
        RequestHead(b"POST", b"/", [(b"host", b"a"), (b"content-length", b"5")], content_length=5),
        RequestHead(b"POST", b"/", [(b"host", b"a")], chunked=True),
    ],
    ids=["no-body", "length", "chunked"],
)
def test_client_engines_write_equivalent_requests(head):
    results = []
    for factory in (H11, HTTPTOOLS):
        engine = factory.client(65536)
        wire = engine.send_head(head, list(head.headers), b"/up")
        if head.has_body:
            wire += b"".join(engine.send_body(b"he")) + b"".join(engine.send_body(b"llo"))
        wire += engine.send_end()
        upstream = h11.Connection(h11.SERVER)
        upstream.receive_data(wire)
        events = []
        while type(event := upstream.next_event()) is not h11.EndOfMessage:
            events.append(bytes(event.data) if type(event) is h11.Data else (event.method, event.target,
                          sorted((k.lower(), v) for k, v in event.headers)))
        results.append(events)
    assert results[0][0] == results[1][0]
    assert b"".join(results[0][1:]) == b"".join(results[1][1:])


def test_unsendable_request_heads_are_a_bad_gateway_on_both():
    for factory in (H11, HTTPTOOLS):
        bad = [(b"host", b"a"), (b"x-env", b"a\r\nInjected: 1")]
        with pytest.raises(HTTPError) as caught:
            factory.client(65536).send_head(RequestHead(b"GET", b"/", bad), bad, b"/")
        assert caught.value.status == 502


# -- mutations of the tables above (deterministic): the verdicts still agree

MUTATIONS = [b"\r", b"\n", b" ", b"\t", b"\x00", b"\x01", b":", b",", b"\x7f", b"\xff", b"0", b";", b"\r\n ",
             b"Host: b\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n"]


def _mutate(rng, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(data) + 1)
        choice = rng.random()
        if choice < 0.4:
            data[pos:pos] = rng.choice(MUTATIONS)
        elif choice < 0.7:
            del data[pos : pos + rng.randint(1, 3)]
        else:
            data[pos : pos + 1] = rng.choice(MUTATIONS)
    return bytes(data)


def test_mutated_requests_and_responses_get_the_same_verdict():
    import random

    rng = random.Random(20261123)
    requests = [raw for raw in REQUESTS.values() if len(raw) < 3000]
    for _ in range(1500):
        raw = _mutate(rng, rng.choice(requests))
        assert run_server(HTTPTOOLS, raw) == run_server(H11, raw), raw
    for _ in range(1500):
        method, raw = rng.choice(list(RESPONSES.values()))
        raw = _mutate(rng, raw)
        assert run_client(HTTPTOOLS, method, raw)[:2] == run_client(H11, method, raw)[:2], raw


# -- choosing the engine


def test_engine_factory_names(monkeypatch):
    monkeypatch.setattr("proxy.http.engines.forced_engine", None)
    monkeypatch.delenv("TLSPROXY_HTTP_ENGINE", raising=False)
    assert engine_factory("h11").name == "h11"
    assert engine_factory("httptools").name == "httptools"
    assert engine_factory("auto").name == "httptools"
    monkeypatch.setenv("TLSPROXY_HTTP_ENGINE", "h11")
    assert engine_factory("auto").name == "h11"
    assert engine_factory("httptools").name == "httptools"  # forcing only applies behind auto


def test_auto_falls_back_to_h11_without_httptools(monkeypatch):
    import sys

    monkeypatch.setattr("proxy.http.engines.forced_engine", None)
    monkeypatch.delenv("TLSPROXY_HTTP_ENGINE", raising=False)
    monkeypatch.setitem(sys.modules, "httptools", None)  # import httptools -> ImportError
    monkeypatch.delitem(sys.modules, "proxy.http.httptools_engine", raising=False)
    assert engine_factory("auto").name == "h11"
    with pytest.raises(ImportError):
        engine_factory("httptools")


@pytest.mark.parametrize("name", ["auto", "httptools", "h11"])
def test_serve_http_option_overrides_the_config(name):
    from proxy.cli import build_parser
    from proxy.config.model import ProxyConfig
    from proxy.server.commands import _with_http_engine

    args = build_parser().parse_args(["serve", "--http", name, "--listen", "127.0.0.1:0", "--upstream", "http://x"])
    assert args.http == name
    loaded = ProxyConfig(services=(), http_engine="h11")
    assert _with_http_engine(lambda: loaded, name) == dataclasses.replace(loaded, http_engine=name)


def test_serve_http_option_refuses_unknown_engines(capsys):
    from proxy.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "--http", "uvloop"])
    assert caught.value.code == 2
