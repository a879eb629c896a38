"""Routing: Host + normalised path -> service, and strip_prefix (pure, no sockets).

Paths reach the router through ``normalize_target`` (tests/test_paths.py has its table),
as they do in the proxy and in the dry run."""

from __future__ import annotations

import random

import pytest

from proxy.check.dry_run import AccessVerdict, explain_access
from proxy.config.model import AllowEntry, ClientAuthSettings, ProxyConfig, Service, ServiceClientAuth, Upstream
from proxy.forwarding.paths import normalize_target
from proxy.forwarding.routing import Router, match_prefix, normalize_host, upstream_target

UPSTREAM = (Upstream("http://127.0.0.1:9000", "127.0.0.1", 9000),)


def service(name: str, *hosts: str, prefix: str = "/", strip: bool = False, **fields) -> Service:
    return Service(name=name, upstreams=UPSTREAM, hosts=hosts, path_prefix=prefix, strip_prefix=strip, **fields)


def names(router: Router, host: str | None, *targets: str) -> list[str | None]:
    return [getattr(router.route(host, normalize_target(t.encode())), "name", None) for t in targets]


def test_prefix_matches_only_at_a_segment_boundary():
    router = Router([service("api", prefix="/api")])
    assert names(router, "x", "/api", "/api/", "/api/x", "/api?q=1") == ["api"] * 4
    assert names(router, "x", "/apix", "/", "/ap", "/other/api") == [None] * 4


def test_root_prefix_matches_everything_and_longest_prefix_wins():
    router = Router([service("root"), service("api", prefix="/api"), service("v1", prefix="/api/v1")])
    assert names(router, "h", "/", "/x", "/apix", "/api/x", "/api/v1", "/api/v1/users", "/api/v12") == [
        "root",
        "root",
        "root",
        "api",
        "v1",
        "v1",
        "api",
    ]


def test_prefix_with_trailing_slash_matches_what_starts_with_it():
    router = Router([service("static", prefix="/static/")])
    assert names(router, None, "/static/a.css", "/static/", "/static", "/staticx") == ["static", "static", None, None]


def test_host_port_case_brackets_and_trailing_dot_are_ignored():
    router = Router([service("api", "api.localhost"), service("v6", "::1"), service("v6b", "[::2]")])
    assert names(router, "API.Localhost:8443", "/") == ["api"]
    assert names(router, "api.localhost.", "/") == ["api"]
    assert names(router, "[::1]:8443", "/") == ["v6"]
    assert names(router, "[::1]", "/") == ["v6"]
    assert names(router, "::2", "/") == ["v6b"]
    assert names(router, "other.localhost", "/") == [None]
    assert names(router, None, "/") == [None]


def test_hostless_service_matches_any_host_but_explicit_host_wins_at_equal_length():
    router = Router([service("any", prefix="/api"), service("api", "api.localhost", prefix="/api")])
    assert names(router, "api.localhost", "/api/x") == ["api"]
    assert names(router, "web.localhost", "/api/x") == ["any"]
    assert names(router, None, "/api/x") == ["any"]


def test_longer_prefix_on_a_hostless_service_beats_a_shorter_host_prefix():
    router = Router([service("site", "api.localhost"), service("health", prefix="/healthz")])
    assert names(router, "api.localhost", "/healthz", "/x") == ["health", "site"]


def test_wildcard_host_matches_one_label_and_loses_to_the_exact_host():
    router = Router([service("wild", "*.localhost"), service("exact", "api.localhost"), service("any")])
    assert names(router, "web.localhost", "/") == ["wild"]
    assert names(router, "api.localhost", "/") == ["exact"]
    assert names(router, "a.b.localhost", "/") == ["any"]
    assert names(router, "localhost", "/") == ["any"]


def test_config_order_breaks_ties():
    router = Router([service("first", prefix="/a"), service("second", prefix="/a")])
    assert names(router, "h", "/a") == ["first"]


def test_dot_segments_cannot_sneak_past_a_prefix():
    router = Router([service("public", prefix="/pub"), service("admin", prefix="/admin")])
    assert names(router, "h", "/pub/../admin/x", "/pub/%2e%2e/admin", "/pub/./x", "/admin/..", "/pub/..;/admin") == [
        "admin",
        "admin",
        "public",
        None,
        "admin",
    ]


def test_no_spelling_of_a_prefix_escapes_its_service():
    router = Router([service("public"), service("ledger", prefix="/ledger")])
    spellings = ["/%6cedger/x", "//ledger/x", "/LEDGER/x", "/Ledger", "/ledger;x/y", "/ledger;", "/./ledger"]
    assert names(router, "h", *spellings) == ["ledger"] * len(spellings)
    assert names(router, "h", "/ledgerx", "/led", "/%6cedgerx", "/pub/ledger") == ["public"] * 4


