"""Certificate expiry: warn in the log before a server certificate runs out, and export
each one's notAfter for alerting.

An expired server certificate is an outage that announces itself weeks ahead; the
proxy says so at start and once a day (``ExpiryWatch``), and ``/metrics`` carries
``tlsproxy_certificate_not_after_seconds`` so Prometheus can alert on
``tlsproxy_certificate_not_after_seconds - time() < 14 * 86400``.

Certificates come as ``(path, certificate)`` pairs, the path as the user should see it
in the warning. ``expiring_soon`` is pure; ``certificates_in_files`` reads the files;
the watch asks its provider afresh each time, so after a reload it sees the new set.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509

from proxy.errors import PKIError
from proxy.pki.inspect import rfc3339
from proxy.pki.store import load_certificates
from proxy.server.metrics import ProxyMetrics

__all__ = ["WARN_WITHIN", "ExpiryWatch", "certificates_in_files", "expiring_soon", "record_not_after"]

WARN_WITHIN = dt.timedelta(days=14)
DAY = 86400.0

CertificatesProvider = Callable[[], Iterable[tuple[str, x509.Certificate]]]


def expiring_soon(
    certs: Iterable[tuple[str, x509.Certificate]],
    *,
    now: dt.datetime,
    within: dt.timedelta = WARN_WITHIN,
) -> list[str]:
    """One warning line per certificate expiring within ``within`` of ``now`` (or already
    expired), soonest first, e.g.
    ``certificate certs/api.pem (CN=api) expires in 3 days (2026-11-25T10:00:00Z)``."""
    now = now if now.tzinfo is not None else now.replace(tzinfo=dt.timezone.utc)
    due = sorted(
        ((cert.not_valid_after_utc, path, cert) for path, cert in certs if cert.not_valid_after_utc - now <= within),
        key=lambda item: item[0],
    )
    return [_warning(path, cert, not_after, now) for not_after, path, cert in due]


def _warning(path: str, cert: x509.Certificate, not_after: dt.datetime, now: dt.datetime) -> str:
    left = not_after - now
    when = f"expires in {_span(left)}" if left > dt.timedelta(0) else f"EXPIRED {_span(-left)} ago"
    return f"certificate {path} ({subject_of(cert)}) {when} ({rfc3339(not_after)})"


def _span(delta: dt.timedelta) -> str:
    """Whole days, else whole hours, else "less than an hour" (truncated, never rounded up)."""
    for unit, seconds in (("day", 86400), ("hour", 3600)):
        count = int(delta.total_seconds() // seconds)
        if count >= 1:
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return "less than an hour"


def subject_of(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "no subject"


def record_not_after(metrics: ProxyMetrics, certs: Iterable[tuple[str, x509.Certificate]]) -> None:
    """Set ``tlsproxy_certificate_not_after_seconds{path,subject}`` to exactly these
    certificates (series of certificates no longer in use disappear)."""
    gauge = metrics.certificate_not_after
    gauge.clear()
    for path, cert in certs:
        gauge.labels(path, subject_of(cert)).set(int(cert.not_valid_after_utc.timestamp()))


def certificates_in_files(
    paths: Iterable[Path | str], log: logging.Logger | None = None
) -> list[tuple[str, x509.Certificate]]:
    """(path, leaf) for each file: the first certificate in it, as the TLS server sends it.

    A file that cannot be read any more is skipped (and logged when ``log`` is given):
    the certificate in use was loaded earlier and the next reload will report the file.
    """
    pairs = []
    for path in paths:
        try:
            pairs.append((str(path), load_certificates(Path(path))[0]))
        except PKIError as exc:
            if log is not None:
                log.warning("certificate expiry check: %s", exc)
    return pairs


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class ExpiryWatch:
    """Warns about certificates expiring soon: at ``start()`` and every ``interval``
    seconds after (a ``loop.call_later`` chain), until ``stop()``.

    With ``metrics``, every check also refreshes the not-after gauge. A provider that
    fails is logged and tried again next time; the watch never stops by itself.
    """

    def __init__(
        self,
        certs_provider: CertificatesProvider,
        log: logging.Logger,
        interval: float = DAY,
        *,
        within: dt.timedelta = WARN_WITHIN,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        if interval <= 0:
            raise ValueError("the expiry check interval must be positive")
        self._provider = certs_provider
        self._log = log
        self._interval = interval
        self._within = within
        self._metrics = metrics
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._timer is not None

    def start(self) -> None:
        """Check now and schedule the next check (call from the running loop)."""
        self.stop()
        self._tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def check(self) -> list[str]:
        """Log a warning per certificate expiring soon; the lines logged."""
        try:
            certs = list(self._provider())
        except Exception:
            self._log.exception("certificate expiry check failed")
            return []
        if self._metrics is not None:
            record_not_after(self._metrics, certs)
        lines = expiring_soon(certs, now=self._clock(), within=self._within)
        for line in lines:
            self._log.warning("%s", line)
        return lines

    def _tick(self) -> None:
        try:
            self.check()
        finally:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)
