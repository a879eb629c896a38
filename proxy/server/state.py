"""ServerState: what every connection of one running proxy shares.

Built once per start (the config slices, the router, the TLS contexts, the upstream
pool, the access log, the metrics), plus the live connections, so shutdown can close the idle ones
at once and let busy ones finish their current response.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from proxy.config.model import ProxyConfig
from proxy.http.engines import EngineFactory
from proxy.forwarding.routing import Router
from proxy.server.access_log import AccessLog
from proxy.server.downstream import Downstream
from proxy.server.upstream_pool import UpstreamPool
from proxy.tls.context import ServerTLS
from proxy.server.metrics import ProxyMetrics


@dataclass(slots=True, eq=False)
class TrackedConnection:
    """A live client connection; ``idle`` while it waits for the next request."""

    down: Downstream
    idle: bool = True


@dataclass
class ServerState:
    config: ProxyConfig
    tls: ServerTLS
    router: Router
    pool: UpstreamPool
    access_log: AccessLog
    engines: EngineFactory
    https_port: int = 443  # the first TLS listener's port, for redirect_http
    closing: bool = False
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    connections: set[TrackedConnection] = field(default_factory=set)

    @contextlib.contextmanager
    def track(self, down: Downstream) -> Iterator[TrackedConnection]:
        tracked = TrackedConnection(down)
        self.connections.add(tracked)
        try:
            yield tracked
        finally:
            self.connections.discard(tracked)

    def begin_shutdown(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their response."""
        self.closing = True
        self.metrics.draining.set(1)
        for tracked in list(self.connections):
            if tracked.idle:  # no request in flight: nothing to finish
                tracked.down.channel.abort()
