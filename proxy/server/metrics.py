"""Metrics for ``/metrics``: counters, gauges and histograms in the Prometheus text format.

Why not ``prometheus_client``: the SPEC allows no runtime dependency beyond the five it
names, and the proxy needs a small part of it — labelled counters and gauges, fixed-bucket
histograms, gauges computed at scrape time, and the text exposition format 0.0.4.

The hot path is ``family.labels(*values).inc()``: one dict lookup keyed by the exact
tuple passed (``("api", 200)``), so nothing is formatted or allocated per request. A
first sight of a tuple converts the values to text once; ``200`` and ``"200"`` share one
child (one series), the second just adds a cache entry.

Everything belongs to one process and is touched from its event loop only (no locks);
with ``workers > 1`` each worker counts its own requests, and ``Registry.snapshot()``
turns them into plain data that ``proxy.ops.metrics_merge`` sums over the workers and
``Registry.from_snapshot`` renders: every family is merged by its kind (counters and
histograms summed; gauges per their ``aggregate``), so a metric added later is covered
with no code of its own.

``ProxyMetrics`` is the project's metric set in one object; the proxy core bumps its
attributes, the admin listener renders ``ProxyMetrics.registry``.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from proxy.tls.handshake import HANDSHAKE_FAILURE_KEYS

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "ProxyMetrics",
    "Registry",
]

log = logging.getLogger("tlsproxy")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Prometheus' default buckets, extended to the default upstream_response timeout (60 s).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


# --- the text format ------------------------------------------------------------------


def escape_label_value(value: str) -> str:
    """Backslash, double quote and newline escaped, as the exposition format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escapes only backslash and newline (quotes stay as they are)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, floats exactly, ``+Inf`` / ``NaN``."""
    if isinstance(value, bool):  # e.g. set_function(lambda: state.closing)
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """``{a="x",b="y"}`` (empty when there are no labels), made once per series."""
    if not names:
        return ""
    pairs = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in zip(names, values))
    return "{" + pairs + "}"


# --- series (one per label-value tuple) -----------------------------------------------


class _CounterSeries:
    __slots__ = ("labels_text", "value")

    def __init__(self, labels_text: str) -> None:
        self.labels_text = labels_text
        self.value: float = 0

    def inc(self, n: float = 1) -> None:
        if n < 0:
            raise ValueError("a counter only goes up")
        self.value += n

    def samples(self, name: str) -> Iterable[str]:
        yield f"{name}{self.labels_text} {format_value(self.value)}\n"


class _GaugeSeries:
    __slots__ = ("labels_text", "value", "function")

    def __init__(self, labels_text: str) -> None:
        self.labels_text = labels_text
        self.value: float = 0
        self.function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, n: float = 1) -> None:
        self.value += n

    def dec(self, n: float = 1) -> None:
        self.value -= n

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Take the value from ``function()`` at every render (e.g. open connections)."""
        self.function = function

    def samples(self, name: str) -> Iterable[str]:
        value = self.value
        if self.function is not None:
            try:
                value = self.function()
            except Exception:  # a broken callback must not break the whole scrape
                log.exception("metrics: the callback for %s failed", name)
                return
        yield f"{name}{self.labels_text} {format_value(value)}\n"


class _HistogramSeries:
    __slots__ = ("labels_text", "bounds", "bucket_texts", "counts", "sum", "count")

    def __init__(self, labels_text: str, bounds: tuple[float, ...], bucket_texts: tuple[str, ...]) -> None:
        self.labels_text = labels_text
        self.bounds = bounds
        self.bucket_texts = bucket_texts  # le="..." per bucket, the last one +Inf
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last = above all
        self.sum: float = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, since a bucket counts values <= its bound.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str) -> Iterable[str]:
        inner = self.labels_text[1:-1]
        prefix = f"{inner}," if inner else ""
        cumulative = 0
        for le, count in zip(self.bucket_texts, self.counts):
            cumulative += count
            yield f'{name}_bucket{{{prefix}le="{le}"}} {cumulative}\n'
        yield f"{name}_sum{self.labels_text} {format_value(self.sum)}\n"
        yield f"{name}_count{self.labels_text} {self.count}\n"


# --- families ---------------------------------------------------------------------------


_Series = TypeVar("_Series", "_CounterSeries", "_GaugeSeries", "_HistogramSeries")


