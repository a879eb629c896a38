"""Host + path -> Service, and the target sent upstream (pure, no I/O).

Rules (SPEC section 3):

* The Host header may carry a port or be a bracketed IPv6 literal; hosts compare
  lowercase, without a trailing dot. A service without ``hosts`` matches any host; a
  ``*.example.com`` host matches exactly one extra label (as certificate wildcards do).
* Among the services matching the host, the longest ``path_prefix`` wins; at equal
  length an exact host beats a wildcard host, which beats a host-less service, and
  then config order decides.
* A prefix matches at a segment boundary: ``/api`` matches ``/api``, ``/api/``,
  ``/api/x`` and ``/api?q`` but not ``/apix``; a prefix ending in ``/`` matches what
  starts with it; ``/`` matches everything.

Routing looks at the path with dot segments removed (``/pub/../admin`` routes as
``/admin``, ``%2e`` counting as ``.``), so a client cannot reach a service under one
prefix while an upstream that normalises paths serves it under another. Like nginx,
the original target goes upstream unchanged unless ``strip_prefix`` rewrites it, in
which case the rewritten target is built from the normalised path.

Everything that depends only on the config is computed in ``Router.__init__``: one
candidate list per configured host, already in priority order, so ``route`` is a dict
lookup and a short scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from proxy.config.model import Service

# Candidate rank at equal prefix length: lower wins.
_EXACT_HOST, _WILDCARD_HOST, _ANY_HOST = 0, 1, 2
_RAW_HOSTS_MAX = 4096


class _Candidate:
    """One service as seen from one host table: its prefix, precomputed for matching."""

    __slots__ = ("service", "prefix", "open_ended")

    def __init__(self, service: Service) -> None:
        self.service = service
        prefix = service.path_prefix or "/"
        # "/" and "/api/" match anything that starts with them; "/api" needs a boundary.
        self.open_ended = prefix.endswith("/")
        self.prefix = prefix

    def matches(self, path: str) -> bool:
        prefix = self.prefix
        if not path.startswith(prefix):
            return False
        if self.open_ended or len(path) == len(prefix):
            return True
        return path[len(prefix)] in "/?"


class Router:
    """Chooses the service for a request; build once per config, share freely."""

    def __init__(self, services: Sequence[Service]) -> None:
        self.services = tuple(services)
        ranked: list[tuple[int, int, Service, str | None]] = []  # (rank, order, service, host)
        for order, service in enumerate(self.services):
            if not service.hosts:
                ranked.append((_ANY_HOST, order, service, None))
            for host in service.hosts:
                host = _bare_host(host.lower())
                rank = _WILDCARD_HOST if host.startswith("*.") else _EXACT_HOST
                ranked.append((rank, order, service, host))

        any_host = [entry for entry in ranked if entry[0] == _ANY_HOST]
        wildcards: dict[str, list] = {}
        exact: dict[str, list] = {}
        for entry in ranked:
            if entry[0] == _WILDCARD_HOST:
                wildcards.setdefault(entry[3][2:], []).append(entry)
            elif entry[0] == _EXACT_HOST:
                exact.setdefault(entry[3], []).append(entry)

        self._any_host = _table(any_host)
        self._by_wildcard = {parent: _table(entries + any_host) for parent, entries in wildcards.items()}
        self._by_host = {}
        for host, entries in exact.items():
            parent = host.partition(".")[2]
            self._by_host[host] = _table(entries + wildcards.get(parent, []) + any_host)
        # Host header values as sent (with a port, in capitals...) -> their table, so a
        # connection's requests normalise their Host once; bounded, as clients pick them.
        self._by_raw_host: dict[str, list[_Candidate]] = {}

    def route(self, host: str | None, path: str) -> Service | None:
        """The service for this Host header value and request path (query allowed), or
        None when nothing matches (the caller answers 404)."""
        table = self._table_for(host)
        if "/." in path or "%" in path or not path.startswith("/"):
            path = routing_path(path)
        for candidate in table:
            if candidate.matches(path):
                return candidate.service
        return None

    def _table_for(self, host: str | None) -> list[_Candidate]:
        if not host:
            return self._any_host
        table = self._by_host.get(host)  # fast path: already lowercase, no port
        if table is not None:
            return table
        table = self._by_raw_host.get(host)
        if table is not None:
            return table
        bare = normalize_host(host)
        table = self._by_host.get(bare)
        if table is None:
            table = self._by_wildcard.get(bare.partition(".")[2])
            if table is None:
                table = self._any_host
        if len(self._by_raw_host) < _RAW_HOSTS_MAX:
            self._by_raw_host[host] = table
        return table


@lru_cache(maxsize=4096)  # pure; the same few Host and SNI values come with every request
def normalize_host(value: str) -> str:
    """A Host header value (or SNI) as routing compares it: lowercase, without the port,
    brackets or a trailing dot (``API.Localhost:8443`` -> ``api.localhost``,
    ``[::1]:8443`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:  # one colon: host:port; more: a bare IPv6 literal
        value = value.partition(":")[0]
    return value.rstrip(".")


def routing_path(target: str) -> str:
    """The path part of a request target with ``.``/``..`` segments resolved (``%2e``
    counts as ``.``), the query kept; what routing and ``strip_prefix`` look at."""
    path, mark, query = target.partition("?")
    if not path.startswith("/"):
        return target  # "*" (OPTIONS) or absolute-form: matches no prefix boundary logic
    if "%" in path:
        path = path.replace("%2e", ".").replace("%2E", ".")
    if "/." in path:
        path = _remove_dot_segments(path)
    return path + mark + query


def upstream_target(service: Service, target: bytes) -> bytes:
    """The request target sent upstream: unchanged, or with the service's prefix
    removed when ``strip_prefix`` is set (``/api/x?q=1`` -> ``/x?q=1``, ``/api`` -> ``/``)."""
    if not service.strip_prefix:
        return target
    prefix = service.path_prefix.rstrip("/")
    if not prefix:
        return target
    text = target.decode("latin-1")
    if "/." in text or "%" in text:
        text = routing_path(text)
    if not text.startswith(prefix):
        return target  # not routed here by prefix; leave it alone
    rest = text[len(prefix) :]
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest.encode("latin-1")


def _bare_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host.rstrip(".")


def _table(entries: list[tuple[int, int, Service, str | None]]) -> list[_Candidate]:
    """Candidates in match priority: longest prefix, then host rank, then config order;
    each service appears once (its best rank)."""
    ordered = sorted(entries, key=lambda e: (-len(e[2].path_prefix or "/"), e[0], e[1]))
    seen: set[int] = set()
    table = []
    for _, order, service, _ in ordered:
        if order not in seen:
            seen.add(order)
            table.append(_Candidate(service))
    return table


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path."""
    output: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        elif segment == ".":
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)