def test_configured_prefixes_are_read_like_request_paths():
    router = Router([service("public"), service("api", prefix="/API/./v%31")])
    assert names(router, "h", "/api/v1/x", "/Api/V1", "/api/v2") == ["api", "api", "public"]
    assert [match_prefix(p) for p in ("/", None, "/API/", "//a//b", "/a;x/b", "/a%2fb")] == [
        "/", "/", "/api/", "/a/b", "/a/b", "/a%2fb"
    ]


def test_asterisk_matches_no_prefix():
    assert names(Router([service("root")]), "h", "*") == [None]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("API.localhost:443", "api.localhost"), ("[::1]:8443", "::1"), ("::1", "::1"), ("127.0.0.1:80", "127.0.0.1")],
)
def test_normalize_host(raw, expected):
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    ("prefix", "target", "expected"),
    [
        ("/api", b"/api/x?q=1", b"/x?q=1"),
        ("/api", b"/api", b"/"),
        ("/api", b"/api?q", b"/?q"),
        ("/api/", b"/api/x", b"/x"),
        ("/api/", b"/api/", b"/"),
        ("/", b"/x?y", b"/x?y"),
        ("/api", b"/api/../api/x", b"/x"),
        ("/api", b"/API;v=2/x;y?q=/api", b"/x;y?q=/api"),
        ("/api", b"//api//x//", b"/x/"),
        ("/api", b"/%61pi/%78?a%2F", b"/x?a%2F"),
        ("/api/v1", b"/api/v1/users/7", b"/users/7"),
        ("/api/v1", b"/api/v1;p?q", b"/?q"),
        ("/api", b"/other/x", b"/other/x"),  # not routed here by prefix: left alone
    ],
)
def test_strip_prefix(prefix, target, expected):
    assert upstream_target(service("s", prefix=prefix, strip=True), normalize_target(target)) == expected


def test_normalised_target_goes_up_without_strip_prefix():
    """What was routed is what goes upstream (it was the raw target before)."""
    sent = upstream_target(service("s", prefix="/api"), normalize_target(b"/api/x/../%79;p?q=/../"))
    assert sent == b"/api/y;p?q=/../"


def reference_route(services: list[Service], host: str | None, path: str) -> Service | None:
    """The routing rules written the slow, obvious way, to check the precomputed tables."""
    host = normalize_host(host) if host else None
    best = None
    for order, svc in enumerate(services):
        prefix = svc.path_prefix
        path = path.partition("?")[0].lower()
        boundary = prefix.endswith("/") or path == prefix or path[len(prefix) : len(prefix) + 1] == "/"
        if not (path.startswith(prefix) and boundary):
            continue
        ranks = [2] if not svc.hosts else []
        for pattern in svc.hosts:
            if host == pattern:
                ranks.append(0)
            elif pattern.startswith("*.") and host and host.partition(".")[2] == pattern[2:]:
                ranks.append(1)
        if ranks:
            key = (-len(prefix), min(ranks), order)
            if best is None or key < best[0]:
                best = (key, svc)
    return best[1] if best else None


def test_router_agrees_with_the_obvious_implementation():
    rng = random.Random(7)
    hosts = ["a.test", "b.test", "*.test", "x.a.test", "*.a.test", "::1"]
    prefixes = ["/", "/api", "/api/", "/api/v1", "/b", "/api/v1/x"]
    requests = ["a.test", "B.test:443", "c.test", "x.a.test", "y.a.test", "[::1]:8443", "other", None]
    paths = ["/", "/api", "/api/", "/apix", "/api/v1", "/api/v1/x/y", "/api?x", "/b/c", "/bc", "/api/v10", "/API/V1"]
    for _ in range(300):
        services = [
            service(f"s{i}", *rng.sample(hosts, rng.choice([0, 0, 1, 2])), prefix=rng.choice(prefixes))
            for i in range(rng.randint(1, 6))
        ]
        router = Router(services)
        for host in requests:
            for path in paths:
                routed = router.route(host, normalize_target(path.encode()))
                assert routed is reference_route(services, host, path), (services, host, path)


def test_the_dry_run_reads_paths_as_the_proxy_does(pki):
    """``tlsproxy check --url`` routes through the same ``normalize_target``."""
    ledger_only = ServiceClientAuth(require=True, allow=(AllowEntry("cn", "billing"),))
    config = ProxyConfig(
        services=(service("ledger", prefix="/ledger", client_auth=ledger_only), service("public")),
        client_auth=ClientAuthSettings(mode="optional", ca=pki.ca_pem),
    )
    reports = pki.leaf("reports", "reports.example", client=True, cn="reports")[0]
    for spelling in ("/%6cedger/balance", "//ledger/balance", "/LEDGER/balance", "/ledger;x/b", "/pub/..;/ledger"):
        verdict = explain_access(config, reports, f"https://localhost:8443{spelling}")
        assert not verdict.admitted and "service 'ledger'" in verdict.lines[0], spelling
    verdict = explain_access(config, reports, "https://localhost:8443/ledger%2Fbalance")
    assert verdict == AccessVerdict(False, ("refused: bad request target: encoded '/' (%2F) in the path (400)",))
    assert explain_access(config, reports, "https://localhost:8443/public/x").admitted
