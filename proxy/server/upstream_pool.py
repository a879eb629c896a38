"""Keep-alive connections to upstreams: lend, take back, expire.

Per upstream (host, port) the pool keeps at most ``max_idle`` idle connections, newest
last; a connection idle longer than ``idle_timeout`` is closed (on the next acquire of
that upstream, and by a periodic sweep so quiet upstreams do not keep sockets open).

A pooled connection the upstream has already closed is recognised when it is lent
(EOF or unexpected bytes seen while idle) and dropped. The remaining race (the
upstream closes just as the request goes out) is the relay's to handle: it sends the
request again on a fresh connection only when that cannot duplicate it — the rules
are in one place, ``proxy.server.relay.may_send_again``.

A service with several upstreams uses them round-robin; an upstream that refuses the
connection (or does not accept it within ``upstream_connect``) is skipped, and only
when all fail does the request get ``502``.

``https://`` upstreams: the connect includes the TLS handshake (within the same
``upstream_connect``) with the service's ``UpstreamTLS`` context of the request's
generation (``proxy.tls.upstream_context``), and their idle connections are kept under
that context's ``pool_key``, never under the bare URL: a connection is only lent again
to a request that would have made it with the same settings (service, generation). A
handshake that fails (the upstream's certificate refused, or ours) skips that upstream
like a refused connect, with the reason in words (``proxy.tls.upstream_failure``) in
the 502 and in one log line; nothing falls back to an unverified connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence

from proxy.config.model import Service, Upstream
from proxy.errors import BadGateway
from proxy.http.engine import ClientEngine
from proxy.http.engines import EngineFactory
from proxy.server.channel import Channel
from proxy.tls.upstream_context import UpstreamTLS
from proxy.tls.upstream_failure import describe_upstream_tls_failure

log = logging.getLogger("tlsproxy")

MAX_IDLE_PER_UPSTREAM = 64


class UpstreamConnection:
    """One connection to an upstream with its HTTP engine; lent to one request at a time."""

    __slots__ = ("upstream", "channel", "engine", "reused", "idle_since", "authority", "failure", "pool_key", "tls")

    def __init__(
        self, upstream: Upstream, channel: Channel, engine: ClientEngine, tls: UpstreamTLS | None = None
    ) -> None:
        self.upstream = upstream
        self.tls = tls  # the context it was made with (https://), else None
        self.pool_key = upstream.url if tls is None else tls.pool_key(upstream)
        host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
        self.authority = f"{host}:{upstream.port}".encode()  # Host for requests that lack one
        self.channel = channel
        self.engine = engine
        self.reused = False  # lent from the pool: the upstream may have closed it meanwhile
        self.idle_since = 0.0
        # Why the request on it failed on the request side (the body pump), recorded before
        # the connection is aborted: the relay raises it instead of "upstream closed".
        self.failure: BaseException | None = None

    @property
    def usable(self) -> bool:
        """Still open, and the upstream has sent nothing since the last response."""
        return self.channel.quiet

    def close(self) -> None:
        self.channel.close()

    def abort(self) -> None:
        self.channel.abort()

    def tls_failure(self) -> str | None:
        """Why a TLS upstream ended this connection, in words (an alert after the TLS 1.3
        handshake: our client certificate refused); None for anything else."""
        if self.tls is None or self.channel.lost_error is None:
            return None
        return describe_upstream_tls_failure(
            self.channel.lost_error, self.tls, self.tls.server_hostname(self.upstream)
        )


def connect_failure(
    exc: OSError | TimeoutError, service: Service, upstream: Upstream, tls: UpstreamTLS | None, timeout: float
) -> str:
    """Why connecting to ``upstream`` failed, in words for the 502 (a TLS failure is
    logged too: it is a configuration problem on one side or the other)."""
    if isinstance(exc, TimeoutError):
        return f"{upstream.url} did not accept the connection within {timeout:g}s"
    if isinstance(exc, ssl.SSLError) and tls is not None:
        words = describe_upstream_tls_failure(exc, tls, tls.server_hostname(upstream))
        log.warning("service %r: upstream %s: TLS handshake failed: %s", service.name, upstream.url, words)
        return f"{upstream.url}: TLS handshake failed: {words}"
    return f"{upstream.url} refused the connection ({exc.strerror or exc})"


class RoundRobin:
    """Which of a service's upstreams to try first: each request starts one further
    along the list (the others follow, for when it refuses). Both pools use it."""

    __slots__ = ("_turns",)

    def __init__(self) -> None:
        self._turns: dict[str, itertools.count] = {}

    def order(self, service: Service) -> Sequence[Upstream]:
        upstreams = service.upstreams
        if len(upstreams) == 1:
            return upstreams
        start = next(self._turns.setdefault(service.name, itertools.count())) % len(upstreams)
        return upstreams[start:] + upstreams[:start]


async def connect_channel(upstream: Upstream, tls: UpstreamTLS | None = None) -> Channel:
    """A connection to ``upstream`` as a Channel: TCP, or TLS through ``tls`` (verified as
    its context says); no delay, requests are small writes. Never plain TCP to an
    ``https://`` upstream."""
    if tls is None and upstream.scheme == "https":
        raise BadGateway(f"upstream {upstream.url}: no TLS context for it in this configuration")
    channel = Channel()
    loop = asyncio.get_running_loop()
    if tls is None:
        await loop.create_connection(lambda: channel, upstream.host, upstream.port)
    else:
        await loop.create_connection(
            lambda: channel, upstream.host, upstream.port, ssl=tls.context, server_hostname=tls.server_hostname(upstream)
        )
    sock = channel.transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return channel


