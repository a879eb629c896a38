"""BodyPump: the client's request body -> the upstream, in a task of its own.

A task, because the upstream may answer before reading the body (``100 Continue``, an
early ``413``) and the relay must pass that answer on meanwhile. One chunk at a time:
the next is read from the client only after the upstream's write buffer drained.

Bounds: the client gets ``timeouts.request_header`` between two pieces of body (SPEC
section 4: a slow body holds its upstream connection that long at most), then ``408``
(or the connection closes if a response already started) — except while the client
waits for a ``100 Continue`` that the upstream has not sent yet. The upstream gets
``timeouts.idle`` to take a piece. A failure is recorded on the ``UpstreamConnection`` (``failure``) and
that connection aborted, so the relay, waiting for the response, wakes up at once and
raises the recorded failure — the real cause — instead of "upstream closed".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.errors import HTTPError, PayloadTooLarge
from proxy.http.engine import Body
from proxy.server.channel import ConnectionLost
from proxy.server.downstream import Downstream
from proxy.server.task import stop_task
from proxy.server.upstream_pool import UpstreamConnection

REQUEST_TIMEOUT = 408


class BodyPump:
    """Pumps one request's body; ``events`` counts what was taken from the client."""

    __slots__ = ("_task", "events", "_awaiting_continue")

    def __init__(
        self,
        down: Downstream,
        conn: UpstreamConnection,
        *,
        limit: int,
        read_timeout: float,
        drain_timeout: float,
        awaiting_continue: Callable[[], bool] = lambda: False,
    ) -> None:
        self._awaiting_continue = awaiting_continue
        self.events = 0  # body events consumed from the client: 0 = the request can be sent again whole
        self._task: asyncio.Task = asyncio.get_running_loop().create_task(
            self._run(down, conn, limit, read_timeout, drain_timeout)
        )

    async def _run(
        self, down: Downstream, conn: UpstreamConnection, limit: int, read_timeout: float, drain_timeout: float
    ) -> None:
        engine = conn.engine
        channel = conn.channel
        try:
            while True:
                try:
                    event = await down.next_body_event(read_timeout)
                except TimeoutError:
                    if self.events == 0 and self._awaiting_continue():
                        continue  # the client waits for the upstream's 100 (bounded by upstream_response)
                    raise HTTPError(
                        f"the request body stalled for more than {read_timeout:g}s", status=REQUEST_TIMEOUT
                    ) from None
                self.events += 1
                if type(event) is not Body:
                    channel.write(engine.send_end())
                    return
                down.bytes_in += len(event.data)
                if limit and down.bytes_in > limit:
                    raise PayloadTooLarge(f"request body larger than {limit} bytes")
                channel.writelines(engine.send_body(event.data))
                await channel.drain(drain_timeout)
        except ConnectionLost:
            return  # the upstream closed; its response (if any) is still relayed
        except Exception as exc:
            conn.failure = exc  # the request cannot complete: the relay raises this
            conn.abort()  # and stops waiting for the response

    async def stop(self) -> bool:
        """Cancel the pump if it still runs and wait until it has ended; True when it
        was still running (the request body was not all sent).

        Only the pump's own ending is absorbed (its failure is on the connection): if
        the task calling ``stop`` is cancelled meanwhile, that cancellation propagates."""
        return await stop_task(self._task)
