"""One request, from its parsed head to its access-log line.

Each request reads the current config generation once, at its start, and is decided
with it whole (a reload in between applies to the next request): route it, check the
client (SNI/Host agreement -> 421, the certificate against the listener's and the
service's policy -> 403), apply the limits, rewrite the headers (identity headers from
the handshake only), hand it to a relay, write one access-log record. Every failure
arrives as a ``proxy.errors.HTTPError`` and is answered in one place: with its status
while no response byte has gone out, otherwise by closing the connection. A request
whose body was not read to its end ends the connection after the answer.

``RequestCycle`` holds those steps apart so that two drivers share them exactly:
``handle_request`` (a coroutine: HTTP/2 streams, and any HTTP/1.1 request that must
wait for something other than its response's bytes) and the HTTP/1.1 connection's
callbacks (``proxy.server.connection``), which run the usual request — no body, an idle
pooled upstream connection — without a coroutine at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable

from proxy.config.model import Service
from proxy.errors import BadGateway, Forbidden, HTTPError, MisdirectedRequest, NotFound, PayloadTooLarge
from proxy.forwarding.headers import as_received, upstream_request_headers
from proxy.forwarding.paths import RequestPath, normalize_target
from proxy.forwarding.routing import normalize_host, upstream_target
from proxy.http.engine import RequestHead
from proxy.server.channel import ConnectionLost
from proxy.server.downstream import ClientInfo, Downstream
from proxy.server.generation import Generation
from proxy.server.h2_relay import H2Relay
from proxy.server.relay import Relay
from proxy.server.state import ServerState
from proxy.server.upstream_pool import UpstreamConnection
from proxy.tls.authz import misdirected

log = logging.getLogger("tlsproxy")

# The access log's ``protocol``, by the request's version.
_PROTOCOLS = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0", b"2": "HTTP/2"}


class RequestCycle:
    """One request's state between its steps: ``begin`` (decide and prepare, or raise),
    then a relay's run, then ``done`` or ``failed``, then ``end`` (the log line)."""

    __slots__ = (
        "down", "head", "state", "started", "stamp", "service", "relay", "request_id", "status", "headers",
        "target", "fields",
    )

    def __init__(self, down: Downstream, head: RequestHead, state: ServerState) -> None:
        self.started = time.monotonic()
        self.stamp = time.time()
        self.down = down
        self.head = head
        self.state = state
        self.service: Service | None = None
        self.relay: Relay | H2Relay | None = None
        self.request_id: bytes | None = None
        self.status = 0
        self.headers: list = []  # what goes upstream (with ``fields``: only what the proxy adds)
        self.target = b""
        self.fields: bytes | None = None  # the client's header lines, when they go upstream as it sent them

    def begin(self) -> None:
        """Route, check and prepare the request and its relay; HTTPError when refused."""
        down, head = self.down, self.head
        info = down.info
        generation = self.state.generation  # this request's config, whatever a reload does meanwhile
        config = generation.config
        host = head.header(b"host")
        host_text = host.decode("latin-1") if host is not None else None
        path = normalize_target(head.target)  # once: what is routed is what goes upstream
        service = self.service = generation.router.route(host_text, path)
        if service is None:
            raise NotFound(f"no service for host {host_text or '(none)'!r} and path {path.path!r}")
        _check_client(info, service, host_text, path, generation)
        limit = config.limits.max_body_bytes
        if limit and head.content_length is not None and head.content_length > limit:
            raise PayloadTooLarge(f"request body of {head.content_length} bytes is larger than {limit} bytes")
        http2 = service.http2_upstream
        if head.raw_fields and not http2:
            relayed = as_received(
                head.headers, head.raw_fields, client_ip=info.ip, server_port=info.server_port, service=service,
                identity_headers=info.identity_headers, proto=info.scheme,
            )
            if relayed is not None:
                self.fields, self.headers, self.request_id = relayed
        if self.fields is None:
            self.headers, self.request_id = upstream_request_headers(
                head.headers, client_ip=info.ip, server_port=info.server_port, service=service,
                identity_headers=info.identity_headers, upgrade=head.upgrade, proto=info.scheme,
            )
        self.target = upstream_target(service, path)
        upstream_tls = generation.upstream_tls.get(service.name)  # (https:// upstreams)
        state = self.state
        if http2:
            self.relay = H2Relay(down, head, service, state.h2_pool, config.timeouts, limit, state.is_closing, upstream_tls)
        else:
            if down.grpc:
                raise BadGateway(
                    f"service {service.name!r}: gRPC needs HTTP/2 to the upstream, and {service.upstreams[0].url} "
                    "speaks HTTP/1.1: make the service's upstream h2c:// (or https:// with upstream_tls.http2: true)"
                )
            self.relay = Relay(down, head, service, state.pool, config.timeouts, limit, state.is_closing, upstream_tls)

    def run(self) -> Awaitable[int]:
        """The relay's whole trip, as a coroutine (``relayed`` awaits it)."""
        return self.relay.run(self.headers, self.target, self.fields)

    def start(self) -> UpstreamConnection | None:
        """The request sent without waiting (``Relay.start``: no body, an idle pooled
        connection, HTTP/1.1 upstream): the connection its response will come on; None
        when the request needs ``run`` instead."""
        relay = self.relay
        if type(relay) is not Relay or self.head.has_body or self.head.upgrade:
            return None
        return relay.start(self.headers, self.target, self.fields)

    def resume(self, conn: UpstreamConnection, step: object) -> Awaitable[int]:
        """The rest of a started request's trip (``Relay.resume``), as a coroutine."""
        return self.relay.resume(conn, self.headers, self.target, self.fields, step)  # type: ignore[union-attr]

    async def relayed(self, relaying: Awaitable[int]) -> bool:
        """Await the relay's trip, then answer, log and say whether the connection may
        carry another request (``handle_request``'s end, for any part of the trip)."""
        try:
            self.status = await relaying
            keep_alive = self.down.next_cycle()
        except Exception as exc:  # (the kinds ``failed`` tells apart)
            keep_alive = self.failed(exc)
        finally:
            self.end()
        return keep_alive

    def done(self, status: int) -> bool:
        """The relay finished without waiting: whether the connection may go on (then ``end``)."""
        self.status = status
        return self.down.next_cycle()

    def failed(self, exc: Exception) -> bool:
        """Answer what failed the request, if it can still be answered; whether the
        connection may carry another (then ``end``)."""
        down, state = self.down, self.state
        info = down.info
        if isinstance(exc, HTTPError):
            self.status = exc.status
            subject = info.trusted_identity.subject if info.trusted_identity is not None else None
            service = self.service
            state.events.request_error(info.address, subject, service.name if service else None, exc.status, str(exc))
            return _answer_error(down, exc, close=not down.request_complete or state.closing)
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            log.debug("connection from %s ended: %r", info.address, exc)
        else:  # a bug: log it, never take the process down
            log.error("internal error while relaying a request from %s", info.address, exc_info=exc)
        down.abort()
        return False

    def end(self) -> None:
        """The request's access-log record and metrics."""
        _record(self.state, self.down, self.started, self.stamp, self.head, self.status, self.service, self.relay,
                self.request_id)


