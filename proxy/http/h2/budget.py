"""A token bucket for what a client may do often, but not without end.

HTTP/2 lets a client make the server work without ever waiting for an answer: open a
stream and reset it at once (CVE-2023-44487, "rapid reset"), or send PINGs and SETTINGS
that must each be acknowledged. Browsers do both now and then — a page navigation
cancels its pending requests — so each is allowed in bursts (``capacity``) and at a
steady ``per_second`` rate; a client past either is abusing the connection, and the
session ends it with GOAWAY ENHANCE_YOUR_CALM (as nginx, Envoy and Go's server do).
"""

from __future__ import annotations


class Budget:
    __slots__ = ("capacity", "per_second", "_tokens", "_stamp")

    def __init__(self, capacity: float, per_second: float) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self._tokens = capacity
        self._stamp = 0.0

    def spend(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` at time ``now`` (seconds, monotonic); False when overspent."""
        tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.per_second) if self._stamp else self._tokens
        self._stamp = now
        tokens -= amount
        self._tokens = tokens
        return tokens >= 0
