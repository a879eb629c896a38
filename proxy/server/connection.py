"""One client connection after the TLS handshake: the keep-alive request loop.

Each request reads the current config generation once, at its start, and is decided
with it whole (a reload in between applies to the next request). For each request:
route it, check the client (SNI/Host agreement -> 421, the
certificate against the listener's and the service's policy -> 403), apply the
limits, rewrite the headers (identity headers from the handshake only), hand it to the
``Relay``, write one access-log record. Every failure arrives here as a
``proxy.errors.HTTPError`` and is answered in one place: with its status while no
response byte has gone out, otherwise by closing the connection. A request whose
body was not read to its end ends the connection after the answer.
"""

from __future__ import annotations

import logging
import time

from proxy.config.model import Service
from proxy.errors import BadGateway, Forbidden, HTTPError, MisdirectedRequest, NotFound, PayloadTooLarge
from proxy.http.engine import RequestHead
from proxy.forwarding.headers import as_received, upstream_request_headers
from proxy.forwarding.paths import RequestPath, normalize_target
from proxy.forwarding.routing import normalize_host, upstream_target
from proxy.server.channel import ConnectionLost
from proxy.server.downstream import MORE, ClientInfo, Downstream
from proxy.server.generation import Generation
from proxy.server.h2_relay import H2Relay
from proxy.server.relay import Relay
from proxy.server.state import ServerState
from proxy.tls.authz import misdirected

log = logging.getLogger("tlsproxy")

# The access log's ``protocol``, by the request's version.
_PROTOCOLS = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0", b"2": "HTTP/2"}

# How long a closing connection waits for the client's side of the TLS shutdown.
CLOSE_WAIT = 1.0


async def serve_connection(down: Downstream, state: ServerState) -> None:
    """Serve requests on ``down`` until either side ends the connection."""
    first = True
    with state.track(down) as tracked:
        try:
            while not state.closing:
                timeouts = state.generation.config.timeouts
                # Idle (shutdown may close it now) until the first byte of the next request
                # arrives; bytes the client pipelined are already in the engine: no wait.
                if not down.engine.has_unread():
                    tracked.idle = True
                    try:
                        data = await down.channel.read(timeouts.request_header if first else timeouts.idle)
                    except TimeoutError:
                        return
                    finally:
                        tracked.idle = False
                    if not data:
                        return
                    down.engine.feed(data)
                first = False
                try:
                    # The head's first byte is here: the rest within request_header of
                    # the next chunk (read_head's deadline starts at that chunk).
                    head = down.poll_head()
                    if head is MORE:
                        head = await down.read_head(timeouts.request_header, timeouts.request_header)
                except HTTPError as exc:  # unframeable request: answer, log and close
                    refuse_request(down, exc, state)
                    return
                if head is None:
                    return
                if not await handle_request(down, head, state):
                    return
                # Backpressure between requests: small responses never wait for the
                # client inside the relay, so a client that pipelines requests and reads
                # nothing would have every answer fetched and kept. The next request is
                # read once the client has taken what is queued below the high-water mark.
                if down.channel.writing_paused:  # (a test, not a coroutine, per request)
                    try:
                        await down.drain()
                    except (ConnectionError, TimeoutError):
                        return
        finally:
            await down.channel.close_and_wait(CLOSE_WAIT)


async def handle_request(down: Downstream, head: RequestHead, state: ServerState) -> bool:
    """Answer one request; True when the connection may carry another."""
    started = time.monotonic()
    stamp = time.time()
    info = down.info
    generation = state.generation  # this request's config, whatever a reload does meanwhile
    config = generation.config
    service = None
    relay = None
    request_id = None
    status = 0
    keep_alive = False
    try:
        host = head.header(b"host")
        host_text = host.decode("latin-1") if host is not None else None
        path = normalize_target(head.target)  # once: what is routed is what goes upstream
        service = generation.router.route(host_text, path)
        if service is None:
            raise NotFound(f"no service for host {host_text or '(none)'!r} and path {path.path!r}")
        _check_client(info, service, host_text, path, generation)
        limit = config.limits.max_body_bytes
        if limit and head.content_length is not None and head.content_length > limit:
            raise PayloadTooLarge(f"request body of {head.content_length} bytes is larger than {limit} bytes")
        http2 = service.http2_upstream
        fields = None  # the client's header lines, when they go upstream as it sent them
        if head.raw_fields and not http2:
            relayed = as_received(
                head.headers, head.raw_fields, client_ip=info.ip, server_port=info.server_port, service=service,
                identity_headers=info.identity_headers, proto=info.scheme,
            )
            if relayed is not None:
                fields, headers, request_id = relayed
        if fields is None:
            headers, request_id = upstream_request_headers(
                head.headers, client_ip=info.ip, server_port=info.server_port, service=service,
                identity_headers=info.identity_headers, upgrade=head.upgrade, proto=info.scheme,
            )
        upstream_tls = generation.upstream_tls.get(service.name)  # (https:// upstreams)
        if http2:
            relay = H2Relay(down, head, service, state.h2_pool, config.timeouts, limit, state.is_closing, upstream_tls)
        else:
            if down.grpc:
                raise BadGateway(
                    f"service {service.name!r}: gRPC needs HTTP/2 to the upstream, and {service.upstreams[0].url} "
                    "speaks HTTP/1.1: make the service's upstream h2c:// (or https:// with upstream_tls.http2: true)"
                )
            relay = Relay(down, head, service, state.pool, config.timeouts, limit, state.is_closing, upstream_tls)
        status = await relay.run(headers, upstream_target(service, path), fields)
        keep_alive = down.next_cycle()
    except HTTPError as exc:
        status = exc.status
        subject = info.trusted_identity.subject if info.trusted_identity is not None else None
        state.events.request_error(info.address, subject, service.name if service else None, status, str(exc))
        keep_alive = _answer_error(down, exc, close=not down.request_complete or state.closing)
    except (ConnectionError, TimeoutError, OSError) as exc:
        log.debug("connection from %s ended: %r", info.address, exc)
        down.abort()
    except Exception:  # a bug: log it, never take the process down
        log.exception("internal error while relaying a request from %s", info.address)
        down.abort()
    finally:
        _record(state, down, started, stamp, head, status, service, relay, request_id)
    return keep_alive


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
    relay: Relay | None = None,
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