async def handle_request(down: Downstream, head: RequestHead, state: ServerState) -> bool:
    """Answer one request; True when the connection may carry another."""
    cycle = RequestCycle(down, head, state)
    try:
        cycle.begin()
    except Exception as exc:
        keep_alive = cycle.failed(exc)
        cycle.end()
        return keep_alive
    return await cycle.relayed(cycle.run())


def refuse_request(down: Downstream, exc: HTTPError, state: ServerState) -> None:
    """A request refused before it has a head the proxy will serve: answer it (and, on
    HTTP/1.1, close: the rest of the connection cannot be framed), log it."""
    started = time.monotonic()
    down.bytes_in = down.bytes_out = 0
    _answer_error(down, exc, close=True)
    _record(state, down, started, time.time(), None, exc.status)


def _record(
    state: ServerState,
    down: Downstream,
    started: float,
    stamp: float,
    head: RequestHead | None,
    status: int,
    service: Service | None = None,
    relay: Relay | H2Relay | None = None,
    request_id: bytes | None = None,
) -> None:
    """One access-log record and the request metrics (``head`` None: unparseable)."""
    seconds = time.monotonic() - started
    info = down.info
    name = service.name if service is not None else None
    state.metrics.record_request(name or "", status, seconds)
    if head is not None:
        protocol, method, path = _PROTOCOLS.get(head.http_version, down.protocol), head.method, head.target
    else:
        protocol, method, path = down.protocol, None, None
    identity = info.identity  # a verified client certificate: a 403 line says which one
    state.access_log.write_request((
        stamp, info.address, info.tls_version, info.sni, protocol, method, path, status, down.bytes_in,
        down.bytes_out, seconds * 1000, name, relay.upstream_url if relay is not None else None, request_id,
        identity.subject if identity is not None else None,
        "sha256:" + identity.fingerprint_sha256 if identity is not None else None,
    ))  # (access_log.REQUEST_FIELDS; the duration is rounded when the log formats it)


def _check_client(
    info: ClientInfo, service: Service, host: str | None, path: RequestPath, generation: Generation
) -> None:
    """421 when SNI and Host reach services with different client-certificate
    policies; 403 when the verified certificate (or its absence) is not admitted.

    What the connection decided is cached in ``info`` for ``generation`` only: the
    first request under a new generation renders the identity headers and decides
    admissions afresh (a reload that narrowed an allow-list refuses the next request)."""
    if info.generation is not generation:  # a reload since this connection's last request
        identity = info.identity
        if identity is not None and (reason := generation.still_trusts(identity)) is not None:
            log.info("client %s: its certificate is no longer accepted after a reload: %s", info.address, reason)
            identity = None
        info.generation, info.trusted_identity, info.decisions = generation, identity, {}
        info.identity_headers = generation.identity_headers(identity)
    listener = generation.config.client_auth
    sni = info.sni
    if sni is not None and host is not None and normalize_host(host) != normalize_host(sni):
        sni_service = generation.router.route(sni, path)
        if misdirected(sni_service, service, listener):
            raise MisdirectedRequest(
                f"this connection was set up for {sni!r} (service {sni_service.name!r}); Host {host!r} "
                f"reaches service {service.name!r}, which admits different client certificates: "
                "connect with the server name in the URL"
            )
    decision = info.decisions.get(service.name)
    if decision is None:
        decision = info.decisions[service.name] = generation.authorize(info.trusted_identity, service)
    if not decision.allowed:
        raise Forbidden(decision.reason, unauthenticated=info.trusted_identity is None)


def _answer_error(down: Downstream, exc: HTTPError, *, close: bool) -> bool:
    """Answer ``exc`` if no response has started, else abort; True if keep-alive."""
    if not down.can_respond:
        down.abort()  # mid-response: only closing tells the client it failed
        return False
    try:
        down.send_error(exc.status, str(exc), close=close, unauthenticated=getattr(exc, "unauthenticated", False))
    except ConnectionLost:
        return False
    if close:
        return False
    return down.next_cycle()
