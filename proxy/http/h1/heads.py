"""HTTP/1 heads: the rules a proxy adds to the grammar, and the fast path's tokenising.

The rules (``request_head``), for both engines. The h11 and httptools engines tokenise
heads differently, but both hand the parsed method, target, version and headers to
``request_head``, so the rules a proxy adds on top of the parser live here once:

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

The tokenising, for the httptools engine's fast path: a head found where h11 would find
its end (``HEAD_END``) is tokenised by llhttp and taken only when it is plain — a
request line ``METHOD SP target SP HTTP/1.x`` (a status line ``HTTP/1.x NNN reason``),
exactly one Host, no Transfer-Encoding but a lone ``chunked``. Anything else is h11's to
judge (``proxy.http.h1.fallback``), so both engines refuse the same heads. A response
head's lines are checked by llhttp without a callback per header: one regex pass finds
the framing and hop-by-hop ones, and its full list is split from its bytes only when
asked (``LazyResponseHead``; a head relayed as received never is). Heads a
proxy writes are serialised here too, with h11's framing rules for responses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from operator import itemgetter

from proxy.errors import BadGateway, BadRequest, HeadersTooLarge
from proxy.http.engine import Headers, RequestHead, ResponseHead
from proxy.http.h1.bodies import CHUNKED, DISCARD, LENGTH, NO_BODY, UNTIL_CLOSE, BodyWriter

try:
    import httptools  # the fast path's tokeniser; an install without it runs on h11 alone
except ImportError:  # pragma: no cover
    httptools = None

# Bytes not allowed in a field value (RFC 9110 5.5): CTLs other than HTAB, and DEL.
CONTROL_BYTES = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"
# Largest Content-Length every upstream reads the same (2^53: exact in a double).
MAX_CONTENT_LENGTH = (1 << 53) - 1
_CONTENT_LENGTH_MAX_DIGITS = 20  # h11.CONTENT_LENGTH_MAX_DIGITS
# Framing names an upstream may also match with "_" for "-".
_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection"})
# Host (RFC 9110 7.2, RFC 3986 3.2.2): a reg-name or IPv4 address of unreserved
# characters, or a bracketed IPv6 address, then an optional port. Stricter than RFC 3986
# on purpose: sub-delims ("," ";" "=" ...) would split X-Forwarded-Host and Forwarded
# lists, and percent-encoding would route one name and let an upstream that decodes it
# read another; no DNS name or IP address needs either.
_HOST = re.compile(
    rb"(?:[A-Za-z0-9._~-]+|\[([0-9A-Fa-f:.]+)\])"
    rb"(?::(?:[0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"  # 0-65535
)

# Host values found valid (a connection's requests repeat one): checked once, not per request.
_valid_hosts: set[bytes] = set()

# Where h11 ends a header section; using the same boundary keeps the engines in step.
HEAD_END = re.compile(rb"\n\r?\n")
HEAD_END_OVERLAP = 2  # a match is at most 3 bytes long (ReceiveBuffer.find)
# Plain request / status lines (anything else goes to h11 for its verdict).
_PLAIN_REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) HTTP/(1\.[01])\r\n")
_PLAIN_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?: ([\t\x20-\x7e\x80-\xff]*))?\r\n")
_UNSENDABLE = b"\r\n\x00"
_name_of = itemgetter(0)
_value_of = itemgetter(1)


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
    return match is not None and (match.lastindex is None or _ipv6_literal(match))


def _ipv6_literal(match: re.Match) -> bool:
    """The bracketed part of a Host is an IPv6 address (no zone, no IPvFuture)."""
    try:
        ipaddress.IPv6Address(match.group(1).decode("ascii"))
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
    if method.upper() == b"CONNECT":
        # A reverse proxy has no tunnel to offer: forwarded, an upstream's 2xx would tell
        # the client a tunnel opened (h11 then stops parsing the connection as HTTP,
        # llhttp does not). Refused like anything else the proxy will not frame.
        raise BadRequest("malformed request: CONNECT is not served here (this is a reverse proxy)")
    if method == b"PRI":  # RFC 9113 3.4: the method only the HTTP/2 preface uses
        raise BadRequest(
            "malformed request: an HTTP/2 connection preface (PRI * HTTP/2.0) on an HTTP/1.1 "
            "connection: over TLS, HTTP/2 is chosen by ALPN, not by prior knowledge"
        )
    if names is None:
        names, values = zip(*headers) if headers else ((), ())
    else:
        values = [*map(_value_of, headers)]
    joined = b"".join(values)
    joined_names = b"".join(names)
    size = len(method) + len(target) + 12 + len(joined_names) + len(joined) + 4 * len(names)
    if size > max_header_bytes:
        raise HeadersTooLarge(f"request header section larger than {max_header_bytes} bytes")
    if 95 in joined_names:  # b"_" (an int: memchr, several times cheaper than a bytes needle)
        lookalike = _framing_lookalike(names)
        if lookalike is not None:
            raise BadRequest(f"malformed request: header {lookalike.decode('latin-1')!r} may be read as a framing header")
    content_length = None
    if b"content-length" in names:
        for name, value in headers:
            if name == b"content-length":
                if len(value) > _CONTENT_LENGTH_MAX_DIGITS:  # h11's limit: both engines refuse alike
                    raise BadRequest("malformed request: Content-Length longer than 20 digits")
                content_length = int(value)
        if content_length > MAX_CONTENT_LENGTH:
            raise BadRequest("malformed request: Content-Length of 2^53 or more")
    if b"host" in names:  # (only one: both engines refuse a second Host before this)
        host = headers[names.index(b"host")][1]
        if host not in _valid_hosts:
            if not valid_host(host):
                raise BadRequest("malformed request: Host is not a valid host[:port]")
            if len(_valid_hosts) >= 4096:
                _valid_hosts.clear()
            _valid_hosts.add(host)
    chunked = b"transfer-encoding" in names
    if chunked and content_length is not None:
        raise BadRequest("malformed request: both Content-Length and Transfer-Encoding")
    if len(joined.translate(None, CONTROL_BYTES)) != len(joined):
        raise BadRequest("malformed request: control character in a header value")
    upgrade = False
    if b"upgrade" in names and b"connection" in names:
        for name, value in headers:
            if name == b"connection" and b"upgrade" in value.lower():
                upgrade = True
                break
        # h2c is cleartext HTTP/2 only (RFC 9113 deprecates even that): over TLS an
        # "Upgrade: h2c" is never legitimate, and tunnelling it would let the client's
        # HTTP/2 streams reach the upstream unrouted and unauthorised ("h2c smuggling").
        # Not an upgrade, then: the Upgrade header goes as any hop-by-hop header does.
        # Drafts' tokens too ("h2c-14"), and "HTTP/2.0".
        if upgrade and any(item.startswith((b"h2c", b"http/2")) for item in comma_values(headers, b"upgrade")):
            upgrade = False
    expect_continue = (
        b"expect" in names and http_version >= b"1.1" and b"100-continue" in comma_values(headers, b"expect")
    )
    return RequestHead(
        method, target, headers, http_version, content_length, chunked, expect_continue, upgrade
    )


# -- the fast path's tokenising (llhttp), for the httptools engine


class _HeadFields:
    """llhttp's callback target for a request head: collects its headers (names
    lowercased and values stripped as h11 does). The target comes from the request
    line's match, which only a plain line passes: the same bytes llhttp would call back."""

    __slots__ = ("headers", "padded")

    def __init__(self) -> None:
        self.headers: Headers = []
        self.padded = False  # a value ended in whitespace (then its bytes are not relayed as sent)

    def on_header(self, name: bytes, value: bytes) -> None:
        stripped = value.rstrip(b" \t")
        if stripped is not value:  # (bytes.rstrip returns the value itself when nothing goes)
            self.padded = True
        self.headers.append((name.lower(), stripped))


