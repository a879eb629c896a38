"""Request target -> the one normalised path that is routed and forwarded, or 400.

The router decides which client-certificate policy applies by the path prefix, so the
router must read the path as any common upstream could read it; and what was routed
must be what goes upstream, or the upstream may serve ``//ledger`` or ``/%6cedger``
as ``/ledger`` while the proxy applied the open service's policy (SPEC section 4).
Like Envoy with ``normalize_path``, ``merge_slashes`` and
``path_with_escaped_slashes_action: REJECT_REQUEST``:

* percent-encoded unreserved characters (ALPHA DIGIT ``-._~``) are decoded
  (``%6c`` -> ``l``); other escapes are kept, with uppercase hex (RFC 3986 6.2.2.1);
* a segment's ``;parameters`` are ignored for matching (so ``..;`` is a dot segment, as
  Tomcat and Spring read it) but kept in what is forwarded; an encoded ``;`` (``%3B``)
  starts them too for matching, for servers that decode before they cut parameters
  (``..%3B`` is then a dot segment; Spring Security refuses ``%3B`` for that reason);
* dot segments are resolved (encoded ones too; ``..`` above the root is dropped) and
  repeated slashes merged; a dot or empty segment takes its parameters with it;
* refused (``BadRequest``, 400): an encoded ``/`` or ``\\`` in the path (upstreams
  disagree on whether it separates segments), a bare ``\\`` (Windows servers and some
  frameworks read it as ``/``), a raw or encoded control character (NUL ... US, DEL:
  truncation and log injection), a malformed ``%`` escape, a ``#`` anywhere (a fragment
  is never sent; servers that drop it would see another path), a raw byte outside
  printable ASCII (h11 refuses those already; both engines must agree), and any target
  that is neither origin-form (``/path?query``) nor ``*``. Absolute-form
  (``http://host/path``) is refused rather than routed: its authority would compete with
  the Host header that routing and the SNI check use.

The query is kept byte for byte. ``*`` (``OPTIONS *``) is passed through; it matches no
path prefix, so the router answers 404. Pure: no I/O, no config.
"""

from __future__ import annotations

import re

from proxy.errors import BadRequest

# A path that needs no work: segments of RFC 3986 pchar minus "%" and ";", none empty
# and none starting with "." (so no "//" and no dot segment). Nearly every request.
_PLAIN_PATH = re.compile(rb"(?:/[A-Za-z0-9_~!$&'()*+,:=@-][A-Za-z0-9._~!$&'()*+,:=@-]*)+/?|/")
# Printable ASCII but "#": what a query may hold.
_PLAIN_QUERY = re.compile(rb"[!\"$-~]*")
_NOT_PRINTABLE = re.compile(rb"[^!-~]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})?")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class RequestPath:
    """A request target as the proxy reads it.

    ``path``    the normalised path without ``;parameters`` or query: what routing
                matches (case-insensitively) and ``strip_prefix`` counts segments in;
    ``target``  the same path with each kept segment's ``;parameters`` and the query as
                sent: what goes upstream. Both have the same segments, in order.
    """

    __slots__ = ("path", "target", "lowered")

    def __init__(self, path: str, target: bytes) -> None:
        self.path = path
        self.target = target
        self.lowered = path.lower()  # what prefixes are matched against (case-insensitively)

    def __repr__(self) -> str:
        return f"RequestPath({self.path!r}, {self.target!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequestPath) and (self.path, self.target) == (other.path, other.target)


# Targets seen recently -> their RequestPath (immutable): clients repeat the same few
# URLs, and a dict lookup costs a tenth of normalising again. Bounded in entries and in
# the length of a target kept; refused targets are never kept (they raise each time).
_SEEN: dict[bytes, RequestPath] = {}
_SEEN_MAX = 4096
_SEEN_TARGET_MAX = 256


def normalize_target(target: bytes) -> RequestPath:
    """The ``RequestPath`` for a request target as it arrived, or ``BadRequest``."""
    seen = _SEEN.get(target)
    if seen is not None:
        return seen
    result = _normalize_target(target)
    if len(target) <= _SEEN_TARGET_MAX:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        _SEEN[target] = result
    return result


def _normalize_target(target: bytes) -> RequestPath:
    path, mark, query = target.partition(b"?")
    if _PLAIN_PATH.fullmatch(path) and (not query or _PLAIN_QUERY.fullmatch(query)):
        return RequestPath(path.decode("ascii"), target)  # the fast path: nothing to do
    if _NOT_PRINTABLE.search(target):
        raise BadRequest("bad request target: a control character, space or non-ASCII byte")
    if b"#" in target:
        raise BadRequest("bad request target: '#' (a fragment is never sent to a server)")
    if target == b"*":
        return RequestPath("*", target)
    if not path.startswith(b"/"):
        raise BadRequest("bad request target: only /path targets are accepted (not absolute-form)")
    routed, forwarded = _normalize_path(path.decode("ascii"))
    return RequestPath(routed, forwarded.encode("ascii") + mark + query)


def _normalize_path(path: str) -> tuple[str, str]:
    """(path without parameters, path with them) for a printable-ASCII absolute path."""
    if "\\" in path:
        raise BadRequest("bad request target: '\\' in the path")
    if "%" in path:
        path = _ESCAPE.sub(_decode_escape, path)
    segments = path.split("/")
    last = len(segments) - 1
    routed: list[str] = []
    forwarded: list[str] = []
    for index in range(1, last + 1):
        segment = segments[index]
        name = segment.partition(";")[0]
        if "%3B" in name:  # escapes are in capitals by now
            name = name.partition("%3B")[0]
        if name == "..":
            if routed:
                routed.pop()
                forwarded.pop()
        elif name != "." and (name or index == last):  # a real segment, or the trailing slash
            routed.append(name)
            forwarded.append(segment)
            continue
        if index == last:  # "/a/.." and "/a/." end with a slash (RFC 3986 5.2.4)
            routed.append("")
            forwarded.append("")
    return "/" + "/".join(routed), "/" + "/".join(forwarded)


def _decode_escape(match: re.Match[str]) -> str:
    digits = match.group(1)
    if digits is None:
        raise BadRequest("bad request target: '%' not followed by two hex digits")
    code = int(digits, 16)
    if code in _UNRESERVED:
        return chr(code)
    if code < 0x20 or code == 0x7F:
        raise BadRequest(f"bad request target: encoded control character %{digits.upper()} in the path")
    if code in (0x2F, 0x5C):
        raise BadRequest(f"bad request target: encoded '{chr(code)}' (%{digits.upper()}) in the path")
    return "%" + digits.upper()
