"""Header rewriting towards the upstream and back (SPEC section 4); pure, no sockets."""

from __future__ import annotations

import pytest

from proxy.config.model import Service, Upstream
from proxy.forwarding.headers import (
    downstream_response_headers,
    forwarded_element,
    is_sane_request_id,
    new_request_id,
    upstream_request_headers,
)

SERVICE = Service(name="api", upstreams=(Upstream("http://127.0.0.1:9000", "127.0.0.1", 9000),))


def rewrite(headers, *, client_ip="1.2.3.4", service=SERVICE, **kwargs):
    out, request_id = upstream_request_headers(headers, client_ip=client_ip, server_port=8443, service=service, **kwargs)
    return out, request_id


def values(headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def test_forwarding_headers_are_added():
    out, request_id = rewrite([(b"host", b"api.localhost:8443"), (b"accept", b"*/*")])
    assert out[:2] == [(b"host", b"api.localhost:8443"), (b"accept", b"*/*")]
    assert values(out, b"x-forwarded-for") == [b"1.2.3.4"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"api.localhost:8443"]
    assert values(out, b"x-forwarded-port") == [b"8443"]
    assert values(out, b"forwarded") == [b'for=1.2.3.4;proto=https;host="api.localhost:8443"']
    assert values(out, b"x-request-id") == [request_id]
    assert len(request_id) == 32 and int(request_id, 16) >= 0


def test_existing_x_forwarded_for_and_forwarded_are_appended_to():
    out, _ = rewrite(
        [
            (b"host", b"x"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-forwarded-for", b"10.0.0.2, 10.0.0.3"),
            (b"forwarded", b"for=10.0.0.1"),
        ]
    )
    assert values(out, b"x-forwarded-for") == [b"10.0.0.1, 10.0.0.2, 10.0.0.3, 1.2.3.4"]
    assert values(out, b"forwarded") == [b"for=10.0.0.1, for=1.2.3.4;proto=https;host=x"]


def test_client_forwarding_claims_are_replaced_including_underscore_spellings():
    out, _ = rewrite(
        [
            (b"host", b"x"),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"evil"),
            (b"x-forwarded-port", b"80"),
            (b"x_forwarded_for", b"6.6.6.6"),
        ]
    )
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"x"]
    assert values(out, b"x-forwarded-port") == [b"8443"]
    assert values(out, b"x_forwarded_for") == []
    assert values(out, b"x-forwarded-for") == [b"1.2.3.4"]


def test_ipv6_client_is_quoted_in_forwarded():
    out, _ = rewrite([(b"host", b"[::1]:8443")], client_ip="::1")
    assert values(out, b"x-forwarded-for") == [b"::1"]
    assert values(out, b"forwarded") == [b'for="[::1]";proto=https;host="[::1]:8443"']


def test_forwarded_element_quotes_what_is_not_a_token():
    assert forwarded_element("1.2.3.4", b"example.com") == b"for=1.2.3.4;proto=https;host=example.com"
    assert forwarded_element("1.2.3.4", b'a"b') == b'for=1.2.3.4;proto=https;host="a\\"b"'
    assert forwarded_element("2001:db8::1", None) == b'for="[2001:db8::1]";proto=https'


