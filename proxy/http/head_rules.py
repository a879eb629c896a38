"""What a proxy checks in a request head beyond HTTP/1.1 grammar, for both engines.

The h11 and httptools engines tokenise heads differently, but both hand the parsed
method, target, version and headers to ``request_head``, so the rules a proxy adds on
top of the parser live here once:

* a request with both ``Content-Length`` and ``Transfer-Encoding`` is refused (h11
  would silently prefer chunked: a request-smuggling vector when the upstream does not);
* control characters in header values are refused (h11 lets them through);
* the header-section limit also applies to a head that arrived complete in one read;
* framing an upstream may read differently is refused: a ``Content-Length`` of 2^53 or
  more (past what a JavaScript or double-based parser holds exactly), a name that is
  ``Content-Length``, ``Transfer-Encoding``, ``Host`` or ``Connection`` with ``_`` for
  ``-`` (many frameworks read ``Transfer_Encoding`` as ``Transfer-Encoding``), and a
  ``Host`` that is not a plain ``host[:port]`` (it is routed on, and forwarded in Host,
  X-Forwarded-Host and Forwarded);
* ``Expect: 100-continue`` and ``Upgrade`` are read the way h11 reads them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from proxy.errors import BadRequest, HeadersTooLarge
from proxy.http.engine import Headers, RequestHead

# Bytes not allowed in a field value (RFC 9110 5.5): CTLs other than HTAB, and DEL.
_CTL = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"
# Largest Content-Length every upstream reads the same (2^53: exact in a double).
MAX_CONTENT_LENGTH = (1 << 53) - 1
# Framing names an upstream may also match with "_" for "-".
_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection"})
# Host (RFC 9110 7.2, RFC 3986 3.2.2): a reg-name or IPv4 address of unreserved
# characters, or a bracketed IPv6 address, then an optional port. Stricter than RFC 3986
# on purpose: sub-delims ("," ";" "=" ...) would split X-Forwarded-Host and Forwarded
# lists, and percent-encoding would route one name and let an upstream that decodes it
# read another; no DNS name or IP address needs either.
_HOST = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[([0-9A-Fa-f:.]+)\])(?::([0-9]{1,5}))?")


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


def valid_host(value: bytes) -> bool:
    """``value`` is a plain ``host[:port]`` (see ``_HOST``)."""
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    literal, port = match.groups()
    if port is not None and int(port) > 65535:
        return False
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return False
    return True


def _framing_lookalike(names: Sequence[bytes]) -> bytes | None:
    """A header name that is a framing name with ``_`` for ``-``, if any."""
    for name in names:
        if b"_" in name and name.replace(b"_", b"-") in _FRAMING_NAMES:
            return name
    return None


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
    joined_names = b"".join(names)
    size = len(method) + len(target) + 12 + len(joined_names) + len(joined) + 4 * len(names)
    if size > max_header_bytes:
        raise HeadersTooLarge(f"request header section larger than {max_header_bytes} bytes")
    if b"_" in joined_names:
        lookalike = _framing_lookalike(names)
        if lookalike is not None:
            raise BadRequest(f"malformed request: header {lookalike.decode('latin-1')!r} may be read as a framing header")
    content_length = None
    if b"content-length" in names:
        for name, value in headers:
            if name == b"content-length":
                content_length = int(value)
        if content_length > MAX_CONTENT_LENGTH:
            raise BadRequest("malformed request: Content-Length of 2^53 or more")
    if b"host" in names:
        for name, value in headers:
            if name == b"host" and not valid_host(value):
                raise BadRequest("malformed request: Host is not a valid host[:port]")
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
