"""HTTP/2 header blocks -> request heads: what HTTP/2 forbids is refused with a reason,
and what is allowed maps to the head an HTTP/1.1 upstream gets (pure, no sockets;
the same rules against a real proxy: tests/test_h2_*.py)."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest, HeadersTooLarge
from proxy.http.engine import ResponseHead
from proxy.http.h2.budget import Budget
from proxy.http.h2.messages import request_head, response_fields

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"api.localhost"), (b":path", b"/v1?q=1")]


def head(*extra, base=BASE, ended=True, limit=65536):
    return request_head([*base, *extra], ended=ended, max_header_bytes=limit)


def test_a_plain_request_maps_to_an_http11_head_with_host_first():
    got = head((b"accept", b"*/*"), (b"cookie", b"a=1"), (b"cookie", b"b=2"))
    assert (got.method, got.target, got.http_version) == (b"GET", b"/v1?q=1", b"2")
    assert got.headers == [(b"host", b"api.localhost"), (b"accept", b"*/*"), (b"cookie", b"a=1; b=2")]
    assert not got.has_body and not got.upgrade


def test_a_body_without_content_length_goes_chunked_and_with_one_keeps_it():
    assert head(ended=False).chunked
    sized = head((b"content-length", b"5"), ended=False)
    assert sized.content_length == 5 and not sized.chunked


def test_host_header_alone_is_the_authority_and_an_equal_one_is_accepted():
    no_authority = [field for field in BASE if field[0] != b":authority"]
    assert head((b"host", b"a.localhost"), base=no_authority).header(b"host") == b"a.localhost"
    assert head((b"host", b"API.localhost")).headers[0] == (b"host", b"api.localhost")


@pytest.mark.parametrize(
    "extra, words",
    [
        ((b"connection", b"keep-alive"), "connection-specific"),
        ((b"keep-alive", b"5"), "connection-specific"),
        ((b"proxy-connection", b"x"), "connection-specific"),
        ((b"transfer-encoding", b"chunked"), "connection-specific"),
        ((b"upgrade", b"websocket"), "connection-specific"),
        ((b"te", b"gzip"), "TE other than"),
        ((b"X-Upper", b"1"), "lowercase token"),
        ((b"bad name", b"1"), "lowercase token"),
        ((b"x:y", b"1"), "lowercase token"),
        ((b"x-a", b"a\r\nx-b: b"), "control character"),
        ((b"x-a", b"a\nb"), "control character"),
        ((b"x-a", b"a\x00b"), "control character"),
        ((b"x-a", b" padded"), "whitespace"),
        ((b"x-a", b"padded\t"), "whitespace"),
        ((b"host", b"evil.localhost"), "different hosts"),
        ((b"content_length", b"5"), "framing header"),
        ((b"content-length", b"9007199254740992"), r"2\^53"),
        ((b"content-length", b"3"), "without a body"),
    ],
)
def test_refused_with_a_reason(extra, words):
    with pytest.raises(BadRequest, match=words):
        head(extra)


@pytest.mark.parametrize(
    "fields, words",
    [
        ([(b":scheme", b"https"), (b":path", b"/")], "no :method"),
        ([(b":method", b"GET"), (b":scheme", b"https")], "no :path"),
        ([(b":method", b"GET"), (b":path", b"/")], "no :scheme"),
        ([*BASE, (b":path", b"/other")], "given twice"),
        ([(b":method", b"GET"), (b"accept", b"*/*"), (b":scheme", b"https"), (b":path", b"/")], "after a regular"),
        ([*BASE, (b":protocol", b"websocket")], "not one a request may carry"),
        ([(b":method", b"CONNECT"), (b":authority", b"x:443")], "CONNECT"),
        ([(b":method", b"GET"), (b":scheme", b"ftp"), (b":path", b"/")], ":scheme"),
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a@b"), (b":path", b"/")], "host"),
    ],
)
def test_pseudo_header_rules(fields, words):
    with pytest.raises(BadRequest, match=words):
        request_head(fields, ended=True, max_header_bytes=65536)


def test_te_trailers_is_the_one_te_allowed():
    assert (b"te", b"trailers") in head((b"te", b"trailers")).headers


def test_header_section_over_the_limit_is_431():
    with pytest.raises(HeadersTooLarge):
        head((b"x-big", b"a" * 2000), limit=1024)


def test_response_fields_have_status_first_and_no_connection_headers():
    response = ResponseHead(
        200, [(b"content-type", b"text/plain"), (b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5"),
              (b"transfer-encoding", b"chunked"), (b"x-a", b"1")], b"OK"
    )
    assert response_fields(response) == [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-a", b"1")]


def test_budget_allows_a_burst_then_a_rate():
    budget = Budget(capacity=3, per_second=1)
    assert all(budget.spend(10.0) for _ in range(3))
    assert not budget.spend(10.0)  # the burst is spent
    assert not budget.spend(10.5)  # half a token back, still in debt
    assert budget.spend(13.0)  # refilled at the steady rate
