"""Shutdown: only connections with no byte of a next request received are closed at
once; the wait after cancelling the rest is bounded; a cancelled relay stays cancelled."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from upstream import WAIT, ProxyThread, proxy_config, recv_until_closed, service, tls_connect

from proxy.server import running as running_module

pytestmark = pytest.mark.both_engines


def wait_for(px: ProxyThread, condition) -> None:
    """Wait (bounded) until ``condition(state)`` holds on the proxy's loop."""

    async def check() -> None:
        async with asyncio.timeout(WAIT):
            while not condition(px.running.state):
                await asyncio.sleep(0.01)

    px.call(check(), WAIT + 5)


def test_a_half_received_request_is_answered_at_shutdown_and_an_idle_one_closed(
    pki, upstream, tmp_path, shutdown_begun
):
    px = ProxyThread(proxy_config(pki, service("app", upstream), tmp_path))
    closed = None
    try:
        with tls_connect(pki, px.port) as idle, tls_connect(pki, px.port) as partial:
            partial.sendall(b"GET /echo HTTP/1.1\r\nHost: loc")
            wait_for(px, lambda state: len(state.connections) == 2 and sum(t.idle for t in state.connections) == 1)
            closed = asyncio.run_coroutine_threadsafe(px.running.close(5.0), px.loop)
            assert shutdown_begun.wait(WAIT)
            assert recv_until_closed(idle) == b""  # nothing of a request: closed at once
            partial.sendall(b"alhost\r\n\r\n")
            answer = recv_until_closed(partial)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert b"connection: close" in answer.lower()
        closed.result(WAIT)
    finally:
        px.close()
    assert [r["target"] for r in upstream.requests] == ["/echo"]


def test_the_wait_for_cancelled_connections_is_bounded(pki, upstream, tmp_path, monkeypatch):
    monkeypatch.setattr(running_module, "CANCEL_WAIT", 0.2)
    release = threading.Event()
    px = ProxyThread(proxy_config(pki, service("app", upstream), tmp_path))
    try:

        async def stubborn() -> None:  # a task that does not end when cancelled
            while not release.is_set():
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    pass

        async def add() -> None:
            px.running.connection_tasks.add(asyncio.get_running_loop().create_task(stubborn()))

        px.call(add())
        started = time.monotonic()
        px.call(px.running.close(0.1), WAIT)
        assert time.monotonic() - started < WAIT / 2
    finally:
        release.set()
        px.close()


def test_a_cancelled_relay_stays_cancelled_while_the_body_pump_stops(http_engine):
    """The task stopping the request-body pump is itself cancelled (shutdown): the
    cancellation must reach it, not be swallowed with the pump's own ending."""
    from proxy.server.body_pump import BodyPump

    async def scenario() -> bool:
        pump_stopping = asyncio.Event()
        let_pump_end = asyncio.Event()

        async def slow_to_stop() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pump_stopping.set()
                await let_pump_end.wait()  # cleanup that takes a while
                raise

        pump = BodyPump.__new__(BodyPump)
        pump._task = asyncio.get_running_loop().create_task(slow_to_stop())
        await asyncio.sleep(0)
        stopper = asyncio.get_running_loop().create_task(pump.stop())
        await pump_stopping.wait()
        stopper.cancel()
        let_pump_end.set()
        await asyncio.wait([stopper], timeout=WAIT)
        return stopper.cancelled()

    assert asyncio.run(scenario())


def test_zero_shutdown_grace_stops_at_once(pki, upstream, tmp_path):
    """``shutdown_grace: 0`` means "stop at once" (config/proxy.yaml), not "wait forever"."""
    px = ProxyThread(proxy_config(pki, service("app", upstream), tmp_path))
    try:
        with tls_connect(pki, px.port) as tls:
            tls.sendall(b"GET /hang HTTP/1.1\r\nHost: localhost\r\n\r\n")
            wait_for(px, lambda state: any(r["target"] == "/hang" for r in upstream.requests))
            started = time.monotonic()
            px.call(px.running.close(0), WAIT)
            assert time.monotonic() - started < WAIT / 2
            assert recv_until_closed(tls) == b""  # cancelled: the connection is dropped
    finally:
        px.close()
