"""Request target -> normalised path (routed) and target (forwarded), or 400 (pure)."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.forwarding.paths import RequestPath, normalize_target

# target as sent -> (path routing matches, target sent upstream)
NORMALISED = [
    # plain paths: the fast path, returned as they came
    ("/", "/", "/"),
    ("/ledger/balance", "/ledger/balance", "/ledger/balance"),
    ("/a/b/", "/a/b/", "/a/b/"),
    ("/a.b/c..d/...", "/a.b/c..d/...", "/a.b/c..d/..."),
    ("/x?q=1&r=%2F//../%00#", None, None),  # '#' anywhere: refused (below)
    ("/api?q=%2f/../x%00", "/api", "/api?q=%2f/../x%00"),  # the query byte for byte
    ("/api?", "/api", "/api?"),
    ("/A-Z_a~z!$&'()*+,:=@", "/A-Z_a~z!$&'()*+,:=@", "/A-Z_a~z!$&'()*+,:=@"),
    # unreserved escapes decoded, other escapes kept with uppercase hex
    ("/%6cedger/balance", "/ledger/balance", "/ledger/balance"),
    ("/%6Cedger/%62alance", "/ledger/balance", "/ledger/balance"),
    ("/%41%5a%30%2D%2e%5F%7e", "/AZ0-._~", "/AZ0-._~"),
    ("/caf%c3%a9/%20/%3F/%25/%3a", "/caf%C3%A9/%20/%3F/%25/%3A", "/caf%C3%A9/%20/%3F/%25/%3A"),
    ("/%25%32%66", "/%252f", "/%252f"),  # decoded once only: no double decoding
    # repeated slashes merged
    ("//ledger/balance", "/ledger/balance", "/ledger/balance"),
    ("///a////b//", "/a/b/", "/a/b/"),
    ("//", "/", "/"),
    # dot segments resolved (RFC 3986 5.2.4), encoded ones too
    ("/a/./b", "/a/b", "/a/b"),
    ("/a/b/../c", "/a/c", "/a/c"),
    ("/a/./b/.", "/a/b/", "/a/b/"),
    ("/a/..", "/", "/"),
    ("/../../x", "/x", "/x"),
    ("/.", "/", "/"),
    ("/..", "/", "/"),
    ("/.well-known/x", "/.well-known/x", "/.well-known/x"),
    ("/pub/%2e%2e/ledger", "/ledger", "/ledger"),
    ("/pub/%2E./ledger", "/ledger", "/ledger"),
    ("/pub/.%2e/ledger", "/ledger", "/ledger"),
    ("/%2e/ledger", "/ledger", "/ledger"),
    ("/a/..?q=/..", "/", "/?q=/.."),
    # ;parameters: ignored for matching, kept in what is forwarded
    ("/ledger;x/balance", "/ledger/balance", "/ledger;x/balance"),
    ("/ledger;/balance", "/ledger/balance", "/ledger;/balance"),
    ("/app/page;jsessionid=1?a=b", "/app/page", "/app/page;jsessionid=1?a=b"),
    ("/app/;jsessionid=1", "/app/", "/app/;jsessionid=1"),
    ("/;x", "/", "/;x"),
    ("/a;p=%41;q", "/a", "/a;p=A;q"),
    # an encoded ";" starts parameters for matching (servers that decode, then cut them)
    ("/ledger%3Bx/balance", "/ledger/balance", "/ledger%3Bx/balance"),
    ("/pub/..%3b/ledger", "/ledger", "/ledger"),
    ("/pub/%2e%2e%3Bx/ledger", "/ledger", "/ledger"),
    ("/a%3B", "/a", "/a%3B"),
    # "..;" and ".;" are dot segments (Tomcat, Spring); their parameters go with them
    ("/pub/..;/ledger", "/ledger", "/ledger"),
    ("/pub/..;x=1/ledger", "/ledger", "/ledger"),
    ("/pub/.;x/y", "/pub/y", "/pub/y"),
    ("/a//;x/b", "/a/b", "/a/b"),
    ("/a/b/..;x", "/a/", "/a/"),
    # characters RFC 3986 leaves out but clients send: kept
    ("/a|b/{c}/[d]/^/`/\"/<>", "/a|b/{c}/[d]/^/`/\"/<>", "/a|b/{c}/[d]/^/`/\"/<>"),
    # case is kept (routing compares case-insensitively)
    ("/LEDGER/Balance", "/LEDGER/Balance", "/LEDGER/Balance"),
    # asterisk-form: passed through, matches no prefix
    ("*", "*", "*"),
]

REFUSED = [
    # encoded "/" or "\" in the path, any case
    "/ledger%2fbalance",
    "/ledger%2Fbalance",
    "/pub/..%2fledger",
    "/pub/%2e%2e%2fledger",
    "/ledger%5cbalance",
    "/ledger%5Cbalance",
    "/a;p=%2f",
    # a bare backslash in the path
    "/ledger\\balance",
    "/..\\ledger",
    # control characters, raw or encoded, NUL to US and DEL; space
    "/ledger%00",
    "/ledger/balance%00.css",
    "/a%01",
    "/a%0a",
    "/a%0D%0A",
    "/a%1f",
    "/a%1F",
    "/a%7f",
    "/a%7F",
    "/a\x00b",
    "/a\x01b",
    "/a\tb",
    "/a b",
    "/a\x7fb",
    "/a?q=\x00",
    "/a?q=\x7f",
    "/caf\xe9",
    "/a?\xe9",
    # a fragment anywhere
    "/ledger#x",
    "/ledger/balance#",
    "/a?q#x",
    "#",
    # malformed escapes
    "/ledger%",
    "/ledger%g0",
    "/ledger%0g",
    "/ledger%2",
    "/%%41",
    "/a;p=%zz",
    # not origin-form
    "http://a/ledger",
    "HTTP://a/x?y",
    "a:443",
    "ledger/balance",
    "?q",
    "**",
]


@pytest.mark.parametrize(("target", "path", "forwarded"), [row for row in NORMALISED if row[1] is not None])
def test_normalised(target, path, forwarded):
    assert normalize_target(target.encode("latin-1")) == RequestPath(path, forwarded.encode("latin-1"))


@pytest.mark.parametrize("target", REFUSED + [row[0] for row in NORMALISED if row[1] is None])
def test_refused_with_400(target):
    with pytest.raises(BadRequest) as refused:
        normalize_target(target.encode("latin-1"))
    assert refused.value.status == 400 and str(refused.value).startswith("bad request target")


@pytest.mark.parametrize("target", [row[2] for row in NORMALISED if row[1] is not None])
def test_normalising_twice_changes_nothing(target):
    """What goes upstream reads the same again: an upstream normalising it sees the
    path the proxy routed."""
    once = normalize_target(target.encode("latin-1"))
    assert normalize_target(once.target) == once


@pytest.mark.parametrize(
    "target", ["/", "/api/v1/users?id=1&b=%2F", "/static/app.min.js", "/a-b_c~d/e.f/"]
)
def test_plain_targets_come_back_as_the_same_bytes_object(target):
    raw = target.encode()
    assert normalize_target(raw).target is raw  # the fast path copies nothing


def test_recent_targets_are_remembered_within_bounds_and_refusals_never() -> None:
    from proxy.forwarding import paths

    paths._SEEN.clear()
    first = normalize_target(b"/a//b")
    assert normalize_target(b"/a//b") is first  # the remembered object, not a second normalisation
    for _ in range(2):
        with pytest.raises(BadRequest):
            normalize_target(b"/a%2fb")
    assert b"/a%2fb" not in paths._SEEN
    long_target = b"/x" * 200
    normalize_target(long_target)
    assert long_target not in paths._SEEN
    for number in range(paths._SEEN_MAX + 10):
        normalize_target(b"/n/%d" % number)
    assert len(paths._SEEN) <= paths._SEEN_MAX
