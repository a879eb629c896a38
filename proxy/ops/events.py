"""What the status page lists besides metrics: refusals, reloads, upstream errors.

Each worker keeps its own ``EventLog`` (bounded: the last ``REFUSALS`` refusals and
``RELOADS`` reloads in ring buffers, the last upstream error per service), records into
it in O(1) from the paths that refuse (a failed handshake, a 403 / 421), and hands a
``snapshot()`` to the others; ``merge_events`` puts several workers' snapshots (and
those of workers that are gone) into one, newest first, as bounded as each part.
Events are plain dicts of strings and numbers, ready for JSON and for the page.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

__all__ = ["REFUSALS", "RELOADS", "EventLog", "merge_events"]

REFUSALS = 100  # refused handshakes and refused requests together
RELOADS = 20
REFUSAL_STATUSES = frozenset((403, 421))  # the client's certificate (or SNI) was refused
UPSTREAM_STATUSES = frozenset((502, 504))


class EventLog:
    """One worker's recent events (its index goes into each, so a page for several
    workers says which one saw it)."""

    def __init__(self, worker: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.worker = worker
        self._clock = clock
        self.refusals: deque[dict] = deque(maxlen=REFUSALS)
        self.reloads: deque[dict] = deque(maxlen=RELOADS)
        self.upstream_errors: dict[str, dict] = {}  # service -> its last error

    def refused_handshake(self, client: str, reason: str, subject: str | None = None) -> None:
        self.refusals.append({"time": self._clock(), "worker": self.worker, "stage": "handshake",
                              "client": client, "subject": subject, "service": None, "status": None,
                              "reason": reason})

    def refused_request(self, client: str, subject: str | None, service: str | None, status: int, reason: str) -> None:
        self.refusals.append({"time": self._clock(), "worker": self.worker, "stage": "request",
                              "client": client, "subject": subject, "service": service, "status": status,
                              "reason": reason})

    def request_error(self, client: str, subject: str | None, service: str | None, status: int, reason: str) -> None:
        """A request answered with an error: a refusal (403, 421) or an upstream error
        (502, 504) is kept; other errors (400, 404...) are the access log's business."""
        if status in REFUSAL_STATUSES:
            self.refused_request(client, subject, service, status, reason)
        elif status in UPSTREAM_STATUSES and service is not None:
            self.upstream_error(service, status, reason)

    def reload(self, ok: bool, detail: str) -> None:
        self.reloads.append({"time": self._clock(), "worker": self.worker, "ok": ok, "detail": detail})

    def upstream_error(self, service: str, status: int, reason: str) -> None:
        self.upstream_errors[service] = {"time": self._clock(), "worker": self.worker, "service": service,
                                         "status": status, "reason": reason}

    def forget_services(self, keep: Iterable[str]) -> None:
        """Drop the errors of services a reload removed (the dict stays as small as the config)."""
        kept = set(keep)
        for name in [name for name in self.upstream_errors if name not in kept]:
            del self.upstream_errors[name]

    def snapshot(self) -> dict:
        return {"refusals": list(self.refusals), "reloads": list(self.reloads),
                "upstream_errors": list(self.upstream_errors.values())}


def merge_events(snapshots: Iterable[dict]) -> dict:
    """Several ``EventLog.snapshot()`` results as one: refusals and reloads newest first,
    at most ``REFUSALS`` / ``RELOADS``; the newest upstream error per service."""
    refusals: list[dict] = []
    reloads: list[dict] = []
    errors: dict[str, dict] = {}
    for snapshot in snapshots:
        refusals.extend(snapshot.get("refusals", ()))
        reloads.extend(snapshot.get("reloads", ()))
        for error in snapshot.get("upstream_errors", ()):
            known = errors.get(error["service"])
            if known is None or error["time"] > known["time"]:
                errors[error["service"]] = error
    return {
        "refusals": sorted(refusals, key=_newest_first)[:REFUSALS],
        "reloads": sorted(reloads, key=_newest_first)[:RELOADS],
        "upstream_errors": sorted(errors.values(), key=lambda error: error["service"]),
    }


def _newest_first(event: dict) -> float:
    return -event["time"]