class _Checked:
    """llhttp's target for a response head: no callback at all. llhttp checks its lines;
    the reason comes from the status line's match (what llhttp would call back), one
    regex pass finds the framing and hop-by-hop lines, and the whole list is split from
    the bytes only if something asks for it (``LazyResponseHead``): nine Python calls
    fewer for a typical upstream's head."""

    __slots__ = ()


_CHECKED = _Checked()  # (stateless: one for every response)


def _tokenise(parser_class: type, head: bytes, fields: object) -> bool:
    """Tokenise a complete head with llhttp into ``fields``; False when llhttp refuses it."""
    try:
        parser_class(fields).feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # (the head is complete; what follows is not llhttp's business)
    except httptools.HttpParserError:
        return False
    return True


# The member the dataclass keeps ResponseHead.headers in (LazyResponseHead fills it late).
_HEADERS_SLOT = ResponseHead.__dict__["headers"]


class LazyResponseHead(ResponseHead):
    """A plain response head whose header list is split from its bytes on first use:
    one relayed as received (most are: ``ResponseHead.raw``) never needs it. The same
    list the tokeniser's callbacks made (names lowercased, values stripped): llhttp
    accepted the bytes, so each line is ``name:value`` with no CR or LF inside."""

    __slots__ = ("_lines",)

    def __init__(
        self, status: int, headers: Headers | None = None, reason: bytes = b"", raw: bytes = b"",
        content_length: int = 0, *, lines: bytes = b"",
    ) -> None:
        # (ResponseHead's fields first, so dataclasses.replace works on it too)
        _HEADERS_SLOT.__set__(self, headers)
        self._lines = lines  # the header lines, CRLF-separated, without the blank line
        self.status = status
        self.reason = reason
        self.raw = raw
        self.content_length = content_length

    @property  # type: ignore[override]
    def headers(self) -> Headers:
        headers = _HEADERS_SLOT.__get__(self)
        if headers is None:
            lines = self._lines
            headers = [
                (name.lower(), value.strip(b" \t"))
                for name, _, value in (line.partition(b":") for line in lines.split(b"\r\n"))
            ] if lines else []
            _HEADERS_SLOT.__set__(self, headers)
        return headers

    @headers.setter
    def headers(self, headers: Headers) -> None:
        _HEADERS_SLOT.__set__(self, headers)

    def __eq__(self, other: object) -> bool:
        """Equal to a ResponseHead with the same fields (the dataclass's own test would
        want the same class)."""
        if isinstance(other, ResponseHead):
            return (self.status, self.headers, self.reason) == (other.status, other.headers, other.reason)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable, as ResponseHead)