class _Family(Generic[_Series]):
    """A metric name with its HELP, TYPE, label names and one series per label values."""

    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"repeated label name in {name}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], _Series] = {}  # text values -> series, render order
        self._cache: dict[tuple, _Series] = {}  # values exactly as passed -> series
        self._default = None if self.labelnames else self.labels()

    def labels(self, *values: object) -> _Series:
        """The series for these label values (in ``labelnames`` order), made on first use."""
        try:
            return self._cache[values]
        except KeyError:
            return self._add(values)

    def _add(self, values: tuple) -> _Series:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} label values, got {len(values)}")
        texts = tuple(str(value) for value in values)
        series = self._series.get(texts)
        if series is None:
            series = self._series[texts] = self._new_series(_label_text(self.labelnames, texts))
        self._cache[values] = series
        return series

    def clear(self) -> None:
        """Forget every series (e.g. the certificates of the previous config)."""
        self._series.clear()
        self._cache.clear()
        if self._default is not None:
            self._default = self.labels()

    def _unlabelled(self) -> _Series:
        if self._default is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self._default

    def _new_series(self, labels_text: str) -> _Series:
        raise NotImplementedError

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {escape_help(self.help)}\n"
        yield f"# TYPE {self.name} {self.kind}\n"
        for series in list(self._series.values()):
            yield from series.samples(self.name)


class Counter(_Family[_CounterSeries]):
    """A count that only goes up: ``c.inc()`` or ``c.labels("api", 200).inc()``."""

    kind = "counter"

    def _new_series(self, labels_text: str) -> _CounterSeries:
        return _CounterSeries(labels_text)

    def inc(self, n: float = 1) -> None:
        self._unlabelled().inc(n)

    @property
    def value(self) -> float:
        return self._unlabelled().value


GAUGE_AGGREGATES = ("worker", "sum", "once")


class Gauge(_Family[_GaugeSeries]):
    """A value that goes up and down, or is computed at render time (``set_function``).

    ``aggregate`` says what one page for several workers shows: ``worker`` one series per
    worker (a ``worker`` label added), ``sum`` the sum (open connections), ``once`` one
    worker's value (the same in all of them: a certificate's expiry)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), aggregate: str = "worker") -> None:
        if aggregate not in GAUGE_AGGREGATES:
            raise ValueError(f"{name}: aggregate must be one of {GAUGE_AGGREGATES}")
        self.aggregate = aggregate
        super().__init__(name, help, labelnames)

    def _new_series(self, labels_text: str) -> _GaugeSeries:
        return _GaugeSeries(labels_text)

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, n: float = 1) -> None:
        self._unlabelled().inc(n)

    def dec(self, n: float = 1) -> None:
        self._unlabelled().dec(n)

    def set_function(self, function: Callable[[], float] | None) -> None:
        self._unlabelled().set_function(function)

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Histogram(_Family[_HistogramSeries]):
    """Observations counted into fixed buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = sorted(float(bound) for bound in buckets if not math.isinf(bound))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct numbers")
        self.bounds = tuple(bounds)
        self._bucket_texts = (*(format_value(bound) for bound in bounds), "+Inf")
        super().__init__(name, help, labelnames)

    def _new_series(self, labels_text: str) -> _HistogramSeries:
        return _HistogramSeries(labels_text, self.bounds, self._bucket_texts)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)


# --- the registry -----------------------------------------------------------------------


_F = TypeVar("_F", bound=_Family)


class Registry:
    """The families one ``/metrics`` page shows, in the order they were made."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def register(self, family: _F) -> _F:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} is already registered")
        self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = (), aggregate: str = "worker") -> Gauge:
        return self.register(Gauge(name, help, labelnames, aggregate))

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> Histogram:
        return self.register(Histogram(name, help, labelnames, buckets))

    def render(self) -> bytes:
        """The whole page in the text exposition format 0.0.4 (see CONTENT_TYPE)."""
        return "".join(line for family in list(self._families.values()) for line in family.render()).encode()

    def snapshot(self) -> list[dict]:
        """Every family and series as plain JSON-able data (gauge callbacks evaluated
        now), for ``proxy.ops.metrics_merge``: what one worker shows the others."""
        out = []
        for family in list(self._families.values()):
            entry: dict = {"name": family.name, "kind": family.kind, "help": family.help,
                           "labelnames": list(family.labelnames)}
            if isinstance(family, Gauge):
                entry["aggregate"] = family.aggregate
            if isinstance(family, Histogram):
                entry["buckets"] = list(family.bounds)
            entry["series"] = [
                [list(values), value]
                for values, series in list(family._series.items())
                if (value := _series_value(series)) is not None
            ]
            out.append(entry)
        return out

    @classmethod
    def from_snapshot(cls, families: Iterable[dict]) -> Registry:
        """A registry holding exactly what ``families`` (a snapshot, or a merge of
        several) says, to be rendered like a live one."""
        registry = cls()
        for entry in families:
            kind, labelnames = entry["kind"], entry["labelnames"]
            if kind == "counter":
                family: _Family = registry.counter(entry["name"], entry["help"], labelnames)
            elif kind == "gauge":
                family = registry.gauge(entry["name"], entry["help"], labelnames, entry.get("aggregate", "worker"))
            else:
                family = registry.histogram(entry["name"], entry["help"], labelnames, entry["buckets"])
            for values, value in entry["series"]:
                series = family.labels(*values)
                if kind == "histogram":
                    series.counts = list(value["counts"])
                    series.sum, series.count = value["sum"], value["count"]
                else:
                    series.value = value
        return registry


def _series_value(series: _CounterSeries | _GaugeSeries | _HistogramSeries) -> object:
    """A series' value as plain data; None for a gauge whose callback failed."""
    if isinstance(series, _HistogramSeries):
        return {"counts": list(series.counts), "sum": series.sum, "count": series.count}
    if isinstance(series, _GaugeSeries) and series.function is not None:
        try:
            return series.function()
        except Exception:
            log.exception("metrics: a gauge callback failed")
            return None
    return series.value


