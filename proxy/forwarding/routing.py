"""Host + path -> Service, and the target sent upstream (pure, no I/O).

Rules (SPEC section 3):

* The Host header may carry a port or be a bracketed IPv6 literal; hosts compare
  lowercase, without a trailing dot. A service without ``hosts`` matches any host; a
  ``*.example.com`` host matches exactly one extra label (as certificate wildcards do).
* Among the services matching the host, the longest ``path_prefix`` wins; at equal
  length an exact host beats a wildcard host, which beats a host-less service, and
  then config order decides.
* A prefix matches at a segment boundary, case-insensitively: ``/api`` matches ``/api``,
  ``/API/``, ``/api/x`` but not ``/apix``; a prefix ending in ``/`` matches what starts
  with it; ``/`` matches everything.

Routing looks only at the path ``proxy.forwarding.paths.normalize_target`` made (dot
segments resolved, unreserved escapes decoded, slashes merged, ``;parameters`` left
out): ``route`` takes a ``RequestPath``, never a raw target, so no spelling of a prefix
(``/%6cedger``, ``//ledger``, ``/LEDGER``, ``/ledger;x``) escapes its service. Case is
ignored because some upstreams (Express) route case-insensitively; prefixes are read
through the same normalisation. What goes upstream is ``RequestPath.target``: the path
that was routed, with ``strip_prefix`` removing the prefix's segments.

Everything that depends only on the config is computed in ``Router.__init__``: one
candidate list per configured host, already in priority order, so ``route`` is a dict
lookup and a short scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from proxy.config.model import Service
from proxy.errors import BadRequest
from proxy.forwarding.paths import RequestPath, normalize_target

# Candidate rank at equal prefix length: lower wins.
_EXACT_HOST, _WILDCARD_HOST, _ANY_HOST = 0, 1, 2
_RAW_HOSTS_MAX = 4096


class _Candidate:
    """One service as seen from one host table: its prefix, precomputed for matching."""

    __slots__ = ("service", "prefix", "open_ended")

    def __init__(self, service: Service) -> None:
        self.service = service
        prefix = match_prefix(service.path_prefix)
        # "/" and "/api/" match anything that starts with them; "/api" needs a boundary.
        self.open_ended = prefix.endswith("/")
        self.prefix = prefix

    def matches(self, path: str) -> bool:
        """``path``: normalised and lowercase."""
        prefix = self.prefix
        if not path.startswith(prefix):
            return False
        if self.open_ended or len(path) == len(prefix):
            return True
        return path[len(prefix)] == "/"


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

    def route(self, host: str | None, path: RequestPath) -> Service | None:
        """The service for this Host header value and normalised request path, or None
        when nothing matches (the caller answers 404)."""
        table = self._table_for(host)
        lowered = path.lowered
        for candidate in table:
            if candidate.matches(lowered):
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


@lru_cache(maxsize=1024)  # pure; one value per configured prefix
def match_prefix(prefix: str | None) -> str:
    """A configured ``path_prefix`` as routing compares it: normalised as request paths
    are, lowercase (``/API/./v1`` -> ``/api/v1``)."""
    prefix = prefix or "/"
    try:
        prefix = normalize_target(prefix.encode("latin-1")).path
    except BadRequest:  # "%2f" and friends: no normalised request path can contain them
        pass
    return prefix.lower()


def upstream_target(service: Service, path: RequestPath) -> bytes:
    """The request target sent upstream: the normalised target, with the service's
    prefix segments removed when ``strip_prefix`` is set (``/api/x?q=1`` -> ``/x?q=1``,
    ``/API;v=2/x`` -> ``/x``, ``/api`` -> ``/``)."""
    target = path.target
    if not service.strip_prefix:
        return target
    prefix = match_prefix(service.path_prefix).rstrip("/")
    if not prefix or not path.lowered.startswith(prefix):
        return target  # nothing to strip, or not routed here by prefix: leave it alone
    # routed and forwarded paths have the same segments: drop as many as the prefix has
    end = 0
    query_at = target.find(b"?")
    stop = len(target) if query_at < 0 else query_at
    for _ in range(prefix.count("/")):
        end = target.find(b"/", end + 1, stop)
        if end < 0:
            return b"/" + target[stop:]
    return target[end:]


def _bare_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host.rstrip(".")


def _table(entries: list[tuple[int, int, Service, str | None]]) -> list[_Candidate]:
    """Candidates in match priority: longest prefix, then host rank, then config order;
    each service appears once (its best rank)."""
    ordered = sorted(entries, key=lambda e: (-len(match_prefix(e[2].path_prefix)), e[0], e[1]))
    seen: set[int] = set()
    table = []
    for _, order, service, _ in ordered:
        if order not in seen:
            seen.add(order)
            table.append(_Candidate(service))
    return table