# The response headers the engine acts on (framing, hop-by-hop): found in a plain head's
# lowercased bytes in one pass (each line starts after a CRLF; values hold no CR). Their
# values are compared lowercased anyway; a case-blind pattern on the bytes as they came
# would cost the regex engine several times more (callgrind). Values come out stripped as
# h11 strips them: the value is the line's rest up to its last character that is not
# whitespace, taken greedily (the regex engine's tight loop over the line, then a step
# back over any trailing blanks). A Python rstrip per value cost more than the regex
# does, and a lazy value (``[^\r]*?``) tries the end of the line at every byte: 16.9k
# instructions a findall on a 9-line nginx head against 11.5k (callgrind).
_RESPONSE_CONTROL = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|keep-alive|proxy-connection|te|trailer|upgrade)"
    rb":[ \t]*((?:[^\r]*[^\r \t])?)[ \t]*(?=\r|\Z)"
)


def names_of(headers: Headers) -> list[bytes]:
    return [*map(_name_of, headers)]


def plain_request(raw: bytes, max_header_bytes: int) -> tuple[RequestHead, list[bytes]] | None:
    """A complete request head (``raw`` ends with its blank line) and its header names,
    when it is plain; None when h11 must decide. Raises as ``request_head`` does."""
    line = _PLAIN_REQUEST_LINE.match(raw)
    if line is None:
        return None
    fields = _HeadFields()
    if not _tokenise(httptools.HttpRequestParser, raw, fields):
        return None
    headers = fields.headers
    names = [*map(_name_of, headers)]
    method, target, version = line.groups()
    if names.count(b"host") != 1 or (b"transfer-encoding" in names and plain_chunked(headers, version) is None):
        return None
    head = request_head(method, target, version, headers, max_header_bytes, names)
    end = line.end()
    if (
        len(raw) <= max_header_bytes  # (the limit above counts values stripped: bound the bytes too)
        and not fields.padded  # no value relayed with whitespace after it
        and raw.endswith(b"\r\n\r\n")  # (HEAD_END also ends a head at LF LF)
    ):
        lines = raw[end - 2 : -4]
        head.raw_fields = lines if names[0] == b"host" else _host_line_first(lines, names.index(b"host"), len(names))
    return head, names


