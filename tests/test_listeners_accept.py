"""accept_loop with its limiter (no proxy around it): connections past the limit wait in
the backlog without the loop spinning, and are accepted once a slot frees up."""

from __future__ import annotations

import asyncio
import socket
import time

from proxy.config.model import ListenAddress
from proxy.server.listeners import accept_loop, bind


def test_a_full_limiter_waits_without_spinning_then_accepts() -> None:
    async def scenario() -> None:
        listener = bind(ListenAddress("127.0.0.1", 0))
        port = listener.getsockname()[1]
        release = asyncio.Event()
        served: list[tuple] = []

        async def handler(conn: socket.socket, peer: tuple) -> None:
            served.append(peer)
            with conn:
                if len(served) == 1:
                    await release.wait()

        tasks: set[asyncio.Task] = set()
        accepting = asyncio.create_task(accept_loop(listener, handler, tasks, asyncio.Semaphore(1)))
        await asyncio.sleep(0.05)  # waiting for a connection: the listener is watched
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            await asyncio.sleep(0.1)
            assert len(served) == 1  # the second waits in the backlog
            cpu = time.process_time()
            await asyncio.sleep(0.3)
            assert time.process_time() - cpu < 0.15  # not woken by the pending connection
            assert len(served) == 1
            release.set()
            for _ in range(50):
                await asyncio.sleep(0.01)
                if len(served) == 2:
                    break
            assert len(served) == 2
        finally:
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
            for client in clients:
                client.close()
            listener.close()

    asyncio.run(scenario())


def test_connections_arriving_while_idle_are_all_accepted() -> None:
    async def scenario() -> None:
        listener = bind(ListenAddress("127.0.0.1", 0))
        port = listener.getsockname()[1]
        served: list[tuple] = []

        async def handler(conn: socket.socket, peer: tuple) -> None:
            served.append(peer)
            conn.close()

        accepting = asyncio.create_task(accept_loop(listener, handler, set()))
        try:
            expected = 0
            for wave in (3, 5):  # the second wave finds the loop waiting again
                expected += wave
                clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(wave)]
                for _ in range(100):
                    await asyncio.sleep(0.01)
                    if len(served) == expected:
                        break
                for client in clients:
                    client.close()
            assert len(served) == 8
        finally:
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
            listener.close()

    asyncio.run(scenario())
