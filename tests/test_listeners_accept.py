"""accept_loop with its limiter (no proxy around it): connections past the limit wait in
the backlog without the loop spinning, and are accepted once a slot frees up."""

from __future__ import annotations

import asyncio
import socket
import time

from upstream import WAIT

from proxy.config.model import ListenAddress
from proxy.server.listeners import accept_loop, bind

# How long the test watches a full limiter: long enough that a loop woken over and over by
# the pending connection (level-triggered readiness) would burn most of it in CPU time.
WATCH = 0.3


def test_a_full_limiter_waits_without_spinning_then_accepts() -> None:
    async def scenario() -> None:
        listener = bind(ListenAddress("127.0.0.1", 0))
        port = listener.getsockname()[1]
        release = asyncio.Event()
        served: asyncio.Queue[tuple] = asyncio.Queue()

        async def handler(conn: socket.socket, peer: tuple) -> None:
            first = served.qsize() == 0 and not release.is_set()
            served.put_nowait(peer)
            with conn:
                if first:
                    await release.wait()

        accepting = asyncio.create_task(accept_loop(listener, handler, set(), asyncio.Semaphore(1)))
        await asyncio.sleep(0)  # the accept loop's first step: nothing to accept, it watches the listener
        # Both connect at once: the kernel completes them in the backlog, accepted or not.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(2)]
        try:
            await asyncio.wait_for(served.get(), WAIT)
            cpu = time.process_time()
            await asyncio.sleep(WATCH)  # a window in which nothing may happen
            assert served.empty()  # the second waits in the backlog...
            assert time.process_time() - cpu < WATCH / 2  # ...without waking the loop over and over
            release.set()
            await asyncio.wait_for(served.get(), WAIT)  # accepted once the first is done
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
        served: asyncio.Queue[tuple] = asyncio.Queue()

        async def handler(conn: socket.socket, peer: tuple) -> None:
            served.put_nowait(peer)
            conn.close()

        accepting = asyncio.create_task(accept_loop(listener, handler, set()))
        try:
            for wave in (3, 5):  # the second wave finds the loop waiting again
                clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(wave)]
                peers = {await asyncio.wait_for(served.get(), WAIT) for _ in range(wave)}
                assert peers == {client.getsockname() for client in clients}
                for client in clients:
                    client.close()
        finally:
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
            listener.close()

    asyncio.run(scenario())