def _host_line_first(lines: bytes, at: int, count: int) -> bytes:
    """A head's header ``lines`` (each after a CRLF) with the Host line, header ``at``
    of ``count``, moved first -- where ``request_wire`` and h11 write it, as RFC 9112
    3.2 asks of clients -- the others in their order; b"" when the lines are not one per
    header. Node's http and Java's clients put Host after their other headers: relayed
    as received, such a request's parse and head take 130.2k instructions instead of
    the re-built way's 144.9k (callgrind)."""
    split = lines.split(b"\r\n")  # ["", line 0, line 1, ...]
    at += 1
    if len(split) != count + 1 or split[at][:5].lower() != b"host:":
        return b""
    return b"\r\n".join((b"", split[at], *split[1:at], *split[at + 1 :]))


def plain_response(raw: bytes, upgrade_asked: bool) -> tuple[ResponseHead, Headers, list[bytes]] | None:
    """A complete response head when it is plain, with the headers that decide its
    framing and hop-by-hop handling (every Content-Length, Transfer-Encoding and
    hop-by-hop header, in order) and their names; None when h11 must decide (also a 101
    nobody asked for, which h11 refuses). Its full header list is made on first use."""
    line = _PLAIN_STATUS_LINE.match(raw)
    if line is None:
        return None
    if not _tokenise(httptools.HttpResponseParser, raw, _CHECKED):
        return None
    control = _RESPONSE_CONTROL.findall(raw.lower())
    names = [*map(_name_of, control)]
    if b"transfer-encoding" in names and plain_chunked(control, raw[5:8]) is None:
        return None
    status = int(raw[9:12])  # the plain status line's three digits, as llhttp read them
    if status == 101 and not upgrade_asked:
        return None
    return LazyResponseHead(status, None, line.group(1) or b"", lines=raw[line.end() : -4]), control, names


def plain_chunked(headers: Headers, http_version: bytes) -> bool | None:
    """For a fast-path head with a Transfer-Encoding header: True if the body is chunked
    the way h11 accepts it, None when h11 must decide (any other Transfer-Encoding)."""
    codings = [value for name, value in headers if name == b"transfer-encoding"]
    if not codings:
        return False
    if len(codings) == 1 and codings[0] == b"chunked" and http_version == b"1.1":
        return True
    return None


def wants_close(headers: Headers, names: list[bytes], http_version: bytes) -> bool:
    """h11's keep-alive rule: ``Connection: close`` or an HTTP/1.0 peer ends the connection."""
    return http_version < b"1.1" or (b"connection" in names and has_connection_close(headers, names))


# _NOT_A_BYTES_NEEDLE: on Python 3.11, ``b"," in value`` first tries the needle as an
# int, and raises and clears a TypeError (its message formatted) before it searches:
# ~1.8k instructions, against a memchr for ``44 in value`` (callgrind: two such tests
# were 1.2 % of a keep-alive request's instructions). Single-byte needles are ints here.


def has_connection_close(headers: Headers, names: list[bytes]) -> bool:
    """``close`` among the Connection tokens (h11's rule), without a loop for the usual
    single plain value such as ``keep-alive``."""
    if names.count(b"connection") == 1:
        value = headers[names.index(b"connection")][1].lower()
        if 44 not in value:  # b"," as an int (see _NOT_A_BYTES_NEEDLE)
            return value.strip() == b"close"
    return b"close" in comma_values(headers, b"connection")


def content_lengths(headers: Headers, names: list[bytes]) -> list[bytes]:
    """``comma_values(headers, b"content-length")``, without its loop for the usual one plain value."""
    count = names.count(b"content-length")
    if count == 1:
        value = headers[names.index(b"content-length")][1]
        if 44 not in value:  # b"," as an int (see _NOT_A_BYTES_NEEDLE)
            item = value.lower().strip()
            return [item] if item else []
    return comma_values(headers, b"content-length") if count else []


# -- writing heads


def header_lines(headers: Headers) -> bytes:
    """``name: value`` CRLF for each header, then the blank line."""
    if not headers:
        return b"\r\n"
    return b"\r\n".join(map(b": ".join, headers)) + b"\r\n\r\n"


