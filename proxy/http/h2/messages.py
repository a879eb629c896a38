"""HTTP/2 requests and responses as the engine's heads, with what HTTP/2 forbids refused.

``request_head``: a stream's header block -> the ``RequestHead`` the rest of the proxy
serves (routed, authorised, forwarded to HTTP/1.1 upstreams), or ``BadRequest`` /
``HeadersTooLarge`` on that stream alone. Refused, so nothing an HTTP/1.1 upstream
could frame or read differently goes through (the HTTP/2 -> HTTP/1.1 downgrade
request-smuggling class, RFC 9113 8.2 and 8.3):

* a connection-specific header (Connection, Keep-Alive, Proxy-Connection,
  Transfer-Encoding, Upgrade), ``TE`` other than ``trailers``;
* a name that is not a lowercase token (an uppercase letter, a space, a colon inside);
* a value with CR, LF, NUL or another control byte, or starting or ending in whitespace;
* pseudo-headers missing, repeated, unknown (``:protocol``: no extended CONNECT),
  after a regular header, or a ``:scheme`` other than http / https;
* a ``host`` header naming another host than ``:authority``, or two of them;
* a ``content-length`` on a request that ended with its headers, other than 0;
* and then every rule an HTTP/1.1 request is held to (``proxy.http.h1.heads``):
  CONNECT, the header-section limit, ``_`` lookalikes of framing names, a
  Content-Length of 2^53 or more, a Host that is not a plain ``host[:port]``.

The head's headers carry ``host`` first (from ``:authority``) and the cookie crumbs
joined with "; " (RFC 9113 8.2.3), as an HTTP/1.1 upstream expects them. A body
without a content-length goes to an HTTP/1.1 upstream chunked.

``response_fields``: a response head -> the HTTP/2 field list (``:status`` first, no
connection-specific header).

Towards HTTP/2 upstreams (h2c://, https:// with http2), the other way round:
``request_fields`` (a request head, whatever protocol it came in, with the headers the
proxy rewrote -> pseudo-headers first, Host as ``:authority``, ``te: trailers`` kept for
gRPC) and ``response_head`` / ``trailer_fields`` (an upstream's fields -> a head or
trailers any client can be sent: no pseudo-header, no hop-by-hop header, no control byte
a response could be split with — ``BadGateway`` otherwise).
"""

from __future__ import annotations

import re

from proxy.errors import BadGateway, BadRequest
from proxy.http.engine import Headers, RequestHead, ResponseHead
from proxy.http.h1.heads import CONTROL_BYTES
from proxy.http.h1.heads import request_head as checked_head
from proxy.http.h1.hop_by_hop import HOP_BY_HOP

HTTP2 = b"2"

_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_SCHEMES = frozenset({b"https", b"http"})
# A field name: a token (RFC 9110 5.6.2) in lowercase (RFC 9113 8.2.1).
_NAME = re.compile(rb"[a-z0-9!#$%&'*+.^_`|~-]+")
# Whitespace at either end of a value (RFC 9113 8.2.1; control bytes: proxy.http.h1.heads).
_EDGE_WHITESPACE = (b" ", b"\t")

_STATUS = {code: str(code).encode() for code in range(100, 600)}


