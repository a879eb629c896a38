"""Start and stop a proxy: ``start_proxy`` (async, for the demo and tests) and
``run_proxy`` (blocking, for ``tlsproxy serve``).

Start-up order: everything that can fail on bad config or certificates (TLS contexts,
access log, binding, the admin listener) happens before the first connection is
accepted, so a bad start leaves nothing running. Alongside the proxy: the admin
listener (``admin.listen``: /healthz, /readyz, /metrics, /ca.pem) and the daily
certificate-expiry warning.

Reload (``RunningProxy.reload_async``; SIGHUP, or changed certificate files when a
config source is given): build a new ``Generation`` (``proxy.server.generation``) off
the event loop, and only when all of it built, publish it with one assignment. A
failure is logged and the old generation keeps serving. ``reload`` does the same on the
caller's thread.

Shutdown order (as uvicorn does it): stop accepting, close idle keep-alive
connections, let requests in flight finish for up to ``shutdown_grace``, cancel the
rest (waiting at most ``CANCEL_WAIT`` for them to end), then close pooled upstream
connections, the log and the admin listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import sys
from collections.abc import Callable

from proxy.config.model import ProxyConfig
from proxy.errors import ConfigError, TlsProxyError
from proxy.ops.events import EventLog, merge_events
from proxy.pki.trust import ca_banner
from proxy.server.access_log import AccessLog
from proxy.server.admin import AdminServer, start_admin
from proxy.server.admin_status import status_page
from proxy.server.expiry import ExpiryWatch, certificates_in_files
from proxy.server.generation import Generation, build_generation, pin_fixed_settings
from proxy.server.listeners import BoundListeners, ConnectionSlots, accept_loop
from proxy.server.metrics import ProxyMetrics
from proxy.server.plain_accept import serve_plain_socket
from proxy.server.redirect import serve_redirect_socket
from proxy.server.reload import WATCH_INTERVAL, FileWatch
from proxy.server.state import ServerState
from proxy.server.tls_accept import serve_tls_socket
from proxy.server.h2_upstream import H2UpstreamPool
from proxy.server.upstream_pool import UpstreamPool, connect_channel
from proxy.server.worker_stats import SharedSlots, WorkerStats

log = logging.getLogger("tlsproxy")

# After cancelling the connections still busy at the end of the grace period, how long
# to wait for them to end: a task that ignores its cancellation must not hang shutdown.
CANCEL_WAIT = 5.0
# How long pooled upstream connections may take to close (TLS: the close_notify exchange).
UPSTREAM_CLOSE_WAIT = 1.0


class RunningProxy:
    """A started proxy: its bound addresses, and ``close()``."""

    def __init__(self, state: ServerState, listeners: BoundListeners):
        self.state = state
        self.listeners = listeners
        self._sockets = [*listeners.tls, *listeners.plain, *([listeners.redirect] if listeners.redirect else [])]
        self.addresses: list[tuple[str, int]] = [sock.getsockname()[:2] for sock in listeners.tls]
        self.plain_addresses: list[tuple[str, int]] = [sock.getsockname()[:2] for sock in listeners.plain]
        self.redirect_address: tuple[str, int] | None = (
            listeners.redirect.getsockname()[:2] if listeners.redirect is not None else None
        )
        self.connection_tasks: set[asyncio.Task] = set()
        self._accept_tasks: list[asyncio.Task] = []
        self._closed = False
        self.admin: AdminServer | None = None
        self._expiry: ExpiryWatch | None = None
        self._file_watch: FileWatch | None = None
        self.config_source: Callable[[], ProxyConfig] | None = None
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task] = set()  # reload_soon's tasks, kept until done
        self.worker = 0  # this process's worker index (0 without workers)
        self.stats: WorkerStats | None = None  # with workers: what this one shares with the others

    def reload(self, config: ProxyConfig | None = None) -> bool:
        """Replace the config (``config``, else a fresh one from ``config_source``),
        building the new generation on the caller's thread; see ``reload_async``."""
        try:
            prepared = self._prepare(config)
        except Exception as exc:
            return self._failed(exc)
        return self._publish(*prepared)

    async def reload_async(self, config: ProxyConfig | None = None) -> bool:
        """Replace the config: the new generation is built in an executor thread (it
        reads files and builds SSL contexts), then published on the loop.

        Replaced: TLS contexts (certificates, client CAs, CRL), services and routing,
        client-certificate policies and identity headers, timeouts, limits, the access
        log. Kept: what ``generation.FIXED`` names (a change there is logged: it takes a
        restart), every open connection and tunnel (requests already read finish as
        they started; the next request on any connection is decided by the new
        generation). True if the new config is in use."""
        async with self._reload_lock:  # one at a time: each pins against the one before
            try:
                prepared = await asyncio.get_running_loop().run_in_executor(None, self._prepare, config)
            except Exception as exc:
                return self._failed(exc)
            return self._publish(*prepared)

    def reload_soon(self) -> None:
        """Start ``reload_async`` (from a signal handler or the file watch)."""
        task = asyncio.get_running_loop().create_task(self.reload_async())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def _prepare(self, config: ProxyConfig | None) -> tuple[Generation, list[str], AccessLog | None]:
        """Everything a reload builds, nothing published: (generation, fixed settings
        that changed, the new access log when its settings changed)."""
        if config is None:
            if self.config_source is None:
                raise TlsProxyError("no config source to reload from")
            config = self.config_source()
        running = self.state.generation.config
        config, fixed = pin_fixed_settings(running, config)
        generation = build_generation(config)
        access_log = _open_access_log(config) if config.access_log != running.access_log else None
        return generation, fixed, access_log

    def _failed(self, exc: Exception) -> bool:
        reason = str(exc).replace("\n", "; ") if isinstance(exc, TlsProxyError) else repr(exc)  # one log line
        log.error("reload failed, still serving the previous configuration: %s", reason)
        self.state.metrics.record_reload(False)
        self.state.events.reload(False, f"kept the previous configuration: {reason}")
        return False

    def _publish(self, generation: Generation, fixed: list[str], access_log: AccessLog | None) -> bool:
        state = self.state
        config = generation.config
        restart = f"{', '.join(fixed)} changed; that takes a restart" if fixed else ""
        if fixed and self.worker == 0:  # every worker pins the same settings: one line says it
            log.warning("reload: %s", restart)
        if access_log is not None:
            state.access_log.close()
            state.access_log = access_log
        state.generation = generation  # the one assignment every next request sees
        # The first generation was frozen with start-up (_serve_until_signal): frozen objects
        # are never collected, so what of it ends up in reference cycles would stay for good.
        gc.unfreeze()
        state.pool.configure(
            engines=generation.engines,
            connect_timeout=config.timeouts.upstream_connect,
            idle_timeout=config.timeouts.idle,
        )
        state.h2_pool.configure(connect_timeout=config.timeouts.upstream_connect, idle_timeout=config.timeouts.idle)
        state.metrics.add_services(service.name for service in config.services)
        state.metrics.record_reload(True)
        state.events.forget_services(service.name for service in config.services)
        state.events.reload(True, f"{len(config.services)} services" + (f"; {restart}" if restart else ""))
        log.info("reloaded the configuration (%d services)", len(config.services))
        if self._expiry is not None:
            self._expiry.check()  # the gauge and the warnings follow the new certificates
        if self._file_watch is not None:
            self._file_watch.refresh()  # the new generation's files, as they are now
        return True

    def watch_files(self, interval: float = WATCH_INTERVAL) -> None:
        """Reload when certificate files change or an auto certificate is due."""
        state = self.state
        self._file_watch = FileWatch(
            lambda: state.generation.files, self.reload_soon, due=lambda: state.tls.renewal_due, interval=interval
        )
        self._file_watch.start()

    def merged_events(self) -> dict:
        """Every worker's events (this process's alone without workers)."""
        if self.stats is not None:
            return self.stats.merged()[1]
        return merge_events([self.state.events.snapshot()])

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return self.admin.address if self.admin is not None else None

    async def _start_companions(self, admin: bool) -> None:
        """The admin listener and the expiry watch (after the proxy's own sockets bound)."""
        state = self.state
        if admin and state.config.admin.listen is not None:
            stats = self.stats
            self.admin = await start_admin(
                state.config.admin.listen,
                metrics=stats if stats is not None else state.metrics,
                ready=lambda: not state.closing,
                ca_pem=lambda: _local_ca_pem(state.config),
                status=lambda: status_page(
                    state, self.merged_events, [f"{_url_host(host)}:{port}" for host, port in self.addresses]
                ),
            )
        self._expiry = ExpiryWatch(
            lambda: certificates_in_files(
                [
                    *(loaded.path for loaded in state.tls.certificates),
                    *(tls.certificate for tls in state.generation.upstream_tls.values() if tls.certificate),
                ],
                log,
            ),
            log,
            metrics=state.metrics,
        )
        self._expiry.start()

    def _start_accepting(self) -> None:
        limit = self.state.config.limits.max_connections
        slots = ConnectionSlots(limit) if limit > 0 else None
        loop = asyncio.get_running_loop()
        state = self.state
        handlers = [
            *[serve_tls_socket] * len(self.addresses),
            *[serve_plain_socket] * len(self.plain_addresses),
            serve_redirect_socket,  # the last socket, when there is one
        ]
        for sock, serve in zip(self._sockets, handlers):
            # A partial, not a wrapping coroutine: one coroutine per connection, not two.
            handler = functools.partial(serve, state=state)
            self._accept_tasks.append(loop.create_task(accept_loop(sock, handler, self.connection_tasks, slots)))

    def describe(self) -> list[str]:
        """One line per listener, as printed at start-up."""
        services = ", ".join(
            f"{service.name} -> {' '.join(up.url for up in service.upstreams)}" for service in self.state.config.services
        )
        lines = [f"tlsproxy: listening on https://{_url_host(host)}:{port} (services: {services})"
                 for host, port in self.addresses]
        lines += [f"tlsproxy: plain HTTP on http://{_url_host(host)}:{port} (same services, no client certificates)"
                  for host, port in self.plain_addresses]
        if self.redirect_address is not None:
            host, port = self.redirect_address
            lines.append(f"tlsproxy: redirecting http://{_url_host(host)}:{port} to https://")
        if self.admin_address is not None:
            host, port = self.admin_address[:2]
            lines.append(f"tlsproxy: admin on http://{_url_host(host)}:{port} (/ /healthz /readyz /metrics /ca.pem /trust)")
        if _issues_from_local_ca(self.state.config):
            lines += [f"tlsproxy: {line}" for line in ca_banner(self.state.config.tls.ca_dir / "ca.pem")]
        return lines

    async def close(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight requests (up to ``grace``, default the
        config's shutdown_grace), then release everything."""
        if self._closed:
            return
        self._closed = True
        for task in self._accept_tasks:
            task.cancel()
        for task in self._accept_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.listeners.close()
        if self._expiry is not None:
            self._expiry.stop()
        if self._file_watch is not None:
            self._file_watch.stop()
        self.state.begin_shutdown()  # /readyz now says draining
        grace = self.state.config.timeouts.shutdown_grace if grace is None else grace
        pending = set(self.connection_tasks)
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=grace)  # 0: at once
        for task in pending:
            task.cancel()
        if pending:
            _done, stuck = await asyncio.wait(pending, timeout=CANCEL_WAIT)
            if stuck:
                log.warning("shutdown: %d connections did not end %gs after being cancelled", len(stuck), CANCEL_WAIT)
        await self.state.pool.close_and_wait(UPSTREAM_CLOSE_WAIT)
        await self.state.h2_pool.close_and_wait(UPSTREAM_CLOSE_WAIT)
        self.state.access_log.close()
        if self.stats is not None:
            self.stats.stop()  # the last snapshot: what the parent keeps once we exit
        if self.admin is not None:
            self.admin.close()
            await self.admin.wait_closed()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _issues_from_local_ca(config: ProxyConfig) -> bool:
    return config.tls.auto or not config.tls.certificates


def _local_ca_pem(config: ProxyConfig) -> bytes | None:
    """The local CA for /ca.pem: only when certificates are issued from it."""
    if not _issues_from_local_ca(config):
        return None
    try:
        return (config.tls.ca_dir / "ca.pem").read_bytes()
    except OSError:
        return None


async def start_proxy(
    config: ProxyConfig,
    *,
    config_source: Callable[[], ProxyConfig] | None = None,
    watch_interval: float = WATCH_INTERVAL,
    listeners: BoundListeners | None = None,
    admin: bool = True,
    worker: int = 0,
    shared: SharedSlots | None = None,
) -> RunningProxy:
    """Build everything from ``config``, bind the listeners and start accepting.

    With ``config_source`` (how to load the config again), ``reload()`` without an
    argument re-reads it, and changed certificate files trigger that by themselves.
    ``listeners``: sockets bound already (a worker's, inherited from its parent);
    ``admin=False``: no admin listener (workers other than the first); ``worker``: this
    worker's index and ``shared``: the memory its snapshots go to (``worker_stats``).
    Raises ConfigError (bad TLS files) or OSError (cannot bind) before accepting."""
    generation = build_generation(config)
    engines = generation.engines
    timeouts = config.timeouts
    metrics = ProxyMetrics()
    metrics.add_services(service.name for service in config.services)
    pool = UpstreamPool(
        engines,
        connect_timeout=timeouts.upstream_connect,
        idle_timeout=timeouts.idle,
        max_header_bytes=max(65536, config.limits.max_header_bytes),
        on_connect_error=lambda name: metrics.upstream_connect_errors.labels(name).inc(),
    )
    access_log = _open_access_log(config)
    if listeners is None:
        try:
            listeners = BoundListeners.bind(config.listen, config.redirect_http, plain=config.listen_plain)
        except OSError:
            access_log.close()
            raise
    state = ServerState(
        generation=generation,
        pool=pool,
        h2_pool=H2UpstreamPool(connect_channel, connect_timeout=timeouts.upstream_connect, idle_timeout=timeouts.idle),
        access_log=access_log,
        https_port=listeners.tls[0].getsockname()[1] if listeners.tls else 443,
        metrics=metrics,
        events=EventLog(worker),
    )
    metrics.active_connections.set_function(lambda: len(state.connections))
    running = RunningProxy(state, listeners)
    running.worker = worker
    if shared is not None:
        running.stats = WorkerStats(shared, worker, metrics, state.events)
        running.stats.start()
    try:
        await running._start_companions(admin)
    except OSError:
        listeners.close()
        access_log.close()
        raise
    running._start_accepting()
    if config_source is not None:
        running.config_source = config_source
        running.watch_files(watch_interval)
    return running


def run_proxy(config: ProxyConfig, config_source: Callable[[], ProxyConfig] | None = None) -> int:
    """Serve until SIGINT / SIGTERM, then shut down gracefully; the exit code.
    SIGHUP (and changed certificate files) reload from ``config_source``.
    ``workers > 1``: that many processes share the listeners (``proxy.server.workers``)."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tlsproxy: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if config.workers > 1:
        from proxy.server.workers import run_workers

        return run_workers(config, config_source, serve_blocking)
    return serve_blocking(config, config_source)


def serve_blocking(
    config: ProxyConfig,
    config_source: Callable[[], ProxyConfig] | None = None,
    *,
    listeners: BoundListeners | None = None,
    worker: int = 0,
    shared: SharedSlots | None = None,
) -> int:
    """One process serving until SIGINT / SIGTERM (a worker: on its parent's sockets)."""
    with _runner() as runner:
        runner.run(_serve_until_signal(config, config_source, listeners, worker, shared))
    return 0


async def _serve_until_signal(
    config: ProxyConfig,
    config_source: Callable[[], ProxyConfig] | None,
    listeners: BoundListeners | None,
    worker: int,
    shared: SharedSlots | None = None,
) -> None:
    running = await start_proxy(
        config, config_source=config_source, listeners=listeners, admin=worker == 0, worker=worker, shared=shared
    )
    # What start-up made (modules, config, TLS contexts: ~36,000 objects) lives as long as
    # the process: keep it out of the collector's full passes, each a walk over all of it
    # (28 ms, about once per 7,000 new TLS connections under bench/run.py's handshake load).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = [signal.SIGINT, signal.SIGTERM]
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    if config_source is not None:
        loop.add_signal_handler(signal.SIGHUP, running.reload_soon)
        signals.append(signal.SIGHUP)
    def reopen_access_log() -> None:  # SIGUSR1, after a rotator moved the file away (as nginx)
        try:
            running.state.access_log.reopen()
        except TlsProxyError as exc:
            log.error("cannot reopen the access log, still writing the old file: %s", exc)

    loop.add_signal_handler(signal.SIGUSR1, reopen_access_log)
    signals.append(signal.SIGUSR1)
    # Only now say "listening": whoever waits for that line (a supervisor, a test, a
    # script) may signal at once, and a signal before its handler would kill the process.
    if worker == 0:
        for line in running.describe():
            print(line, file=sys.stderr, flush=True)
    try:
        await stop.wait()
        if worker == 0:
            print("tlsproxy: stopping (finishing requests in flight)", file=sys.stderr, flush=True)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await running.close()


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _open_access_log(config: ProxyConfig) -> AccessLog:
    """The access log, or a ConfigError naming the file and line of ``access_log.path``."""
    try:
        return AccessLog.open(config.access_log)
    except ConfigError as exc:
        raise config.error(exc.key, exc.reason) from None
