"""Which engine classes serve a connection: the factory for config value ``http_engine``.

It lives beside the engine interface, not in it, so ``engine.py`` imports no engine
(the engines import it) and nothing imports in a cycle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from proxy.http.engine import ClientEngine, ServerEngine


@dataclass(frozen=True)
class EngineFactory:
    """Makes the engines for one configured ``http_engine``."""

    name: str
    server: type[ServerEngine]
    client: type[ClientEngine]


# What ``auto`` resolves to when set (tests run the whole suite once per engine this way).
FORCED_ENGINE_ENV = "TLSPROXY_HTTP_ENGINE"
forced_engine: str | None = None


def engine_factory(name: str = "auto") -> EngineFactory:
    """The engine classes for config value ``http_engine``: ``h11``, ``httptools``, or
    ``auto`` (httptools when importable, else h11 — the reference and the fallback).

    ``forced_engine`` (module attribute) or the environment variable
    ``TLSPROXY_HTTP_ENGINE`` forces the engine behind ``auto``: the test suite uses it
    to run every proxy test on both engines, including ``tlsproxy serve`` subprocesses."""
    if name == "auto":
        name = forced_engine or os.environ.get(FORCED_ENGINE_ENV) or "auto"
    if name in ("auto", "httptools"):
        try:
            from proxy.http.httptools_engine import HttptoolsClientEngine, HttptoolsServerEngine
        except ImportError:
            if name == "httptools":
                raise
        else:
            return EngineFactory("httptools", HttptoolsServerEngine, HttptoolsClientEngine)
    from proxy.http.h11_engine import H11ClientEngine, H11ServerEngine

    return EngineFactory("h11", H11ServerEngine, H11ClientEngine)
