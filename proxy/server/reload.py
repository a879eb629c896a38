"""Noticing that a reload is due: certificate files that changed, auto certificates
that need renewing. (SIGHUP is the other trigger; ``run_proxy`` wires it.)

``FileWatch`` polls (a ``loop.call_later`` chain) because what it must notice is often
not a write to the file itself: a Kubernetes Secret update is one rename of a ``..data``
symlink, cert-manager or certbot replace files atomically. Comparing (mtime, size,
inode) of every path through its symlinks catches all of them and costs a few
``stat`` calls per interval. What a reload replaces and keeps is in
``RunningProxy.reload_async``; ``on_change`` only starts it, and the reload calls
``refresh()`` once the new generation is published (its set of files may differ).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("tlsproxy")

WATCH_INTERVAL = 2.0

Signature = tuple[tuple[str, int, int, int] | tuple[str], ...]


def files_signature(paths: Iterable[Path]) -> Signature:
    """What identifies the current content of each file (a missing file counts too)."""
    out: list = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((str(path),))
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class FileWatch:
    """Calls ``on_change()`` when the files from ``paths()`` change, or when
    ``due()`` (a renewal time) has passed; checks every ``interval`` seconds."""

    def __init__(
        self,
        paths: Callable[[], Iterable[Path]],
        on_change: Callable[[], None],
        *,
        due: Callable[[], dt.datetime | None] = lambda: None,
        interval: float = WATCH_INTERVAL,
    ) -> None:
        self._paths = paths
        self._on_change = on_change
        self._due = due
        self._interval = interval
        self._signature: Signature = ()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._signature = files_signature(self._paths())
        self._schedule()

    def refresh(self) -> None:
        """Take the files as they are now as the unchanged state (after a reload)."""
        self._signature = files_signature(self._paths())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)

    def _tick(self) -> None:
        try:
            signature = files_signature(self._paths())
            due = self._due()
            renewal = due is not None and dt.datetime.now(dt.timezone.utc) >= due
            if signature != self._signature or renewal:
                log.info("certificate files changed%s: reloading", " (renewal due)" if renewal else "")
                self._on_change()
                self._signature = files_signature(self._paths())  # the set may have changed
        except Exception:  # the watch must outlive any one failure
            log.exception("certificate file watch failed")
        finally:
            self._schedule()
