"""I/O: listeners, connections, the upstream pool, the access log, signals.

``start_proxy`` / ``run_proxy`` (in ``running``) are the entry points the CLI, the demo
and the tests use; a request's path through the modules is in ARCHITECTURE.md.
"""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so importing one submodule (e.g. access_log) does not pull in the whole server.
    if name in ("start_proxy", "run_proxy", "RunningProxy"):
        from proxy.server import running

        return getattr(running, name)
    raise AttributeError(name)
