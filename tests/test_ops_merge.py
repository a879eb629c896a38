"""Several workers' metrics and events as one (pure), and the shared memory they travel in."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from proxy.ops.events import REFUSALS, EventLog, merge_events
from proxy.ops.metrics_merge import fold_retired, merge_snapshots
from proxy.ops.status_page import CertificateRow, ServiceRow, StatusView, render_status_page
from proxy.server.metrics import ProxyMetrics, Registry
from proxy.server.worker_stats import SharedSlots, WorkerStats, fold_dead_worker


def worker_metrics(requests: int, connections: int, failures: int = 0) -> ProxyMetrics:
    metrics = ProxyMetrics()
    for _ in range(requests):
        metrics.record_request("api", 200, 0.02)
    metrics.active_connections.set(connections)
    metrics.handshake_failures.labels("expired").inc(failures)
    metrics.certificate_not_after.labels("/c.pem", "CN=api").set(1_900_000_000)
    return metrics


def page(families: list[dict]) -> str:
    return Registry.from_snapshot(families).render().decode()


def line(text: str, series: str) -> str | None:
    return next((row.rpartition(" ")[2] for row in text.splitlines() if row.rpartition(" ")[0] == series), None)


def test_a_snapshot_renders_exactly_as_the_live_registry() -> None:
    metrics = worker_metrics(3, 2, 1)
    assert Registry.from_snapshot(json.loads(json.dumps(metrics.registry.snapshot()))).render() == metrics.render()


def test_counters_and_histograms_sum_gauges_follow_their_aggregate() -> None:
    merged = page(merge_snapshots([(0, worker_metrics(3, 2).registry.snapshot()),
                                   (1, worker_metrics(4, 5, 2).registry.snapshot())]))
    assert line(merged, 'tlsproxy_requests_total{service="api",status="200"}') == "7"
    assert line(merged, 'tlsproxy_request_duration_seconds_count{service="api"}') == "7"
    assert line(merged, 'tlsproxy_request_duration_seconds_bucket{service="api",le="0.025"}') == "7"
    assert line(merged, 'tlsproxy_handshake_failures_total{reason="expired"}') == "2"
    assert line(merged, "tlsproxy_active_connections") == "7"  # sum
    assert merged.count("tlsproxy_certificate_not_after_seconds{") == 1  # once
    assert line(merged, 'tlsproxy_draining{worker="0"}') == "0"  # per worker
    assert line(merged, 'tlsproxy_draining{worker="1"}') == "0"
    assert "tlsproxy_draining 0" not in merged


def test_a_metric_added_later_is_merged_without_code_of_its_own() -> None:
    snapshots = []
    for index in range(2):
        registry = Registry()
        registry.counter("tlsproxy_new_things_total", "New.", ("kind",)).labels("x").inc(index + 1)
        registry.histogram("tlsproxy_new_seconds", "New.", buckets=(1.0,)).observe(0.5)
        registry.gauge("tlsproxy_new_level", "New.").set(10 + index)
        snapshots.append((index, registry.snapshot()))
    merged = page(merge_snapshots(snapshots))
    assert line(merged, 'tlsproxy_new_things_total{kind="x"}') == "3"
    assert line(merged, 'tlsproxy_new_seconds_bucket{le="1.0"}') == "2"
    assert line(merged, 'tlsproxy_new_level{worker="1"}') == "11"


def test_dead_workers_keep_their_counts_but_not_their_gauges() -> None:
    retired = fold_retired([], worker_metrics(5, 9, 1).registry.snapshot())
    retired = fold_retired(retired, worker_metrics(2, 9).registry.snapshot())
    assert all(entry["kind"] != "gauge" for entry in retired)
    merged = page(merge_snapshots([(0, worker_metrics(1, 1).registry.snapshot())], retired))
    assert line(merged, 'tlsproxy_requests_total{service="api",status="200"}') == "8"
    assert line(merged, 'tlsproxy_handshake_failures_total{reason="expired"}') == "1"
    assert line(merged, "tlsproxy_active_connections") == "1"


def test_events_are_bounded_classified_and_merged_newest_first() -> None:
    clock = iter(range(1000)).__next__
    log = EventLog(worker=1, clock=lambda: float(clock()))
    for index in range(REFUSALS + 20):
        log.refused_handshake(f"10.0.0.1:{index}", "client certificate has expired")
    assert len(log.snapshot()["refusals"]) == REFUSALS
    log.request_error("10.0.0.2:1", "CN=bob", "api", 403, "CN=bob is not allowed")
    log.request_error("10.0.0.2:2", None, "api", 404, "no service")  # not a refusal
    log.request_error("10.0.0.2:3", None, "api", 502, "upstream refused")
    other = EventLog(worker=0, clock=lambda: 5000.0)
    other.refused_request("10.0.0.3:1", None, "api", 421, "misdirected")
    other.upstream_error("api", 504, "timed out")
    merged = merge_events([log.snapshot(), other.snapshot()])
    assert len(merged["refusals"]) == REFUSALS
    assert [event["client"] for event in merged["refusals"][:2]] == ["10.0.0.3:1", "10.0.0.2:1"]
    assert merged["upstream_errors"] == [other.snapshot()["upstream_errors"][0]]  # the newest per service
    log.forget_services(["web"])
    assert log.snapshot()["upstream_errors"] == []


def test_the_status_page_escapes_everything_and_runs_nothing() -> None:
    evil = '<script>alert("x")</script>'
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    log = EventLog()
    log.refused_request(evil, evil, evil, 403, evil)
    log.reload(False, evil)
    log.upstream_error(evil, 502, evil)
    view = StatusView(
        now=now, version="0", workers=1, listeners=((evil, evil),), client_auth=evil,
        services=(ServiceRow(evil, evil, (evil,), evil),),
        certificates=(CertificateRow("server", evil, evil, (evil,), now + dt.timedelta(days=3)),),
        events=merge_events([log.snapshot()]),
    )
    html = render_status_page(view).decode()
    assert "<script" not in html and "&lt;script&gt;" in html
    assert 'class="warn">3<' in html  # three days left: flagged


def test_shared_slots_cross_fork_and_survive_a_torn_write() -> None:
    slots = SharedSlots(3, half_bytes=4096)
    assert slots.read(0) is None
    pid = os.fork()
    if pid == 0:  # the child writes, the parent reads: the memory is shared
        os._exit(0 if slots.write(0, b"from the child") else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert slots.read(0) == b"from the child"
    assert not slots.write(0, b"x" * 5000)  # too big: refused, the old one kept
    assert slots.read(0) == b"from the child"
    slots.write(0, b"second")  # the child's went to half 1, this one to half 0
    # a writer killed half-way through filling half 1: the index still names half 0
    slots._map[4 + 4096 : 4 + 4096 + 12] = (1000).to_bytes(4, "little") + b"\0\0\0\0torn"
    assert slots.read(0) == b"second"
    # a reader that raced a writer gets bytes whose CRC fails: never half a snapshot
    slots._map[4 + 8 : 4 + 12] = b"XXXX"
    assert slots.read(0) is None


def test_the_parent_folds_a_dead_worker_once_and_readers_skip_its_slot() -> None:
    slots = SharedSlots(3, half_bytes=1 << 16)
    workers = [WorkerStats(slots, index, worker_metrics(10 * (index + 1), 1), EventLog(index)) for index in range(2)]
    for stats in workers:
        stats.publish()
    total = 'tlsproxy_requests_total{service="api",status="200"}'
    assert line(workers[0].render().decode(), total) == "30"
    # worker 1 dies (same pid as the test here, so give its snapshot another one)
    snapshot = slots.load(1)
    slots.write(1, json.dumps({**snapshot, "pid": -1}).encode())
    fold_dead_worker(slots, 1)
    fold_dead_worker(slots, 1)  # reaped twice (it is not): counted once
    assert line(workers[0].render().decode(), total) == "30"
    replacement = WorkerStats(slots, 1, worker_metrics(1, 1), EventLog(1))
    replacement.publish()
    assert line(workers[0].render().decode(), total) == "31"


@pytest.mark.parametrize("aggregate", ["bogus"])
def test_a_gauge_aggregate_must_be_known(aggregate: str) -> None:
    with pytest.raises(ValueError):
        Registry().gauge("tlsproxy_x", "x", aggregate=aggregate)
