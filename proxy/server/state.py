"""ServerState: what every connection of one running proxy shares.

The current config ``Generation`` (config, TLS contexts, router, engines;
replaced as a whole by a reload, see ``proxy.server.generation``), the upstream pool,
the access log, the metrics and recent events (the status page's), plus the live
connections, so shutdown can close the idle ones at once and let busy ones finish their
current response.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from proxy.config.model import ProxyConfig
from proxy.http.engines import EngineFactory
from proxy.ops.events import EventLog
from proxy.server.access_log import AccessLog
from proxy.server.downstream import Downstream
from proxy.server.generation import Generation
from proxy.server.h2_upstream import H2UpstreamPool
from proxy.server.metrics import ProxyMetrics
from proxy.server.upstream_pool import UpstreamPool
from proxy.tls.context import ServerTLS


class Tracked(Protocol):
    """What ``begin_shutdown`` reads of a live client connection: a TrackedConnection, or
    an HTTP/1.1 connection's request loop (``connection._RequestLoop``, its own record)."""

    down: Downstream
    idle: bool
    on_shutdown: Callable[[], None] | None


@dataclass(slots=True, eq=False)
class TrackedConnection:
    """A live client connection; ``idle`` while no byte of a next request has been
    received (closing it then loses nothing). ``on_shutdown``, when given, is how the
    connection is told to drain (HTTP/2: GOAWAY) instead of being closed when idle."""

    down: Downstream
    idle: bool = True
    on_shutdown: Callable[[], None] | None = None


@dataclass
class ServerState:
    generation: Generation  # published by one assignment; read once per request
    pool: UpstreamPool  # HTTP/1.1 upstreams
    access_log: AccessLog
    h2_pool: H2UpstreamPool | None = None  # HTTP/2 upstreams (h2c://, https:// with http2)
    https_port: int = 443  # the first TLS listener's port, for redirect_http
    closing: bool = False
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    events: EventLog = field(default_factory=EventLog)  # refusals, reloads, upstream errors
    connections: set[Tracked] = field(default_factory=set)

    # The current generation's parts, for code outside a request (start-up, admin,
    # redirect). A request reads ``generation`` once instead, so it sees one config.
    @property
    def config(self) -> ProxyConfig:
        return self.generation.config

    @property
    def tls(self) -> ServerTLS:
        return self.generation.tls

    @property
    def engines(self) -> EngineFactory:
        return self.generation.engines

    @contextlib.contextmanager
    def track(self, down: Downstream, on_shutdown: Callable[[], None] | None = None) -> Iterator[TrackedConnection]:
        tracked = TrackedConnection(down, on_shutdown=on_shutdown)
        self.connections.add(tracked)
        try:
            yield tracked
        finally:
            self.connections.discard(tracked)

    def is_closing(self) -> bool:
        """``closing``, as a callable for the relays (the last response says so)."""
        return self.closing

    def begin_shutdown(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones (a request in flight,
        or part of one received) after their response."""
        self.closing = True
        self.metrics.draining.set(1)
        for tracked in list(self.connections):
            if tracked.on_shutdown is not None:
                tracked.on_shutdown()
            elif tracked.idle:
                # After what is queued for it: its last response may still be waiting
                # for the end of this loop iteration (the channel's send coalescing).
                tracked.down.channel.close()