# --- the proxy's metric set -------------------------------------------------------------


class ProxyMetrics:
    """Every metric tlsproxy exports, made once per running proxy.

    Where the core bumps them::

        record_request(service, status, seconds)         once per request, when it ends; or:
          requests.labels(service, status).inc()         (status: int, 0 when none was sent)
          request_duration.labels(service).observe(s)    seconds, request head to response end
        active_connections.set_function(lambda: n)       or .inc() on accept / .dec() on close
        handshake_failures.labels(key).inc()             key from describe_handshake_failure
        upstream_connect_errors.labels(service).inc()    refused / timed out connects
        record_reload(ok)                                after every reload attempt
        draining.set(1)                                  when shutdown begins

    The certificate gauge is filled by ``proxy.server.expiry.record_not_after``.
    """

    def __init__(self, registry: Registry | None = None, *, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.registry = registry = registry if registry is not None else Registry()
        self.requests = registry.counter(
            "tlsproxy_requests_total", "Responses sent, by service and HTTP status.", ("service", "status")
        )
        self.request_duration = registry.histogram(
            "tlsproxy_request_duration_seconds",
            "Time from the request head to the end of the response, by service.",
            ("service",),
            buckets,
        )
        self.active_connections = registry.gauge(
            "tlsproxy_active_connections", "Client connections open now.", aggregate="sum"
        )
        self.handshake_failures = registry.counter(
            "tlsproxy_handshake_failures_total", "Failed TLS handshakes, by reason.", ("reason",)
        )
        self.h2_connection_errors = registry.counter(
            "tlsproxy_h2_connection_errors_total",
            "HTTP/2 connections ended by a GOAWAY with an error, by reason (protocol or abuse).",
            ("reason",),
        )
        self.upstream_connect_errors = registry.counter(
            "tlsproxy_upstream_connect_errors_total",
            "Upstream connections refused or timed out, by service.",
            ("service",),
        )
        self.certificate_not_after = registry.gauge(
            "tlsproxy_certificate_not_after_seconds",
            "When each certificate in use expires (Unix time): the server's, and those presented to https:// upstreams.",
            ("path", "subject"),
            aggregate="once",
        )
        self.reloads = registry.counter(
            "tlsproxy_reloads_total", "Configuration reloads, by result (ok or error).", ("result",)
        )
        self.last_reload_success = registry.gauge(
            "tlsproxy_last_reload_success", "1 if the last (re)load of the configuration worked, else 0."
        )
        self.last_reload_timestamp = registry.gauge(
            "tlsproxy_last_reload_timestamp_seconds", "When the configuration was last (re)loaded (Unix time)."
        )
        self.draining = registry.gauge(
            "tlsproxy_draining", "1 while shutting down (not accepting, finishing requests), else 0."
        )
        # Series that exist before the first event, so rate() and alerts see a 0 first.
        for key in HANDSHAKE_FAILURE_KEYS:
            self.handshake_failures.labels(key)
        for result in ("ok", "error"):
            self.reloads.labels(result)
        for reason in ("protocol", "abuse"):
            self.h2_connection_errors.labels(reason)
        self._request_series: dict[tuple[str, int], tuple[_CounterSeries, _HistogramSeries]] = {}
        # Made once the configuration loaded: that start-up load counts as the last one.
        self.last_reload_success.set(1)
        self.last_reload_timestamp.set(time.time())

    def record_reload(self, ok: bool, *, now: float | None = None) -> None:
        """Count one reload attempt; a failed one keeps the old config, hence success 0."""
        self.reloads.labels("ok" if ok else "error").inc()
        self.last_reload_success.set(1 if ok else 0)
        self.last_reload_timestamp.set(time.time() if now is None else now)

    def record_request(self, service: str, status: int, seconds: float) -> None:
        """One finished request (what the access log line says, as two metrics): one
        dict lookup finds both series (no label handling per request; neither family is
        ever cleared, so the pairs stay theirs)."""
        pair = self._request_series.get((service, status))
        if pair is None:
            pair = self._request_series[(service, status)] = (
                self.requests.labels(service, status), self.request_duration.labels(service)
            )
        pair[0].inc()
        pair[1].observe(seconds)

    def add_services(self, names: Iterable[str]) -> None:
        """Make the per-service series exist at 0 (connect errors) before any traffic."""
        for name in names:
            self.upstream_connect_errors.labels(name)

    def render(self) -> bytes:
        return self.registry.render()
