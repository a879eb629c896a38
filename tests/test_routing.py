"""Routing: Host + path -> service, and strip_prefix (pure, no sockets)."""

from __future__ import annotations

import random

import pytest

from proxy.config.model import Service, Upstream
from proxy.forwarding.routing import Router, normalize_host, routing_path, upstream_target

UPSTREAM = (Upstream("http://127.0.0.1:9000", "127.0.0.1", 9000),)


def service(name: str, *hosts: str, prefix: str = "/", strip: bool = False) -> Service:
    return Service(name=name, upstreams=UPSTREAM, hosts=hosts, path_prefix=prefix, strip_prefix=strip)


def names(router: Router, host: str | None, *paths: str) -> list[str | None]:
    return [getattr(router.route(host, path), "name", None) for path in paths]


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
    assert names(router, "h", "/pub/../admin/x", "/pub/%2e%2e/admin", "/pub/./x", "/admin/..") == [
        "admin",
        "admin",
        "public",
        None,
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/b/../c", "/a/c"),
        ("/a/./b/.", "/a/b/"),
        ("/../../x", "/x"),
        ("/a/..?q=/..", "/?q=/.."),
        ("/plain?x", "/plain?x"),
        ("*", "*"),
    ],
)
def test_routing_path(raw, expected):
    assert routing_path(raw) == expected


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
        ("/", b"/x?y", b"/x?y"),
        ("/api", b"/api/../api/x", b"/x"),
    ],
)
def test_strip_prefix(prefix, target, expected):
    assert upstream_target(service("s", prefix=prefix, strip=True), target) == expected


def test_target_unchanged_without_strip_prefix():
    assert upstream_target(service("s", prefix="/api"), b"/api/x/../y?q") == b"/api/x/../y?q"


def reference_route(services: list[Service], host: str | None, path: str) -> Service | None:
    """The routing rules written the slow, obvious way, to check the precomputed tables."""
    host = normalize_host(host) if host else None
    best = None
    for order, svc in enumerate(services):
        prefix = svc.path_prefix
        boundary = prefix.endswith("/") or path == prefix or path[len(prefix) : len(prefix) + 1] in ("/", "?")
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
    paths = ["/", "/api", "/api/", "/apix", "/api/v1", "/api/v1/x/y", "/api?x", "/b/c", "/bc", "/api/v10"]
    for _ in range(300):
        services = [
            service(f"s{i}", *rng.sample(hosts, rng.choice([0, 0, 1, 2])), prefix=rng.choice(prefixes))
            for i in range(rng.randint(1, 6))
        ]
        router = Router(services)
        for host in requests:
            for path in paths:
                assert router.route(host, path) is reference_route(services, host, path), (services, host, path)
