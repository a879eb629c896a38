"""accept_loop with its limiter (no proxy around it): connections past the limit wait in
the backlog without the loop spinning, and are accepted once a slot frees up."""

from __future__ import annotations

import asyncio
import socket
import time

from upstream import WAIT

from proxy.config.model import ListenAddress
from proxy.server.listeners import ConnectionSlots, accept_loop, bind

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

        accepting = asyncio.create_task(accept_loop(listener, handler, set(), ConnectionSlots(1)))
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


def test_connection_slots_are_taken_without_waiting_until_none_is_free() -> None:
    slots = ConnectionSlots(2)
    assert slots.take() and slots.take()
    assert not slots.take()  # full: the accept loop waits (take_when_free)
    slots.give_back()
    assert slots.take() and not slots.take()


def test_a_slot_given_back_goes_to_a_waiter_even_when_the_woken_one_is_cancelled() -> None:
    async def scenario() -> None:
        slots = ConnectionSlots(1)
        assert slots.take()
        first = asyncio.create_task(slots.take_when_free())
        second = asyncio.create_task(slots.take_when_free())
        await asyncio.sleep(0)  # both wait
        assert not first.done() and not second.done()
        slots.give_back()  # wakes the first...
        first.cancel()  # ...which is cancelled before it runs (a listener closing)
        await asyncio.wait_for(second, WAIT)  # the slot is not lost: the second has it
        assert first.cancelled() and slots.free == 0
        slots.give_back()
        assert slots.free == 1 and not slots._waiters

    asyncio.run(scenario())


def test_accepted_sockets_are_sockets_with_plain_int_family_and_type() -> None:
    # uvloop detaches (not closes) a socket.socket when its transport closes: a plain
    # _socket.socket would be closed a second time after libuv, maybe a reused descriptor.
    async def scenario() -> None:
        listener = bind(ListenAddress("127.0.0.1", 0))
        port = listener.getsockname()[1]
        accepted: asyncio.Queue[socket.socket] = asyncio.Queue()

        async def handler(conn: socket.socket, peer: tuple) -> None:
            accepted.put_nowait(conn)

        accepting = asyncio.create_task(accept_loop(listener, handler, set()))
        client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        try:
            conn = await asyncio.wait_for(accepted.get(), WAIT)
            assert isinstance(conn, socket.socket)
            assert type(conn.family) is int and conn.family == socket.AF_INET
            assert type(conn.type) is int and conn.type == socket.SOCK_STREAM
            conn.close()
        finally:
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
            client.close()
            listener.close()

    asyncio.run(scenario())
