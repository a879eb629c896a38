"""Hop-by-hop headers (RFC 9110 7.6.1): about one connection, never relayed.

Every engine applies these on every path: a response head relayed as received has
its Connection and Keep-Alive lines cut (``ClientEngine.next_event``), one re-framed
by a server engine loses them here, one rebuilt by the relay loses the whole set
(``proxy.forwarding.headers``). Keep-Alive and Proxy-Connection are hop-by-hop by
custom.
"""

from __future__ import annotations

import re

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


# A relayed head loses these lines (values cannot hold CR or LF, so only line starts match).
CONNECTION_LINES = re.compile(rb"\r\n(?:connection|keep-alive):[^\r]*", re.IGNORECASE)
KEEP_ALIVE_OR_CLOSE = frozenset({b"keep-alive", b"close"})


def relayable(raw: bytes, headers: Headers, names: list[bytes]) -> bytes:
    """A response head's bytes ``raw`` as a client may get them (``headers`` / ``names``: at
    least every hop-by-hop header in it): without its Connection
    and Keep-Alive lines (most servers send ``Connection: keep-alive``), or b"" when
    anything else in it is for this hop only (``ClientEngine.next_event``)."""
    if HOP_BY_HOP.isdisjoint(names):
        return raw
    if not OTHER_HOP_BY_HOP.isdisjoint(names):
        return b""
    if b"connection" in names:
        for name, value in headers:
            if name == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token and token not in KEEP_ALIVE_OR_CLOSE:
                        return b""  # it names headers to drop
    if b"keep-alive" not in names and names.count(b"connection") == 1:
        # The usual one line (``Connection: keep-alive``): cut where two finds say. The
        # case-blind regex below costs about 5,000 instructions a head (callgrind).
        start = raw.lower().find(b"\r\nconnection:")
        return raw[:start] + raw[raw.index(b"\r", start + 2) :]
    return CONNECTION_LINES.sub(b"", raw)
