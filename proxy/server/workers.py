"""``workers: N``: N processes serve the same ports, the parent supervises them.

As hypercorn does it: the parent binds every listener before forking (port 0 works:
the first set picks the ports, one more set per worker joins them with SO_REUSEPORT,
so the kernel spreads connections over the workers), then forks the workers and only
supervises:

* SIGTERM / SIGINT -> passed to every worker, each drains its own connections
  (shutdown_grace); the parent exits 0 once all are gone;
* SIGHUP -> passed to every worker, each reloads (a failure keeps its old config);
* a worker that dies otherwise is replaced (after a pause if it died young, so a
  crash loop does not spin).

Only worker 0 runs the admin listener and prints the start-up lines; its /metrics and
status page show every worker: each publishes snapshots into shared memory the parent
made before forking, and the parent folds a dead worker's last one into the totals it
keeps (``proxy.server.worker_stats``). The access log is shared safely (O_APPEND, one
write per batch).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from proxy.config.model import ProxyConfig
from proxy.server.listeners import BoundListeners
from proxy.server.worker_stats import SharedSlots, fold_dead_worker

log = logging.getLogger("tlsproxy")

# What the parent passes on to every worker (SIGINT becomes SIGTERM: drain).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

YOUNG_WORKER = 1.0  # a worker dying sooner than this after start is restarted after a pause


# How a worker serves: (config, config_source, listeners=, worker=, shared=) -> exit code. The
# caller passes it in (``running.serve_blocking``), so this module never imports back.
ServeFunction = Callable[..., int]


def run_workers(
    config: ProxyConfig, config_source: Callable[[], ProxyConfig] | None, serve: ServeFunction
) -> int:
    """Bind, fork ``config.workers`` workers, each running ``serve``, supervise them until told to stop."""
    first = BoundListeners.bind(config.listen, config.redirect_http, reuse_port=True, plain=config.listen_plain)
    sets = [first]
    try:
        for _ in range(config.workers - 1):
            sets.append(first.bind_again())
    except OSError:
        for bound in sets:
            bound.close()
        raise
    supervisor = _Supervisor(config, config_source, sets, serve)
    return supervisor.run()


class _Supervisor:
    def __init__(self, config: ProxyConfig, config_source, sets: list[BoundListeners], serve: ServeFunction) -> None:
        self.config = config
        self.serve = serve
        self.config_source = config_source
        self.sets = sets
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, started)
        self.stopping = False
        self.shared = SharedSlots(len(sets) + 1)  # one slot per worker, one for the dead ones' totals

    def run(self) -> int:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)
        for index in range(len(self.sets)):
            self._spawn(index)
        log.info("%d workers: pids %s", len(self.sets), " ".join(str(pid) for pid in self.children))
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index, started = self.children.pop(pid, (None, 0.0))
            if index is None:
                continue
            try:  # before its replacement publishes into its slot
                fold_dead_worker(self.shared, index)
            except Exception:  # supervision goes on whatever the snapshot held
                log.exception("worker %d: keeping its final counts failed", index)
            if self.stopping:
                continue
            log.error("worker %d (pid %d) exited (status %d); starting another", index, pid, status)
            if time.monotonic() - started < YOUNG_WORKER:
                time.sleep(YOUNG_WORKER)  # supervision pause, so a crash loop does not spin
            if not self.stopping:
                self._spawn(index)
        for bound in self.sets:
            bound.close()
        return 0

    def _forward(self, signum: int, _frame: object) -> None:
        if signum not in (signal.SIGHUP, signal.SIGUSR1):  # reload / reopen the log: pass on as is
            self.stopping = True
            signum = signal.SIGTERM
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = (index, time.monotonic())
            return
        code = 1
        try:  # the worker: its own sockets, its own event loop
            # Until its loop installs handlers: SIGTERM / SIGINT end it as usual; a reload
            # or log reopen forwarded now is moot (it is about to load the config and open
            # the log) and must not kill it, as their default action would.
            for signum in FORWARDED_SIGNALS:
                signal.signal(signum, signal.SIG_IGN if signum in (signal.SIGHUP, signal.SIGUSR1) else signal.SIG_DFL)
            for other, bound in enumerate(self.sets):
                if other != index:
                    bound.close()
            code = self.serve(
                self.config, self.config_source, listeners=self.sets[index], worker=index, shared=self.shared
            )
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