def test_hop_by_hop_headers_and_the_names_connection_lists_are_removed():
    out, _ = rewrite(
        [
            (b"host", b"x"),
            (b"connection", b"keep-alive, X-Secret-Hop, host, Content-Length"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-connection", b"keep-alive"),
            (b"te", b"trailers"),
            (b"trailer", b"x-sum"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"x-secret-hop", b"1"),
            (b"content-length", b"5"),
            (b"x-app", b"kept"),
        ]
    )
    names = [name for name, _ in out]
    for gone in (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding"):
        assert gone not in names
    assert b"upgrade" not in names and b"x-secret-hop" not in names
    # Connection cannot remove what framing and routing depend on.
    assert values(out, b"host") == [b"x"] and values(out, b"content-length") == [b"5"]
    assert values(out, b"x-app") == [b"kept"]


def test_upgrade_keeps_upgrade_and_sends_connection_upgrade():
    out, _ = rewrite(
        [(b"host", b"x"), (b"connection", b"Upgrade, keep-alive"), (b"upgrade", b"websocket"), (b"keep-alive", b"1")],
        upgrade=True,
    )
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"keep-alive") == []


def test_identity_headers_from_the_client_are_stripped_and_ours_added():
    incoming = [
        (b"host", b"x"),
        (b"x-forwarded-client-cert", b"Hash=forged"),
        (b"client-cert", b":Zm9yZ2Vk:"),
        (b"client-cert-chain", b":Zm9yZ2Vk:"),
        (b"x-client-cert-subject", b"CN=admin"),
        (b"x_client_cert_subject", b"CN=admin"),
        (b"X-Client-Cert-Serial", b"1"),
        (b"x-clientele", b"kept"),
    ]
    ours = [(b"X-Forwarded-Client-Cert", b"Hash=real")]
    out, _ = rewrite(incoming, identity_headers=ours)
    assert [name for name, _ in out if b"client" in name] == [b"x-clientele", b"x-forwarded-client-cert"]
    assert values(out, b"x-forwarded-client-cert") == [b"Hash=real"]


def test_sane_request_id_is_kept_else_one_is_generated():
    out, request_id = rewrite([(b"host", b"x"), (b"x-request-id", b"abc-123")])
    assert request_id == b"abc-123" and values(out, b"x-request-id") == [b"abc-123"]

    for insane in (b"", b"has space", b"a" * 201, b"semi;colon", b"\xff"):
        out, request_id = rewrite([(b"host", b"x"), (b"x-request-id", insane)])
        assert request_id != insane and values(out, b"x-request-id") == [request_id]

    out, request_id = rewrite([(b"host", b"x")], request_id=b"chosen-by-caller")
    assert request_id == b"chosen-by-caller"
    out, request_id = rewrite([(b"host", b"x"), (b"x-request-id", b"client")], request_id=b"chosen-by-caller")
    assert request_id == b"client"


def test_request_id_rules():
    assert is_sane_request_id(b"a" * 200) and not is_sane_request_id(b"a" * 201)
    assert new_request_id() != new_request_id()


def test_set_headers_replace_same_name_headers_and_empty_removes():
    service = Service(
        name="api",
        upstreams=SERVICE.upstreams,
        set_headers=(("X-Env", "dev"), ("X-Forwarded-Proto", "custom"), ("User-Agent", ""), ("X-Note", "é")),
    )
    out, _ = rewrite([(b"host", b"x"), (b"x-env", b"prod"), (b"user-agent", b"curl")], service=service)
    assert values(out, b"x-env") == [b"dev"]
    assert values(out, b"x-forwarded-proto") == [b"custom"]
    assert values(out, b"user-agent") == []
    assert values(out, b"x-note") == ["é".encode()]


@pytest.mark.parametrize("upgrade", [False, True])
def test_response_hop_by_hop_headers_are_removed(upgrade):
    out = downstream_response_headers(
        [
            (b"content-type", b"text/plain"),
            (b"connection", b"keep-alive, x-hop, upgrade"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"x-hop", b"1"),
            (b"content-length", b"3"),
        ],
        upgrade=upgrade,
    )
    expected = [(b"content-type", b"text/plain"), (b"content-length", b"3")]
    if upgrade:
        expected = [(b"content-type", b"text/plain"), (b"upgrade", b"websocket"), (b"content-length", b"3")]
        expected.append((b"connection", b"upgrade"))
    assert out == expected


# -- header lines relayed as the client sent them (forwarding.headers.as_received)


def _plain(raw: bytes):
    from proxy.http.h1.heads import plain_request

    head, _names = plain_request(raw, 65536)
    return head


def _relayed(raw: bytes, service=SERVICE):
    from proxy.forwarding.headers import as_received

    head = _plain(raw)
    return head, as_received(head.headers, head.raw_fields, client_ip="1.2.3.4", server_port=8443, service=service,
                             identity_headers=((b"X-Client-Subject", b"CN=alice"),))


@pytest.mark.parametrize(
    "lines",
    [
        b"Host: api.localhost:8443\r\nAccept: */*\r\nUser-Agent:  curl/8\r\n",
        b"Host: api.localhost:8443\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Mixed-Case: A b\r\n",
        b"Host: api.localhost:8443\r\nCONNECTION: Close\r\nContent-Length: 3\r\n",
        b"Host: api.localhost:8443\r\nAccept: a\r\nAccept: b\r\nConnection: close, keep-alive\r\n",
        b"Accept: */*\r\nConnection: close\r\nHost: api.localhost:8443\r\nUser-Agent: node\r\n",
    ],
)
def test_relayed_lines_say_what_the_rewritten_headers_say(lines):
    """The bytes relayed (the client's lines less Connection / Keep-Alive, then ours) parse
    to exactly what upstream_request_headers would send, our request id aside."""
    head, relayed = _relayed(b"GET /x HTTP/1.1\r\n" + lines + b"\r\n")
    assert relayed is not None
    fields, added, request_id = relayed
    sent = [(name.strip().lower(), value.strip()) for name, _, value in
            (line.partition(b":") for line in fields.split(b"\r\n")[1:])]
    expected, _ = rewrite(head.headers, identity_headers=((b"X-Client-Subject", b"CN=alice"),),
                          request_id=request_id)
    expected.sort(key=lambda header: header[0] != b"host")  # (Host first, as request_wire sends it)
    assert sent == expected
    assert sent[-len(added):] == added  # (the list an engine without the raw path appends)
    assert (b"x-request-id", request_id) in added and len(request_id) == 32


@pytest.mark.parametrize(
    "line",
    [
        b"X-Forwarded-For: 10.0.0.1", b"Forwarded: for=10.0.0.1", b"X-Request-Id: abc", b"X-Forwarded-Host: evil",
        b"X_Forwarded_Proto: http", b"X-Client-Cert: forged", b"SSL_CLIENT_S_DN: CN=forged", b"TE: trailers",
        b"Trailer: x", b"Upgrade: websocket", b"Proxy-Connection: keep-alive", b"Connection: keep-alive, X-Drop",
        b"Connection: upgrade",
    ],
)
def test_a_header_the_proxy_rewrites_sends_the_request_the_parsed_way(line):
    _head, relayed = _relayed(b"GET /x HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n")
    assert relayed is None


def test_set_headers_send_the_request_the_parsed_way():
    service = Service(name="api", upstreams=SERVICE.upstreams, set_headers=(("X-Env", "test"),))
    assert _relayed(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", service)[1] is None


@pytest.mark.parametrize(
    ("lines", "relayed"),
    [
        (b"Host: a\r\nAccept: */*", b"\r\nHost: a\r\nAccept: */*"),
        (b"Accept: */*\r\nHost: a", b"\r\nHost: a\r\nAccept: */*"),
        (b"User-Agent: node\r\nX-A:  1\r\nhOsT: a:8443\r\nAccept: */*",
         b"\r\nhOsT: a:8443\r\nUser-Agent: node\r\nX-A:  1\r\nAccept: */*"),
    ],
    ids=["host-first", "host-last", "host-third"],
)
def test_relayed_lines_have_the_host_line_first_and_the_rest_in_order(lines, relayed):
    assert _plain(b"GET /x HTTP/1.1\r\n" + lines + b"\r\n\r\n").raw_fields == relayed


def test_host_line_first_gives_up_when_the_lines_are_not_one_per_header():
    from proxy.http.h1.heads import _host_line_first

    assert _host_line_first(b"\r\nAccept: */*\r\nHost: a", 1, 2) == b"\r\nHost: a\r\nAccept: */*"
    assert _host_line_first(b"\r\nAccept: */*\r\nHost: a", 1, 3) == b""  # a line short (a fold)
    assert _host_line_first(b"\r\nAccept: */*\r\nX-Host: a", 1, 2) == b""  # not the Host line


def test_relayed_head_refuses_a_target_or_added_value_that_could_split_it():
    from proxy.errors import BadGateway
    from proxy.forwarding.headers import as_received
    from proxy.http.h1.heads import request_wire_as_received

    fields = b"\r\nHost: a\r\nx-a: 1"
    assert request_wire_as_received(b"GET", b"/x", fields) == b"GET /x HTTP/1.1\r\nHost: a\r\nx-a: 1\r\n\r\n"
    for target in (b"/x y", b"/x\r\nEvil: 1", b"/x\n", b"/x\x00"):
        with pytest.raises(BadGateway):
            request_wire_as_received(b"GET", target, fields)
    head = _plain(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    for bad in (b"CN=a\r\nEvil: 1", b"CN=a\n", b"CN=\x00"):  # such identity values go the parsed way (502)
        assert as_received(head.headers, head.raw_fields, client_ip="1.2.3.4", server_port=8443, service=SERVICE,
                           identity_headers=((b"x-client-subject", bad),)) is None


def test_relayed_lines_are_bounded_by_the_header_limit_and_carry_no_trailing_whitespace():
    """Padding around a value is not counted by the header limit (it counts values as
    parsed), so a head whose bytes pass the limit, or whose values end in whitespace, is
    sent the parsed way: re-spelled, within the limit (found by an attack on this path)."""
    from proxy.http.h1.heads import plain_request

    padded = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b" " * 12000 + b"a" + b"\t" * 3000 + b"\r\n\r\n"
    head, _names = plain_request(padded, 4096)
    assert head.header(b"x-pad") == b"a" and head.raw_fields == b""
    for spaced in (b"Content-Length: 3 ", b"X-A: b\t", b"Host2:  a  "):
        head, _names = plain_request(b"POST / HTTP/1.1\r\nHost: a\r\n" + spaced + b"\r\n\r\n", 4096)
        assert head.raw_fields == b""
    head, _names = plain_request(b"GET / HTTP/1.1\r\nHost: a\r\nX-A:   b\r\n\r\n", 4096)
    assert head.raw_fields == b"\r\nHost: a\r\nX-A:   b"  # (leading whitespace: every parser skips it)
