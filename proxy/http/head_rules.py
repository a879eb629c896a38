"""What a proxy checks in a request head beyond HTTP/1.1 grammar, for both engines.

The h11 and httptools engines tokenise heads differently, but both hand the parsed
method, target, version and headers to ``request_head``, so the rules a proxy adds on
top of the parser live here once:

* a request with both ``Content-Length`` and ``Transfer-Encoding`` is refused (h11
  would silently prefer chunked: a request-smuggling vector when the upstream does not);
* control characters in header values are refused (h11 lets them through);
* the header-section limit also applies to a head that arrived complete in one read;
* ``Expect: 100-continue`` and ``Upgrade`` are read the way h11 reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.errors import BadRequest, HeadersTooLarge
from proxy.http.engine import Headers, RequestHead

# Bytes not allowed in a field value (RFC 9110 5.5): CTLs other than HTAB, and DEL.
_CTL = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"


def head_size(method: bytes, target: bytes, headers: Headers) -> int:
    """The header section's size on the wire, give or take whitespace."""
    return len(method) + len(target) + 12 + sum(len(k) + len(v) + 4 for k, v in headers)


def has_ctl(headers: Headers) -> bool:
    values = b"".join(value for _, value in headers)
    return len(values.translate(None, _CTL)) != len(values)


def comma_values(headers: Headers, name: bytes) -> list[bytes]:
    """Lowercased, stripped items of every ``name`` header (h11's get_comma_header)."""
    out = []
    for key, value in headers:
        if key == name:
            for item in value.lower().split(b","):
                item = item.strip()
                if item:
                    out.append(item)
    return out


def request_head(
    method: bytes,
    target: bytes,
    http_version: bytes,
    headers: Headers,
    max_header_bytes: int,
    names: Sequence[bytes] | None = None,
) -> RequestHead:
    """The ``RequestHead`` for a parsed head (lowercase names, stripped values), or
    ``BadRequest`` / ``HeadersTooLarge`` when the proxy must not forward it.
    ``names``: the header names in order, when the caller has them already."""
    # Names and values apart (C-level), so size, control bytes and the few names that
    # matter are each one pass in C rather than a Python loop over every header.
    if names is None:
        names, values = zip(*headers) if headers else ((), ())
    else:
        values = [value for _, value in headers]
    joined = b"".join(values)
    size = len(method) + len(target) + 12 + len(b"".join(names)) + len(joined) + 4 * len(names)
    if size > max_header_bytes:
        raise HeadersTooLarge(f"request header section larger than {max_header_bytes} bytes")
    content_length = None
    if b"content-length" in names:
        for name, value in headers:
            if name == b"content-length":
                content_length = int(value)
    chunked = b"transfer-encoding" in names
    if chunked and content_length is not None:
        raise BadRequest("malformed request: both Content-Length and Transfer-Encoding")
    if len(joined.translate(None, _CTL)) != len(joined):
        raise BadRequest("malformed request: control character in a header value")
    upgrade = False
    if b"upgrade" in names and b"connection" in names:
        for name, value in headers:
            if name == b"connection" and b"upgrade" in value.lower():
                upgrade = True
                break
    expect_continue = (
        b"expect" in names and http_version >= b"1.1" and b"100-continue" in comma_values(headers, b"expect")
    )
    return RequestHead(
        method, target, headers, http_version, content_length, chunked, expect_continue, upgrade
    )