def _sendable(wire: bytes, line_count: int) -> bool:
    """A serialised head holds no CR, LF or NUL beyond the CRLFs ending its
    ``line_count`` lines (blank line included): nothing in a name, value, method or
    target could split or end it. One pass over the bytes instead of one per header."""
    return len(wire) - len(wire.translate(None, _UNSENDABLE)) == 2 * line_count


def request_wire(method: bytes, target: bytes, headers: Headers) -> tuple[bytes, Headers, list[bytes]]:
    """A request head as sent upstream (Host first, like h11: some servers look for it
    there), the headers in that order and their names; BadGateway if it cannot be sent."""
    names = [*map(_name_of, headers)]
    if names.count(b"host") != 1:
        raise BadGateway("request cannot be sent upstream: exactly one Host header is needed")
    at = names.index(b"host")
    if at:
        headers = [headers[at], *headers[:at], *headers[at + 1 :]]
        names = [b"host", *names[:at], *names[at + 1 :]]
    wire = b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, target, b"\r\n".join(map(b": ".join, headers)))
    # (_sendable and header_lines inline: this runs for every request; 32 is b" ", as an
    # int: _NOT_A_BYTES_NEEDLE)
    if len(wire) - len(wire.translate(None, _UNSENDABLE)) != 2 * (len(headers) + 2) or 32 in target:
        raise BadGateway("request cannot be sent upstream: illegal byte in the request head")
    return wire, headers, names


def request_wire_as_received(method: bytes, target: bytes, fields: bytes) -> bytes:
    """A request head whose header lines are ``fields``: the client's as received (from a
    plain head: the rules already held for every byte of them) and the proxy's after them
    (checked when made: ``forwarding.headers.as_received``); BadGateway if the target
    could split it."""
    if len(target.translate(None, _UNSENDABLE_IN_TARGET)) != len(target):
        raise BadGateway("request cannot be sent upstream: illegal byte in the request head")
    return b"%s %s HTTP/1.1%s\r\n\r\n" % (method, target, fields)


_UNSENDABLE_IN_TARGET = _UNSENDABLE + b" "


def response_wire(status: int, head: ResponseHead, headers: Headers) -> bytes:
    """A response head with ``headers`` (already framed); BadGateway if it cannot be sent."""
    lines = header_lines(headers)
    if status >= 200 and not _sendable(lines, len(headers) + 1):
        raise BadGateway("upstream response cannot be relayed: illegal header")
    return b"HTTP/1.1 %d %s\r\n" % (status, head.reason) + lines


def frame_response(
    status: int, headers: Headers, method: bytes, version: bytes | None, keep_alive: bool, writer: BodyWriter
) -> tuple[Headers, bool]:
    """Choose a final response's framing (set on ``writer``) and fix its headers as h11
    does, for a request of ``method`` / ``version`` (None: none parsed, so HTTP/1.0
    rules). The headers (never changed in place) and whether the connection stays open."""
    need_close = False
    framing = LENGTH
    names = names_of(headers)
    if status in (204, 304) or (method == b"CONNECT" and 200 <= status < 300):
        framing = NO_BODY
        writer.remaining = 0
    else:
        chunked = b"transfer-encoding" in names
        lengths = content_lengths(headers, names)
        if lengths and not chunked:
            writer.remaining = int(lengths[0])
        else:
            headers = [(n, v) for n, v in headers if n != b"content-length" and n != b"transfer-encoding"]
            names = names_of(headers)
            if version is None or version < b"1.1":
                framing = UNTIL_CLOSE
                need_close = method != b"HEAD"
            else:
                framing = CHUNKED
                headers.append((b"transfer-encoding", b"chunked"))
    if method == b"HEAD":
        framing = DISCARD
        writer.remaining = 0
    writer.framing = framing
    if need_close or not keep_alive or (b"connection" in names and has_connection_close(headers, names)):
        keep_alive = False
        tokens = set(comma_values(headers, b"connection"))
        tokens.discard(b"keep-alive")
        tokens.add(b"close")
        headers = [(n, v) for n, v in headers if n != b"connection"]
        headers.append((b"connection", b", ".join(sorted(tokens))))
    return headers, keep_alive
