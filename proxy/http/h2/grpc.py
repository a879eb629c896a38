"""gRPC as the proxy speaks it when it answers a call itself.

A gRPC client reads the outcome of a call from ``grpc-status`` / ``grpc-message``, not
from the HTTP status (gRPC over HTTP/2, PROTOCOL-HTTP2.md): a 403 page means nothing to
it ("UNKNOWN: Received http2 header with status: 403"). So a refusal, no route, an
upstream down or too slow — anything the proxy answers on its own — goes to a gRPC
request as a "Trailers-Only" response: HTTP 200, ``content-type: application/grpc``,
the status code mapped as SPEC 4b says, and the same reason in words the HTTP body
would carry (percent-encoded, as the protocol requires).
"""

from __future__ import annotations

from proxy.http.engine import Headers

# grpc/status.h codes
OK = 0
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

_BY_HTTP_STATUS = {
    400: INTERNAL,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    421: UNAVAILABLE,
    431: RESOURCE_EXHAUSTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc``, ``application/grpc+proto``, ``application/grpc-web…`` excluded."""
    if content_type is None:
        return False
    value = content_type.lower()
    return value == b"application/grpc" or value.startswith((b"application/grpc+", b"application/grpc;"))


def status_for(http_status: int, *, unauthenticated: bool = False) -> int:
    """The gRPC status for a response the proxy makes (403 without a certificate: 16)."""
    if http_status == 403 and unauthenticated:
        return UNAUTHENTICATED
    return _BY_HTTP_STATUS.get(http_status, INTERNAL if http_status >= 400 else OK)


def error_fields(code: int, message: str) -> Headers:
    """A Trailers-Only response (sent as one HEADERS frame that ends the stream)."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(code).encode()),
        (b"grpc-message", percent_encode(message)),
    ]


def percent_encode(message: str) -> bytes:
    """grpc-message encoding: UTF-8, bytes outside printable ASCII and ``%`` as %XX."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)