class UpstreamPool:
    """Idle connections per upstream plus round-robin choice per service."""

    def __init__(
        self,
        engines: EngineFactory,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_idle: int = MAX_IDLE_PER_UPSTREAM,
        max_header_bytes: int = 65536,
        on_connect_error: Callable[[str], None] | None = None,
    ) -> None:
        self._engines = engines
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._max_header_bytes = max_header_bytes
        self._on_connect_error = on_connect_error  # (service name) for the metrics
        # Keyed by upstream URL (https://: UpstreamTLS.pool_key): a str caches its hash, a
        # frozen dataclass computes it per call.
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        self.order = RoundRobin().order  # the service's upstreams in the order to try them
        self._sweeper: asyncio.TimerHandle | None = None
        self.connects = 0  # fresh connections opened (for tests and metrics)

    def configure(self, *, engines: EngineFactory, connect_timeout: float, idle_timeout: float) -> None:
        """A reload's engines (for new connections) and timeouts; pooled connections stay."""
        self._engines = engines
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout

    async def acquire(
        self, service: Service, *, fresh: bool = False, tls: UpstreamTLS | None = None
    ) -> UpstreamConnection:
        """A connection to one of the service's upstreams (idle one first unless ``fresh``);
        ``tls``: the service's context in the request's generation (https:// upstreams).

        Raises BadGateway naming the service when no upstream accepts a connection."""
        failures = []
        for upstream in self.order(service):
            if not fresh:
                conn = self._take_idle(upstream.url if tls is None else tls.pool_key(upstream))
                if conn is not None:
                    return conn
            try:
                return await self._connect(upstream, tls)
            except (OSError, TimeoutError) as exc:
                failures.append(connect_failure(exc, service, upstream, tls, self._connect_timeout))
            if self._on_connect_error is not None:
                self._on_connect_error(service.name)
        raise BadGateway(f"service {service.name!r}: " + "; ".join(failures))

    def idle_for(self, service: Service, tls: UpstreamTLS | None = None) -> UpstreamConnection | None:
        """An idle connection for a service with one upstream, or None (then ``acquire``):
        the usual case taken without a coroutine to make and run."""
        upstreams = service.upstreams
        if len(upstreams) != 1:
            return None  # (the round-robin order decides which upstream's idle one)
        upstream = upstreams[0]
        return self._take_idle(upstream.url if tls is None else tls.pool_key(upstream))

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose exchange completed cleanly."""
        idle = self._idle.get(conn.pool_key)
        if idle is None:
            idle = self._idle[conn.pool_key] = deque()
        if len(idle) >= self._max_idle or not conn.channel.quiet:
            conn.close()
            return
        conn.reused = True
        conn.idle_since = conn.channel.loop.time()
        idle.append(conn)
        if self._sweeper is None and self._idle_timeout > 0:
            self._schedule_sweep()

    def _take_idle(self, key: str) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        expiry = idle[-1].channel.loop.time() - self._idle_timeout if self._idle_timeout > 0 else -1.0
        while idle:
            conn = idle.pop()  # newest first: the least likely to have been closed
            if conn.channel.quiet and conn.idle_since > expiry:
                return conn
            conn.close()
        return None

    async def _connect(self, upstream: Upstream, tls: UpstreamTLS | None) -> UpstreamConnection:
        async with asyncio.timeout(self._connect_timeout or None):  # TCP and TLS handshake
            channel = await connect_channel(upstream, tls)
        self.connects += 1
        return UpstreamConnection(upstream, channel, self._engines.client(self._max_header_bytes), tls)

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(self._idle_timeout / 2, 0.05), self._sweep)

    def _sweep(self) -> None:
        """Close expired or dead idle connections; keep sweeping while any remain."""
        self._sweeper = None
        expiry = asyncio.get_running_loop().time() - self._idle_timeout
        remaining = 0
        for idle in self._idle.values():
            keep = [conn for conn in idle if conn.usable and conn.idle_since > expiry]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            idle.clear()
            idle.extend(keep)
            remaining += len(keep)
        if remaining:
            self._schedule_sweep()

    def idle_count(self, upstream: Upstream | None = None) -> int:
        if upstream is not None:
            return len(self._idle.get(upstream.url, ()))
        return sum(len(idle) for idle in self._idle.values())

    async def close_and_wait(self, timeout: float) -> None:
        """``close()``, then wait up to ``timeout`` for the connections to be gone: a TLS
        one sends its close_notify from the loop, which must still run to send it."""
        channels = [conn.channel for idle in self._idle.values() for conn in idle]
        self.close()
        if channels:
            await asyncio.gather(*(channel.close_and_wait(timeout) for channel in channels))

    def close(self) -> None:
        """Close every idle connection (shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
            idle.clear()
