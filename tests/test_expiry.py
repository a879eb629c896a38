"""proxy.server.expiry: warning lines and the not-after gauge (pure), the files reader,
and ExpiryWatch on a real event loop with a short interval, driven by events."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import pytest
from test_metrics import parse_exposition, sample

from proxy.pki.build import issue_leaf
from proxy.pki.store import write_leaf
from proxy.server.expiry import ExpiryWatch, certificates_in_files, expiring_soon, record_not_after
from proxy.server.metrics import ProxyMetrics

NOW = dt.datetime(2026, 11, 22, 12, 0, 0, tzinfo=dt.timezone.utc)
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def make_cert(pki):
    made = {}

    def make(cn: str, not_after: dt.datetime):
        if (cn, not_after) not in made:
            made[cn, not_after] = issue_leaf(
                pki.ca_cert, pki.ca_key, [f"{cn}.localhost"], cn=cn,
                not_before=not_after - dt.timedelta(days=90), not_after=not_after,
            )[0]
        return made[cn, not_after]

    return make


def test_certificates_expiring_within_the_window_are_named_soonest_first(make_cert):
    certs = [
        ("certs/later.pem", make_cert("later", NOW + dt.timedelta(days=13, hours=5))),
        ("certs/fine.pem", make_cert("fine", NOW + dt.timedelta(days=15))),
        ("certs/api.pem", make_cert("api", NOW + dt.timedelta(days=3, hours=2))),
    ]
    assert expiring_soon(certs, now=NOW) == [
        "certificate certs/api.pem (CN=api) expires in 3 days (2026-11-25T14:00:00Z)",
        "certificate certs/later.pem (CN=later) expires in 13 days (2026-12-05T17:00:00Z)",
    ]


def test_expired_certificates_say_so(make_cert):
    certs = [("a.pem", make_cert("old", NOW - dt.timedelta(days=2, hours=1)))]
    assert expiring_soon(certs, now=NOW) == ["certificate a.pem (CN=old) EXPIRED 2 days ago (2026-11-20T11:00:00Z)"]


@pytest.mark.parametrize(
    ("left", "words"),
    [
        (dt.timedelta(days=1), "expires in 1 day"),
        (dt.timedelta(hours=5, minutes=59), "expires in 5 hours"),
        (dt.timedelta(hours=1), "expires in 1 hour"),
        (dt.timedelta(minutes=10), "expires in less than an hour"),
        (dt.timedelta(0), "EXPIRED less than an hour ago"),
        (-dt.timedelta(hours=3), "EXPIRED 3 hours ago"),
    ],
)
def test_short_spans_are_in_hours(make_cert, left, words):
    [line] = expiring_soon([("x.pem", make_cert("x", NOW + left))], now=NOW)
    assert words in line


def test_the_window_is_adjustable_and_naive_now_means_utc(make_cert):
    certs = [("x.pem", make_cert("x", NOW + dt.timedelta(days=20)))]
    assert expiring_soon(certs, now=NOW) == []
    assert len(expiring_soon(certs, now=NOW, within=dt.timedelta(days=30))) == 1
    assert len(expiring_soon(certs, now=NOW.replace(tzinfo=None), within=dt.timedelta(days=30))) == 1


def test_record_not_after_sets_exactly_the_given_certificates(make_cert):
    metrics = ProxyMetrics()
    old = make_cert("old", NOW + dt.timedelta(days=1))
    api = make_cert("api", NOW + dt.timedelta(days=30))
    record_not_after(metrics, [("certs/old.pem", old)])
    record_not_after(metrics, [("certs/api.pem", api)])
    families = parse_exposition(metrics.render())
    assert sample(families, "tlsproxy_certificate_not_after_seconds", path="certs/api.pem", subject="CN=api") == (
        (NOW + dt.timedelta(days=30)).timestamp()
    )
    assert len(families["tlsproxy_certificate_not_after_seconds"]["samples"]) == 1


def test_certificates_in_files_reads_each_leaf_and_skips_unreadable_ones(pki, make_cert, tmp_path, caplog):
    cert = make_cert("api", NOW + dt.timedelta(days=3))
    pem, _key = write_leaf(tmp_path / "api", cert, pki.ca_key, [pki.ca_cert])
    pairs = certificates_in_files([pem, tmp_path / "gone.pem"], logging.getLogger("tlsproxy"))
    assert pairs == [(str(pem), cert)]  # the leaf, not the CA after it
    assert "gone.pem" in caplog.text


# --- the watch on a real loop -----------------------------------------------------------


class Provider:
    """Hands out certificates; sets ``enough`` once it has been asked ``calls`` times."""

    def __init__(self, certs, calls: int, fail_first: bool = False) -> None:
        self.certs, self.calls, self.fail_first = certs, calls, fail_first
        self.asked = 0
        self.enough = asyncio.Event()

    def __call__(self):
        self.asked += 1
        if self.asked >= self.calls:
            self.enough.set()
        if self.fail_first and self.asked == 1:
            raise OSError("certs dir unreadable")
        return self.certs


def test_watch_warns_at_start_and_then_every_interval(make_cert, caplog):
    certs = [("certs/api.pem", make_cert("api", NOW + dt.timedelta(days=3)))]
    metrics = ProxyMetrics()

    async def scenario():
        provider = Provider(certs, calls=3)
        watch = ExpiryWatch(provider, logging.getLogger("tlsproxy"), interval=0.01, metrics=metrics, clock=lambda: NOW)
        watch.start()
        assert provider.asked == 1 and watch.running  # the first check is immediate
        await asyncio.wait_for(provider.enough.wait(), TIMEOUT)
        watch.stop()
        assert not watch.running

    with caplog.at_level(logging.WARNING, logger="tlsproxy"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[:3] == ["certificate certs/api.pem (CN=api) expires in 3 days (2026-11-25T12:00:00Z)"] * 3
    families = parse_exposition(metrics.render())
    assert sample(families, "tlsproxy_certificate_not_after_seconds", path="certs/api.pem", subject="CN=api") > 0


def test_watch_survives_a_failing_provider(make_cert, caplog):
    certs = [("certs/api.pem", make_cert("api", NOW - dt.timedelta(days=1)))]

    async def scenario():
        provider = Provider(certs, calls=2, fail_first=True)
        watch = ExpiryWatch(provider, logging.getLogger("tlsproxy"), interval=0.01, clock=lambda: NOW)
        watch.start()
        await asyncio.wait_for(provider.enough.wait(), TIMEOUT)
        watch.stop()

    asyncio.run(scenario())
    assert "certificate expiry check failed" in caplog.text and "certs dir unreadable" in caplog.text
    assert "certificate certs/api.pem (CN=api) EXPIRED 1 day ago" in caplog.text


def test_watch_interval_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        ExpiryWatch(list, logging.getLogger("tlsproxy"), interval=0)
