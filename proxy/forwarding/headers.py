"""Request and response header rewriting (SPEC section 4); pure, no I/O.

Header names arrive lowercase as bytes (h11's convention, which both engines follow)
and leave lowercase. Upstream requests:

1. Hop-by-hop headers go: Connection and every name it lists, Keep-Alive,
   Proxy-Connection, TE, Trailer, Transfer-Encoding (the engine re-frames bodies) and
   Upgrade, unless an upgrade is being tunnelled, which keeps Upgrade and sends
   ``Connection: upgrade``. Connection cannot take Host or Content-Length with it.
2. Client identity headers go (``proxy.tls.identity.is_identity_header``): only the
   handshake may speak about the client certificate; ``identity_headers`` are added
   afterwards.
3. The forwarding headers are ours: X-Forwarded-For and Forwarded are appended to
   what the client sent, X-Forwarded-Proto/-Host/-Port replaced, X-Request-Id kept
   when sane. Their underscore spellings (``X_Forwarded_For``) go too, since
   CGI-style frameworks read them as the same header.
4. The service's ``set_headers`` replace same-name headers (an empty value removes
   the header, like nginx's ``proxy_set_header X ""``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from operator import itemgetter

from proxy.config.model import Service
from proxy.http.engine import HOP_BY_HOP
from proxy.http.h1.hop_by_hop import CONNECTION_LINES, CONNECTION_MANAGEMENT, KEEP_ALIVE_OR_CLOSE
from proxy.tls.identity import is_identity_header

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP_KEEP_UPGRADE = HOP_BY_HOP - {b"upgrade"}
_name_of = itemgetter(0)
# Connection may not list these away: framing and routing depend on them.
_PROTECTED = frozenset({b"host", b"content-length"})
# Headers this module owns on the way upstream; the client's copies are consumed.
_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"forwarded", b"x-request-id"}
)

# RFC 9110 tchar: what a token (and a sane request id) may contain.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
REQUEST_ID_MAX = 200


def upstream_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client_ip: str,
    server_port: int,
    service: Service,
    request_id: bytes | None = None,
    identity_headers: Sequence[tuple[bytes, bytes]] = (),
    upgrade: bool = False,
    proto: bytes = b"https",
) -> tuple[Headers, bytes]:
    """The headers to send upstream and the X-Request-Id they carry.

    ``request_id`` is the id to use when the client sent no sane one (one is generated
    when it is None too); a sane client id always wins so ids follow a request across
    hops. ``proto``: how the client reached the proxy (``http`` on a ``listen_plain``
    listener), for X-Forwarded-Proto and Forwarded.
    """
    drop = HOP_BY_HOP_KEEP_UPGRADE if upgrade else HOP_BY_HOP
    kept: Headers = []
    forwarded_for: list[bytes] = []
    forwarded: list[bytes] = []
    listed: set[bytes] | None = None
    host: bytes | None = None
    client_request_id: bytes | None = None

    for name, value in headers:
        if name in drop:
            if name == b"connection":
                listed = _connection_tokens(value, listed)
            continue
        if name in _FORWARDING:
            if name == b"x-forwarded-for":
                forwarded_for.append(value)
            elif name == b"forwarded":
                forwarded.append(value)
            elif name == b"x-request-id" and client_request_id is None and is_sane_request_id(value):
                client_request_id = value
            continue
        spoofed = _spoofed_names.get(name)
        if spoofed is None:
            spoofed = _is_spoofed(name)
        if spoofed:
            continue
        if name == b"host" and host is None:
            host = value
        kept.append((name, value))

    if listed or upgrade:
        kept = _finish_hop_by_hop(kept, listed, drop, upgrade)
    used_id = _add_ours(
        kept, forwarded_for, forwarded, host, client_request_id or request_id or new_request_id(),
        client_ip=client_ip, server_port=server_port, proto=proto, identity_headers=identity_headers,
    )
    if service.set_headers:
        replace, additions = _encoded_set_headers(service.set_headers)
        kept = [(name, value) for name, value in kept if name not in replace]
        kept.extend(additions)
    return kept, used_id


def _add_ours(
    kept: Headers,
    forwarded_for: list[bytes],
    forwarded: list[bytes],
    host: bytes | None,
    request_id: bytes,
    *,
    client_ip: str,
    server_port: int,
    proto: bytes,
    identity_headers: Sequence[tuple[bytes, bytes]],
) -> bytes:
    """Append the forwarding headers (after the client's own X-Forwarded-For and
    Forwarded values), the request id and the identity headers to ``kept``; the id."""
    forwarded_for.append(client_ip.encode("ascii"))
    kept.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    kept.append((b"x-forwarded-proto", proto))
    if host is not None:
        kept.append((b"x-forwarded-host", host))
    kept.append((b"x-forwarded-port", _port_bytes(server_port)))
    forwarded.append(forwarded_element(client_ip, host, proto))
    kept.append((b"forwarded", b", ".join(forwarded)))
    kept.append((b"x-request-id", request_id))
    if identity_headers:
        kept.extend((name.lower(), value) for name, value in identity_headers)
    return request_id


def as_received(
    headers: Sequence[tuple[bytes, bytes]],
    fields: bytes,
    *,
    client_ip: str,
    server_port: int,
    service: Service,
    identity_headers: Sequence[tuple[bytes, bytes]] = (),
    proto: bytes = b"https",
) -> tuple[bytes, Headers, bytes] | None:
    """The request's header lines as they go upstream when the client's may go as it
    sent them (SPEC 4 unchanged): ``fields`` (its ``RequestHead.raw_fields``) less any
    ``Connection: keep-alive / close`` and Keep-Alive lines, then ours (each line after
    a CRLF, as ``fields`` has them); ours as a list too (for an engine that writes the
    parsed headers); and the X-Request-Id. None when any of its headers is one this
    module rewrites or drops (then ``upstream_request_headers``).

    A request whose headers are all ordinary (most: Host, Accept, User-Agent...) would
    come out of ``upstream_request_headers`` as the same list plus ours; relaying its
    bytes saves re-parsing and re-joining every header (bench/calls.py). Which names are
    ordinary is decided once per name (``_ordinary``), as for ``_spoofed_names``."""
    if service.set_headers:
        return None
    names = [*map(_name_of, headers)]
    cut = False
    if not _ordinary.issuperset(names):
        for name in names:
            if name in _ordinary:
                continue
            if name in CONNECTION_MANAGEMENT:
                cut = True
            elif not _is_ordinary(name):
                return None
        if cut:
            for name, value in headers:
                if name == b"connection" and not KEEP_ALIVE_OR_CLOSE.issuperset(_connection_tokens(value, None)):
                    return None  # it names headers to drop
            fields = CONNECTION_LINES.sub(b"", fields)
    host = headers[names.index(b"host")][1] if b"host" in names else None
    ours = _ours_around_the_id(client_ip, host, server_port, proto, tuple(identity_headers))
    if ours is None:
        return None  # a value that cannot be sent: the parsed way answers 502 as ever
    before, after, before_wire, after_wire = ours
    request_id = new_request_id()  # (hex: nothing to check)
    added = [*before, (b"x-request-id", request_id), *after]
    return b"%s%s\r\nx-request-id: %s%s" % (fields, before_wire, request_id, after_wire), added, request_id


@lru_cache(maxsize=1024)  # a connection's requests repeat one set of arguments
def _ours_around_the_id(
    client_ip: str, host: bytes | None, server_port: int, proto: bytes, identity_headers: tuple[tuple[bytes, bytes], ...]
) -> tuple[Headers, Headers, bytes, bytes] | None:
    """What ``as_received`` adds around a request's X-Request-Id — the forwarding headers
    before it, the identity headers after it — as lists and as header lines (each after a
    CRLF), checked once to hold no CR, LF or NUL of their own (else None)."""
    ours: Headers = []
    _add_ours(ours, [], [], host, b"", client_ip=client_ip, server_port=server_port, proto=proto,
              identity_headers=identity_headers)
    at = ours.index((b"x-request-id", b""))
    before, after = ours[:at], ours[at + 1 :]
    before_wire, after_wire = (b"".join(b"\r\n%s: %s" % pair for pair in part) for part in (before, after))
    for wire, part in ((before_wire, before), (after_wire, after)):
        if len(wire) - len(wire.translate(None, b"\r\n\x00")) != 2 * len(part):
            return None
    return before, after, before_wire, after_wire


# Header names that go upstream untouched (never hop-by-hop, ours or a spoofing risk).
_ordinary: set[bytes] = set()


def _is_ordinary(name: bytes) -> bool:
    ordinary = not (name in HOP_BY_HOP or name in _FORWARDING or _is_spoofed(name))
    if ordinary and len(_ordinary) < _SPOOFED_NAMES_MAX:
        _ordinary.add(name)
    return ordinary


def downstream_response_headers(
    headers: Sequence[tuple[bytes, bytes]], *, upgrade: bool = False
) -> Headers:
    """An upstream response's headers without its hop-by-hop ones; with ``upgrade``
    (a 101 being tunnelled) Upgrade stays and ``Connection: upgrade`` is sent."""
    drop = HOP_BY_HOP_KEEP_UPGRADE if upgrade else HOP_BY_HOP
    listed: set[bytes] | None = None
    kept: Headers = []
    for name, value in headers:
        if name in drop:
            if name == b"connection":
                listed = _connection_tokens(value, listed)
            continue
        kept.append((name, value))
    if listed or upgrade:
        kept = _finish_hop_by_hop(kept, listed, drop, upgrade)
    return kept


def _finish_hop_by_hop(kept: Headers, listed: set[bytes] | None, drop: frozenset[bytes], upgrade: bool) -> Headers:
    """Remove the headers the Connection header named (never Host or Content-Length),
    and with ``upgrade`` send ``Connection: upgrade`` for the tunnel."""
    if listed:
        listed -= _PROTECTED
        listed -= drop  # already gone (``Connection: keep-alive``): no second pass for them
        if upgrade:
            listed.discard(b"upgrade")
        if listed:
            kept = [(name, value) for name, value in kept if name not in listed]
    if upgrade:
        kept.append((b"connection", b"upgrade"))
    return kept


@lru_cache(maxsize=4096)  # pure, and a connection's requests repeat the same pair
def forwarded_element(client_ip: str, host: bytes | None, proto: bytes = b"https") -> bytes:
    """One RFC 7239 element: ``for=1.2.3.4;proto=https;host=x``; IPv6 becomes
    ``for="[::1]"``, and values that are not tokens (``host:port``) are quoted."""
    node = f'"[{client_ip}]"' if ":" in client_ip else client_ip
    element = b"for=" + node.encode("ascii") + b";proto=" + proto
    if host is not None:
        element += b";host=" + _token_or_quoted(host)
    return element


def is_sane_request_id(value: bytes) -> bool:
    """A client-sent X-Request-Id worth keeping: 1..200 token characters (nothing that
    could smuggle separators or spaces into logs)."""
    return 0 < len(value) <= REQUEST_ID_MAX and not value.translate(None, _TCHAR)


def new_request_id() -> bytes:
    """128 random bits as 32 hex characters (uuid4-sized, without uuid's overhead).

    The bits come from os.urandom read ahead in 4 KiB and hex-encoded at once, so 256
    ids cost one syscall and each one a slice."""
    global _random_pool, _random_offset
    offset = _random_offset
    if offset >= len(_random_pool):
        _random_pool, offset = os.urandom(_RANDOM_POOL_BYTES).hex().encode("ascii"), 0
    _random_offset = offset + 32
    return _random_pool[offset : offset + 32]


_RANDOM_POOL_BYTES = 4096
_random_pool = b""  # hex digits not handed out yet
_random_offset = 0


def _reset_random_pool() -> None:
    """A forked worker must not hand out its parent's unused random bytes again."""
    global _random_pool, _random_offset
    _random_pool, _random_offset = b"", 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_random_pool)


