"""Hop-by-hop headers (RFC 9110 7.6.1): about one connection, never relayed.

Every engine applies these on every path: a response head relayed as received has
its Connection and Keep-Alive lines cut (``ClientEngine.next_event``), one re-framed
by a server engine loses them here, one rebuilt by the relay loses the whole set
(``proxy.forwarding.headers``). Keep-Alive and Proxy-Connection are hop-by-hop by
custom.
"""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]  # (as in proxy.http.engine, which imports this module)

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# What may stay in a head relayed as received: ``Connection: keep-alive / close`` and
# Keep-Alive are cut from its bytes; any other hop-by-hop header means re-framing it.
CONNECTION_MANAGEMENT = frozenset({b"connection", b"keep-alive"})
OTHER_HOP_BY_HOP = HOP_BY_HOP - CONNECTION_MANAGEMENT


def without_connection_management(headers: Headers) -> Headers:
    """``headers`` less Connection and Keep-Alive: for a head whose raw bytes are not
    sent as they are (the only hop-by-hop headers such a head can carry)."""
    return [(name, value) for name, value in headers if name not in CONNECTION_MANAGEMENT]