def request_head(fields: Headers, *, ended: bool, max_header_bytes: int) -> RequestHead:
    """The request on one stream (``ended``: no body follows), or the reason it is refused."""
    pseudo: dict[bytes, bytes] = {}
    headers: Headers = []
    host: bytes | None = None
    cookies: list[bytes] = []
    length: bytes | None = None
    regular = False
    for name, value in fields:
        if value.startswith(_EDGE_WHITESPACE) or value.endswith(_EDGE_WHITESPACE):
            raise _malformed(f"whitespace around the value of {_text(name)}")
        if name[:1] == b":":
            if regular:
                raise _malformed(f"pseudo-header {_text(name)} after a regular header")
            if name not in _PSEUDO:
                raise _malformed(f"pseudo-header {_text(name)} is not one a request may carry")
            if name in pseudo:
                raise _malformed(f"pseudo-header {_text(name)} given twice")
            pseudo[name] = value
            continue
        regular = True
        if _NAME.fullmatch(name) is None:
            raise _malformed(f"header name {_text(name)} is not a lowercase token")
        if name in _CONNECTION_SPECIFIC:
            raise _malformed(f"connection-specific header {_text(name)} (not allowed in HTTP/2)")
        if name == b"te":
            if value.lower() != b"trailers":
                raise _malformed("TE other than \"trailers\"")
            headers.append((name, value))
        elif name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            if host is not None:
                raise _malformed("two host headers")
            host = value
        elif name == b"content-length":
            if not value.isdigit() or (length is not None and value != length):
                raise _malformed("content-length is not one number")
            length = value
            headers.append((name, value))
        else:
            headers.append((name, value))
    method = pseudo.get(b":method")
    if method is None:
        raise _malformed("no :method")
    if method == b"CONNECT":
        raise _malformed("CONNECT is not served here (this is a reverse proxy)")
    path = pseudo.get(b":path")
    scheme = pseudo.get(b":scheme")
    if not path or scheme is None:
        raise _malformed("no :path" if not path else "no :scheme")
    if scheme not in _SCHEMES:
        raise _malformed(f":scheme {_text(scheme)} (only http and https are served)")
    authority = pseudo.get(b":authority")
    if authority is not None and host is not None and authority.lower() != host.lower():
        raise _malformed(f":authority {_text(authority)} and host {_text(host)} name different hosts")
    authority = authority if authority is not None else host
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if authority is not None:
        headers.insert(0, (b"host", authority))
    head = checked_head(method, path, HTTP2, headers, max_header_bytes)
    if ended:
        if head.content_length:
            raise _malformed(f"content-length {head.content_length} on a request without a body")
    elif head.content_length is None:
        head.chunked = True  # the length is known only at END_STREAM: chunked to HTTP/1.1
    return head


def response_fields(head: ResponseHead) -> Headers:
    """``head`` as HTTP/2 fields: ``:status`` first, hop-by-hop headers left out (a head
    the client engine relayed raw may still carry Connection / Keep-Alive)."""
    fields = [(b":status", _STATUS.get(head.status) or str(head.status).encode())]
    fields.extend(field for field in head.headers if field[0] not in HOP_BY_HOP)
    return fields


def request_fields(head: RequestHead, headers: Headers, target: bytes, *, scheme: bytes, authority: bytes) -> Headers:
    """What goes to an HTTP/2 upstream for ``head`` with the rewritten ``headers``;
    ``authority`` stands in when the request has no Host (HTTP/1.0)."""
    host = None
    fields: Headers = []
    for name, value in headers:
        name = name.lower()  # (set_headers keep the config's spelling)
        if name == b"host":
            host = value
        elif name not in HOP_BY_HOP:
            fields.append((name, value))
    if head.header(b"te") is not None and b"trailers" in head.header(b"te").lower():
        fields.append((b"te", b"trailers"))  # gRPC servers require it; the only TE HTTP/2 allows
    return [
        (b":method", head.method), (b":scheme", scheme), (b":authority", host or authority), (b":path", target),
        *fields,
    ]


def response_head(fields: Headers, service: str) -> ResponseHead:
    """An HTTP/2 upstream's response header block as a head for any client."""
    status = None
    headers: Headers = []
    for name, value in fields:
        if name == b":status":
            status = value
        elif name[:1] != b":" and name not in HOP_BY_HOP:
            headers.append((name, value))
    if status is None or len(status) != 3 or not status.isdigit():
        raise BadGateway(f"service {service!r}: the upstream's HTTP/2 response has no valid :status")
    _check_values(headers, service)
    return ResponseHead(int(status), headers)


def trailer_fields(fields: Headers, service: str) -> Headers:
    """An upstream's trailers as they may be passed on (gRPC's grpc-status lives here)."""
    trailers = [(name, value) for name, value in fields if name[:1] != b":" and name not in HOP_BY_HOP]
    _check_values(trailers, service)
    return trailers


def _check_values(headers: Headers, service: str) -> None:
    joined = b"".join(value for _name, value in headers)  # one pass in C, as heads.request_head
    if len(joined.translate(None, CONTROL_BYTES)) != len(joined):
        raise BadGateway(f"service {service!r}: the upstream sent a control character in a header value")


def _malformed(reason: str) -> BadRequest:
    return BadRequest(f"malformed HTTP/2 request: {reason}")


def _text(value: bytes) -> str:
    return repr(value.decode("latin-1"))
