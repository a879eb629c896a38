"""HTTP/2 request smuggling vectors (SPEC 4a), each sent by a raw h2 client: refused on
its own stream (400 or RST_STREAM) with nothing reaching the upstream, the connection
serving the next stream — and its accepted twin, the same request made valid, going
through on that same connection."""

from __future__ import annotations

import threading

import h2.errors
import pytest
from h2client import H2Client
from upstream import ProxyThread, TestUpstream, proxy_config, service

pytestmark = pytest.mark.both_engines  # the twins go to the HTTP/1.1 upstream through each engine

BASE = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/echo")]
POST = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"), (":path", "/echo")]


def without(name: str, fields=BASE):
    return [field for field in fields if field[0] != name]


# (id, refused fields, accepted twin fields); both sent with END_STREAM on HEADERS.
VECTORS = [
    ("connection", BASE + [("connection", "close")], BASE + [("x-connection", "close")]),
    ("keep-alive", BASE + [("keep-alive", "timeout=5")], BASE + [("x-keep-alive", "timeout=5")]),
    ("proxy-connection", BASE + [("proxy-connection", "keep-alive")], BASE + [("x-proxy-connection", "k")]),
    ("transfer-encoding", BASE + [("transfer-encoding", "chunked")], BASE + [("x-transfer-encoding", "chunked")]),
    ("upgrade", BASE + [("upgrade", "websocket")], BASE + [("x-upgrade", "websocket")]),
    ("te-gzip", BASE + [("te", "gzip")], BASE + [("te", "trailers")]),
    ("te-trailers-gzip", BASE + [("te", "trailers, gzip")], BASE + [("te", "trailers")]),
    ("uppercase-name", BASE + [("X-Upper", "1")], BASE + [("x-upper", "1")]),
    ("uppercase-framing-name", BASE + [("Content-Length", "0")], BASE + [("content-length", "0")]),
    ("space-in-name", BASE + [("x bad", "1")], BASE + [("x-bad", "1")]),
    ("colon-in-name", BASE + [("x:bad", "1")], BASE + [("x-bad", "1")]),
    ("empty-name", BASE + [("", "1")], BASE + [("x-empty", "1")]),
    ("cr-in-value", BASE + [("x-v", "a\rb")], BASE + [("x-v", "ab")]),
    ("lf-in-value", BASE + [("x-v", "a\nb")], BASE + [("x-v", "ab")]),
    ("crlf-injection", BASE + [("x-v", "a\r\nx-injected: 1")], BASE + [("x-v", "a x-injected: 1")]),
    ("nul-in-value", BASE + [("x-v", "a\x00b")], BASE + [("x-v", "ab")]),
    ("leading-space", BASE + [("x-v", " a")], BASE + [("x-v", "a")]),
    ("trailing-space", BASE + [("x-v", "a ")], BASE + [("x-v", "a")]),
    ("trailing-tab", BASE + [("x-v", "a\t")], BASE + [("x-v", "a")]),
    ("no-method", without(":method"), BASE),
    ("no-path", without(":path"), BASE),
    ("empty-path", without(":path") + [(":path", "")], BASE),
    ("no-scheme", without(":scheme"), BASE),
    ("ftp-scheme", without(":scheme") + [(":scheme", "ftp")], BASE),
    ("duplicate-path", BASE + [(":path", "/other")], BASE),
    ("duplicate-method", BASE + [(":method", "POST")], BASE),
    ("duplicate-authority", BASE + [(":authority", "evil.localhost")], BASE),
    ("pseudo-after-regular", without(":path") + [("x-a", "1"), (":path", "/echo")],
     without(":path") + [(":path", "/echo"), ("x-a", "1")]),
    ("protocol-pseudo", BASE + [(":protocol", "websocket")], BASE),
    ("status-pseudo", BASE + [(":status", "200")], BASE),
    ("connect", [(":method", "CONNECT"), (":authority", "localhost:443")], BASE),
    ("connect-with-path", without(":method") + [(":method", "CONNECT")], BASE),
    ("host-differs", BASE + [("host", "evil.localhost")], BASE + [("host", "localhost")]),
    ("host-differs-only-host", without(":authority") + [("host", "evil.localhost"), ("host", "localhost")],
     without(":authority") + [("host", "localhost")]),
    ("content_length", BASE + [("content_length", "5")], BASE + [("x-content-length", "5")]),
    ("transfer_encoding", BASE + [("transfer_encoding", "chunked")], BASE + [("x-transfer-encoding", "chunked")]),
    ("authority-at", without(":authority") + [(":authority", "user@localhost")], BASE),
    ("authority-slash", without(":authority") + [(":authority", "localhost/x")], BASE),
    ("authority-two-ports", without(":authority") + [(":authority", "localhost:1:2")], BASE),
    ("host-at", without(":authority") + [("host", "evil@localhost")], without(":authority") + [("host", "localhost")]),
    ("host-slash", without(":authority") + [("host", "localhost/x")], without(":authority") + [("host", "localhost")]),
    ("cl-without-body", without(":method") + [(":method", "POST"), ("content-length", "5")],
     without(":method") + [(":method", "POST"), ("content-length", "0")]),
    ("path-encoded-slash", without(":path") + [(":path", "/a%2f..%2fecho")],
     without(":path") + [(":path", "/a/../echo")]),
    ("path-fragment", without(":path") + [(":path", "/echo#x")], BASE),
    ("path-not-origin-form", without(":path") + [(":path", "echo")], BASE),
]