@lru_cache(maxsize=64)
def _port_bytes(port: int) -> bytes:
    return str(port).encode("ascii")


# Header names seen so far -> whether they are a client's claim we never forward.
# Request headers repeat the same few dozen names, so a dict hit replaces the checks.
_spoofed_names: dict[bytes, bool] = {}
_SPOOFED_NAMES_MAX = 4096


def _is_spoofed(name: bytes) -> bool:
    """An identity header, or an underscore spelling of a forwarding header."""
    spoofed = is_identity_header(name) or (b"_" in name and name.replace(b"_", b"-") in _FORWARDING)
    if len(_spoofed_names) < _SPOOFED_NAMES_MAX:
        _spoofed_names[name] = spoofed
    return spoofed


def _connection_tokens(value: bytes, into: set[bytes] | None) -> set[bytes]:
    tokens = into if into is not None else set()
    for token in value.split(b","):
        token = token.strip().lower()
        if token:
            tokens.add(token)
    return tokens


def _token_or_quoted(value: bytes) -> bytes:
    if value and not value.translate(None, _TCHAR):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@lru_cache(maxsize=1024)
def _encoded_set_headers(
    set_headers: tuple[tuple[str, str], ...],
) -> tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]]:
    """(names to replace, headers to add) for one service; cached so each request
    only pays a tuple hash."""
    encoded = [(name.strip().lower().encode("ascii"), value.encode("utf-8")) for name, value in set_headers]
    return frozenset(name for name, _ in encoded), tuple((n, v) for n, v in encoded if v)
