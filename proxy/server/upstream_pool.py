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
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import deque
from collections.abc import Callable, Sequence

from proxy.config.model import Service, Upstream
from proxy.errors import BadGateway
from proxy.http.engine import ClientEngine
from proxy.http.engines import EngineFactory
from proxy.server.channel import Channel

MAX_IDLE_PER_UPSTREAM = 64


class UpstreamConnection:
    """One connection to an upstream with its HTTP engine; lent to one request at a time."""

    __slots__ = ("upstream", "channel", "engine", "reused", "idle_since", "authority", "failure")

    def __init__(self, upstream: Upstream, channel: Channel, engine: ClientEngine) -> None:
        self.upstream = upstream
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


async def connect_channel(upstream: Upstream) -> Channel:
    """A TCP connection to ``upstream`` as a Channel (no delay: requests are small writes)."""
    channel = Channel()
    await asyncio.get_running_loop().create_connection(lambda: channel, upstream.host, upstream.port)
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
        # Keyed by upstream URL: a str caches its hash, a frozen dataclass computes it per call.
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        self._turns: dict[str, itertools.count] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.connects = 0  # fresh connections opened (for tests and metrics)

    def configure(self, *, engines: EngineFactory, connect_timeout: float, idle_timeout: float) -> None:
        """A reload's engines (for new connections) and timeouts; pooled connections stay."""
        self._engines = engines
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout

    def order(self, service: Service) -> Sequence[Upstream]:
        """The service's upstreams in the order to try them: round-robin start."""
        upstreams = service.upstreams
        if len(upstreams) == 1:
            return upstreams
        turn = next(self._turns.setdefault(service.name, itertools.count()))
        start = turn % len(upstreams)
        return upstreams[start:] + upstreams[:start]

    async def acquire(self, service: Service, *, fresh: bool = False) -> UpstreamConnection:
        """A connection to one of the service's upstreams (idle one first unless ``fresh``).

        Raises BadGateway naming the service when no upstream accepts a connection."""
        failures = []
        for upstream in self.order(service):
            if not fresh:
                conn = self._take_idle(upstream)
                if conn is not None:
                    return conn
            try:
                return await self._connect(upstream)
            except TimeoutError:
                failures.append(f"{upstream.url} did not accept the connection within {self._connect_timeout:g}s")
            except OSError as exc:
                failures.append(f"{upstream.url} refused the connection ({exc.strerror or exc})")
            if self._on_connect_error is not None:
                self._on_connect_error(service.name)
        raise BadGateway(f"service {service.name!r}: " + "; ".join(failures))

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose exchange completed cleanly."""
        idle = self._idle.get(conn.upstream.url)
        if idle is None:
            idle = self._idle[conn.upstream.url] = deque()
        if len(idle) >= self._max_idle or not conn.channel.quiet:
            conn.close()
            return
        conn.reused = True
        conn.idle_since = conn.channel.loop.time()
        idle.append(conn)
        if self._sweeper is None and self._idle_timeout > 0:
            self._schedule_sweep()

    def _take_idle(self, upstream: Upstream) -> UpstreamConnection | None:
        idle = self._idle.get(upstream.url)
        if not idle:
            return None
        expiry = idle[-1].channel.loop.time() - self._idle_timeout if self._idle_timeout > 0 else -1.0
        while idle:
            conn = idle.pop()  # newest first: the least likely to have been closed
            if conn.channel.quiet and conn.idle_since > expiry:
                return conn
            conn.close()
        return None

    async def _connect(self, upstream: Upstream) -> UpstreamConnection:
        async with asyncio.timeout(self._connect_timeout or None):
            channel = await connect_channel(upstream)
        self.connects += 1
        return UpstreamConnection(upstream, channel, self._engines.client(self._max_header_bytes))

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

    def close(self) -> None:
        """Close every idle connection (shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
            idle.clear()
