"""``workers: N``: every worker's metrics and events, seen from one admin listener.

Workers do not talk per request. Each one publishes a snapshot of its metrics and events
(``Registry.snapshot()`` + ``EventLog.snapshot()``, as JSON) into its own slot of an
anonymous shared memory map every ``PUBLISH_INTERVAL`` and when it stops; the admin
listener (worker 0) publishes its own, reads the others' and merges them at scrape time
(``proxy.ops``). Anonymous ``MAP_SHARED`` memory is made by the parent before it forks,
so every worker, replacements included, inherits it; no file is written, which matters
with a read-only root filesystem.

The parent keeps what dead workers counted: when it reaps one, it folds that worker's
last snapshot into the *retired* slot (counters, histograms and events; gauges die with
the worker) and records the dead worker's pid there, so readers skip the stale slot from
the same instant on — a total never counts a worker twice, nor drops when it is replaced.
(What a worker counted after its last publish is lost when it is SIGKILLed; shown totals
never include it, so nothing that was shown disappears.)

A slot has two halves; the writer fills the one not in use, then flips the index, so a
worker killed mid-write leaves the previous snapshot whole. A CRC lets a reader that
raced a writer notice and read again. One writer per slot: worker i for slot i, the
parent for the retired slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import struct
import zlib

from proxy.ops.events import EventLog, merge_events
from proxy.ops.metrics_merge import fold_retired, merge_snapshots
from proxy.server.metrics import ProxyMetrics, Registry

__all__ = ["PUBLISH_INTERVAL", "SharedSlots", "WorkerStats", "fold_dead_worker"]

log = logging.getLogger("tlsproxy")

PUBLISH_INTERVAL = 1.0
HALF_BYTES = 1 << 20  # per snapshot; pages are touched only as far as a snapshot reaches
_ACTIVE = struct.Struct("<I")
_HEAD = struct.Struct("<II")  # length, crc32
READ_ATTEMPTS = 5


class SharedSlots:
    """``count`` slots of bytes in memory shared with every process forked after it."""

    def __init__(self, count: int, half_bytes: int = HALF_BYTES) -> None:
        self.count = count
        self._half = half_bytes
        self._slot = _ACTIVE.size + 2 * half_bytes
        self._map = mmap.mmap(-1, self._slot * count, flags=mmap.MAP_SHARED)

    def write(self, slot: int, data: bytes) -> bool:
        """Store ``data`` in ``slot``; False (and nothing changed) when it does not fit."""
        if len(data) > self._half - _HEAD.size:
            return False
        base = self._slot * slot
        (active,) = _ACTIVE.unpack_from(self._map, base)
        spare = 1 - (active & 1)
        start = base + _ACTIVE.size + spare * self._half
        _HEAD.pack_into(self._map, start, len(data), zlib.crc32(data))
        self._map[start + _HEAD.size : start + _HEAD.size + len(data)] = data
        _ACTIVE.pack_into(self._map, base, spare)
        return True

    def read(self, slot: int) -> bytes | None:
        """The bytes last written to ``slot``; None when nothing was (or it never read whole)."""
        base = self._slot * slot
        for _ in range(READ_ATTEMPTS):
            (active,) = _ACTIVE.unpack_from(self._map, base)
            start = base + _ACTIVE.size + (active & 1) * self._half
            length, crc = _HEAD.unpack_from(self._map, start)
            if length == 0 or length > self._half - _HEAD.size:
                return None
            data = self._map[start + _HEAD.size : start + _HEAD.size + length]
            if zlib.crc32(data) == crc:
                return data
        return None

    def load(self, slot: int) -> dict | None:
        data = self.read(slot)
        return json.loads(data) if data is not None else None

    @property
    def retired_slot(self) -> int:
        return self.count - 1


def fold_dead_worker(slots: SharedSlots, index: int) -> None:
    """In the parent, once worker ``index`` is reaped: keep its last counts for good."""
    dead = slots.load(index)
    retired = slots.load(slots.retired_slot) or {"folded": {}, "metrics": [], "events": {}}
    if dead is None or retired["folded"].get(str(index)) == dead["pid"]:
        return
    retired = {
        "folded": {**retired["folded"], str(index): dead["pid"]},
        "metrics": fold_retired(retired["metrics"], dead["metrics"]),
        "events": merge_events([retired["events"], dead["events"]]),
    }
    if not slots.write(slots.retired_slot, json.dumps(retired).encode()):
        log.error("worker %d's final counts do not fit the shared memory; they are lost", index)


class WorkerStats:
    """One worker's side: publish its snapshot; for the admin listener, the merged view."""

    def __init__(self, slots: SharedSlots, index: int, metrics: ProxyMetrics, events: EventLog) -> None:
        self.slots = slots
        self.index = index
        self.metrics = metrics
        self.events = events
        self._timer: asyncio.TimerHandle | None = None
        self._too_big_logged = False

    def _snapshot(self) -> dict:
        return {"pid": os.getpid(), "metrics": self.metrics.registry.snapshot(), "events": self.events.snapshot()}

    def publish(self) -> dict:
        snapshot = self._snapshot()
        if not self.slots.write(self.index, json.dumps(snapshot).encode()) and not self._too_big_logged:
            self._too_big_logged = True
            log.error("worker %d: its metrics snapshot is too big to share; /metrics shows an older one", self.index)
        return snapshot

    def start(self, interval: float = PUBLISH_INTERVAL) -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            try:
                self.publish()
            except Exception:  # publishing must outlive any one failure
                log.exception("worker %d: publishing metrics failed", self.index)
            self._timer = loop.call_later(interval, tick)

        tick()

    def stop(self) -> None:
        """Stop publishing, after one last snapshot (what the parent keeps when we exit)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.publish()

    def merged(self) -> tuple[list[dict], dict]:
        """(metric families, events) of every worker alive and gone; ours published first,
        so what this scrape shows is what the parent keeps if we die right after."""
        own = self.publish()
        retired = self.slots.load(self.slots.retired_slot) or {"folded": {}, "metrics": [], "events": {}}
        live, events = [], [retired["events"]]
        for index in range(self.slots.retired_slot):
            snapshot = own if index == self.index else self.slots.load(index)
            if snapshot is None or retired["folded"].get(str(index)) == snapshot["pid"]:
                continue  # never started, or gone and already in the retired totals
            live.append((index, snapshot["metrics"]))
            events.append(snapshot["events"])
        return merge_snapshots(live, retired["metrics"]), merge_events(events)

    def render(self) -> bytes:
        """/metrics for every worker (the admin's ``MetricsPage``)."""
        return Registry.from_snapshot(self.merged()[0]).render()