@pytest.fixture
def px(pki, upstream: TestUpstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as proxy:
        yield proxy


def assert_refused(client: H2Client, stream_id: int) -> None:
    answer = client.response(stream_id)
    assert answer.status == 400 or answer.reset is not None, answer
    if answer.status == 400:
        assert answer.ended and answer.body, answer  # the reason, on the stream


@pytest.mark.parametrize("bad, good", [case[1:] for case in VECTORS], ids=[case[0] for case in VECTORS])
def test_refused_on_its_stream_and_twin_accepted(pki, upstream, px, bad, good):
    with H2Client(pki, px.port) as client:
        refused = client.request(headers=bad)
        assert_refused(client, refused)
        assert upstream.requests == []
        assert client.goaway is None and not client.closed  # the connection goes on
        accepted = client.request(headers=good)
        answer = client.response(accepted)
        assert answer.status == 200, answer
        assert answer.ended
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("size", [2**53, 2**53 + 1, 10**30])
def test_content_length_of_2_to_the_53_or_more_is_refused(pki, upstream, px, size):
    with H2Client(pki, px.port) as client:
        refused = client.request(headers=POST + [("content-length", str(size))], end=False)
        client.send_body(refused, b"hello", end=False)
        assert_refused(client, refused)
        accepted = client.request(headers=POST + [("content-length", "5")], body=b"hello")
        answer = client.response(accepted)
        assert answer.status == 200 and b'"body_bytes": 5' in answer.body, answer
    assert len(upstream.requests) == 1


def test_crlf_in_a_value_never_splits_into_a_header_upstream(pki, upstream, px):
    """The twin of the injection: the bytes that are refused are never seen upstream
    in any form (no ``x-injected`` header on the accepted request either)."""
    with H2Client(pki, px.port) as client:
        assert_refused(client, client.request(extra=[("x-v", "a\r\nx-injected: 1")]))
        answer = client.response(client.request(extra=[("x-v", "fine")]))
        assert answer.status == 200
    names = [name for name, _ in upstream.requests[0]["headers"]]
    assert "x-injected" not in names and len(upstream.requests) == 1


# -- content-length against DATA: h2 treats these as connection errors ------------------


class CompletingUpstream(TestUpstream):
    """A TestUpstream that also records every request body it read to its end."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.complete: list[int] = []
        self.reading = threading.Event()  # a request head arrived: its body is being read

        self.ended = 0  # connections whose serving ended (the proxy closed or aborted them)

    def _serve(self, conn):
        try:
            super()._serve(conn)
        finally:
            with self._changed:
                self.ended += 1
                self._changed.notify_all()

    def wait_ended(self, count: int, timeout: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.ended >= count, timeout)

    def _read_body(self, conn, http):
        self.reading.set()
        size, digest = super()._read_body(conn, http)
        self.complete.append(size)
        return size, digest


@pytest.fixture
def completing(pki, tmp_path):
    with CompletingUpstream() as up, ProxyThread(proxy_config(pki, service("app", up), tmp_path)) as proxy:
        yield up, proxy


@pytest.mark.parametrize("declared, sent", [(3, b"hello"), (10, b"hello"), (1, b"")],
                         ids=["more-data-than-cl", "less-data-than-cl", "no-data-for-cl-1"])
def test_content_length_disagreeing_with_data_never_completes_upstream(pki, completing, declared, sent):
    """The head has gone upstream when the DATA shows the disagreement (the upstream sees
    a partial body, then the connection aborted), but no request ever completes there.
    The disagreement is an error of that stream alone (RFC 9113 8.1.1): it gets 400 saying
    why (or a reset, when the answer had started), and the connection serves on. The twin
    (an agreeing length) is ``test_content_length_agreeing_over_several_data_frames_goes_through``."""
    up, px = completing
    with H2Client(pki, px.port) as client:
        stream_id = client.request(headers=POST + [("content-length", str(declared))], end=False)
        assert up.reading.wait(5)  # the head went upstream: only the DATA can tell now
        if sent:
            client.send_body(stream_id, sent, end=False)
        client.conn.end_stream(stream_id)
        client.flush()
        answer = client.response(stream_id)
        assert answer.reset is not None or (answer.status == 400 and "content-length" in answer.text)
        assert client.goaway is None  # the connection lives on...
        assert client.response(client.request(extra=[("connection", "close")])).status == 400  # ...and serves
    assert up.wait_ended(1), "the upstream connection of the failed stream was left open"
    assert up.complete == []  # no body was ever read to its end


def test_data_after_content_length_0_never_reaches_the_upstream(pki, completing):
    """``content-length: 0`` without END_STREAM is a complete request as declared: it may
    be forwarded (and answered) before the stray DATA shows the disagreement. Either the
    DATA arrives in the read that opened the stream (h2: connection error, GOAWAY
    PROTOCOL_ERROR), or the stream was answered and reset already (then the DATA is
    discarded); the stray byte never goes upstream."""
    up, px = completing
    with H2Client(pki, px.port) as client:
        stream_id = client.request(headers=POST + [("content-length", "0")], end=False)
        client.send_body(stream_id, b"x", end=True)
        answer = client.response(stream_id)
        if client.goaway is not None:
            assert client.goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        else:
            assert answer.ended and answer.status == 200
            assert client.response(client.request("/echo")).status == 200  # the connection serves on
    assert set(up.complete) <= {0}  # the declared empty body at most; never the stray byte


def test_content_length_agreeing_over_several_data_frames_goes_through(pki, completing):
    up, px = completing
    with H2Client(pki, px.port) as client:
        stream_id = client.request(headers=POST + [("content-length", "10")], end=False)
        client.send_body(stream_id, b"hello", end=False)
        client.send_body(stream_id, b"world", end=True)
        answer = client.response(stream_id)
        assert answer.status == 200 and b'"body_bytes": 10' in answer.body
    assert up.complete == [10]
