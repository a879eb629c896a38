"""The single-value parsers shared by the YAML loader and the command line."""

from __future__ import annotations

import pytest

from proxy.config.model import AllowEntry, ListenAddress, Upstream
from proxy.config.values import (
    InvalidValue,
    expand_env,
    is_loopback,
    parse_allow_entry,
    parse_duration,
    parse_fingerprint,
    parse_header_value,
    parse_host_pattern,
    parse_int,
    parse_listen,
    parse_upstream,
    parse_workers,
)

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("10", 10.0),
        (10, 10.0),
        (0.5, 0.5),
        ("0", 0.0),
        (" 3 s ", 3.0),
    ],
)
def test_durations_accepted(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["-1s", -1, "ten", "10 seconds", "5d", "", "1e3", True, None, float("inf"), "s"])
def test_durations_refused(value: object) -> None:
    with pytest.raises(InvalidValue):
        parse_duration(value)


def test_zero_duration_refused_when_asked() -> None:
    with pytest.raises(InvalidValue, match="longer than zero"):
        parse_duration("0ms", allow_zero=False)


@pytest.mark.parametrize(("value", "ok"), [(0, True), (5, True), (-1, False), (True, False), (1.5, False), ("5", False)])
def test_int(value: object, ok: bool) -> None:
    if ok:
        assert parse_int(value) == value
    else:
        with pytest.raises(InvalidValue):
            parse_int(value)


@pytest.mark.parametrize(("value", "expected"), [("auto", 4), (2, 2)])
def test_workers(value: object, expected: int) -> None:
    assert parse_workers(value, cpu_count=4) == expected


@pytest.mark.parametrize("value", [0, "two", False])
def test_workers_refused(value: object) -> None:
    with pytest.raises(InvalidValue):
        parse_workers(value, cpu_count=4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8443", ListenAddress("0.0.0.0", 8443)),
        ("[::]:8443", ListenAddress("::", 8443)),
        ("[::1]:0", ListenAddress("::1", 0)),
        ("localhost:65535", ListenAddress("localhost", 65535)),
    ],
)
def test_listen_accepted(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["8443", ":8443", "host", "host:port", "1.2.3.4:65536", "::1:80", "[::1]", "[nope]:80", "[::1]x:80", "a b:1"]
)
def test_listen_refused(text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_listen(text)


def test_listen_address_str_brackets_ipv6() -> None:
    assert str(parse_listen("[::]:8443")) == "[::]:8443"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:9000", Upstream("http://127.0.0.1:9000", "127.0.0.1", 9000)),
        ("http://backend", Upstream("http://backend", "backend", 80)),
        ("http://backend/", Upstream("http://backend", "backend", 80)),
        ("HTTP://backend:8080", Upstream("http://backend:8080", "backend", 8080)),
        ("http://[::1]:9000", Upstream("http://[::1]:9000", "::1", 9000)),
        ("https://api.internal", Upstream("https://api.internal", "api.internal", 443, "https")),
        ("HTTPS://10.0.0.5:8443/", Upstream("https://10.0.0.5:8443", "10.0.0.5", 8443, "https")),
        ("h2c://grpc:50051", Upstream("h2c://grpc:50051", "grpc", 50051, "h2c")),
    ],
)
def test_upstream_accepted(text: str, expected: Upstream) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "htp://x",
        "ws://x",
        "https://x/api",
        "https://u:p@x",
        "x:80",
        "http://",
        "http://x/api",
        "http://x?q",
        "http://u:p@x",
        "http://x:0",
        "http://x:99999",
        "http://x:abc",
        "http://::1:80",
        "http://bad_host",
    ],
)
def test_upstream_refused(text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_upstream(text)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True), ("LOCALHOST.", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("localhost.example", False),
])
def test_loopback_addresses_for_listen_plain(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("API.Localhost", "api.localhost"),
        ("api.localhost:8443", "api.localhost"),
        ("example.com.", "example.com"),
        ("*.Example.com", "*.example.com"),
        ("[::1]:8443", "::1"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_host_pattern_accepted(text: str, expected: str) -> None:
    assert parse_host_pattern(text) == expected


@pytest.mark.parametrize("text", ["", "a..b", "*", "a.*.b", "host:", "host:x", "-a.com"])
def test_host_pattern_refused(text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_host_pattern(text)


@pytest.mark.parametrize(
    "text",
    [
        HEX,
        HEX.upper(),
        "sha256:" + HEX,
        "SHA256:" + ":".join(HEX[i : i + 2] for i in range(0, 64, 2)).upper(),
    ],
)
def test_fingerprint_normalised(text: str) -> None:
    assert parse_fingerprint(text) == HEX


@pytest.mark.parametrize("text", [HEX[:-2], HEX + "00", "sha1:" + HEX, HEX[:-1] + "g", "md5:ab"])
def test_fingerprint_refused(text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_fingerprint(text)


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        ("cn", "billing", "billing"),
        ("dns", "*.SVC.local", "*.svc.local"),
        ("email", "a@example.org", "a@example.org"),
        ("uri", "spiffe://example.org/x", "spiffe://example.org/x"),
    ],
)
def test_allow_entry_accepted(kind: str, text: str, expected: str) -> None:
    assert parse_allow_entry(kind, text) == AllowEntry(kind, expected)


@pytest.mark.parametrize(("kind", "text"), [("cn", " "), ("dns", "*"), ("dns", "a.*"), ("email", "nobody"), ("uri", "")])
def test_allow_entry_refused(kind: str, text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_allow_entry(kind, text)


@pytest.mark.parametrize("text", ["a\rb", "a\nb", "a\0b"])
def test_header_value_refuses_control_characters(text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_header_value(text)


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("${A}", {"A": "1"}, "1"),
        ("x${A}y${B}", {"A": "1", "B": "2"}, "x1y2"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A:-}", {}, ""),
        ("${A:-a:b}", {}, "a:b"),
        ("$${A}", {}, "${A}"),
        ("$A and $", {}, "$A and $"),
        ("${A}", {"A": "${B}"}, "${B}"),  # no double expansion
    ],
)
def test_expand_env(text: str, environ: dict[str, str], expected: str) -> None:
    assert expand_env(text, environ) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${MISSING}", "environment variable MISSING is not set"),
        ("${}", "malformed"),
        ("${1A}", "malformed"),
        ("${A", "malformed"),
        ("${A-x}", "malformed"),
    ],
)
def test_expand_env_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        expand_env(text, {})
