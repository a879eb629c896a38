"""The byte tunnel after a ``101 Switching Protocols`` (WebSocket, or any Upgrade).

Bytes both ways, unparsed, with half-close (STYLE "Half-close in tunnels", as
ghostunnel's ``copyData``): when one side ends its direction (EOF), the other side is
told — ``write_eof()`` on TCP, ``close_notify`` on TLS — and the other direction keeps
flowing until it ends too. The tunnel ends when both directions have ended, when
either side is gone (reset, a write that cannot go out within ``idle``), or when
nothing has moved either way for ``idle`` seconds.
"""

from __future__ import annotations

import asyncio

from proxy.server.channel import Channel
from proxy.server.downstream import Downstream


class _Activity:
    """When a byte last moved through the tunnel, either way."""

    __slots__ = ("last",)

    def __init__(self, now: float) -> None:
        self.last = now


async def run_tunnel(down: Downstream, upstream: Channel, early_client: bytes, early_upstream: bytes, idle: float) -> None:
    """Tunnel between ``down`` and ``upstream`` until both directions ended (or idle /
    a failure); ``early_*``: what each side sent beyond the HTTP exchange."""
    client = down.channel
    if early_upstream:
        client.write(early_upstream)
        down.bytes_out += len(early_upstream)
    if early_client:
        upstream.write(early_client)
        down.bytes_in += len(early_client)
    loop = client.loop or asyncio.get_running_loop()
    activity = _Activity(loop.time())
    to_upstream = loop.create_task(_pipe(client, upstream, down, "bytes_in", activity, idle))
    to_client = loop.create_task(_pipe(upstream, client, down, "bytes_out", activity, idle))
    pipes = (to_upstream, to_client)
    try:
        # A pipe that ends cleanly (EOF passed on) leaves the other one running; a pipe
        # that fails (reset, idle) ends the tunnel.
        await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in pipes:
            task.cancel()
        await asyncio.wait(pipes)
        for task in pipes:
            if not task.cancelled():
                task.exception()  # retrieved: the tunnel simply ends


async def _pipe(source: Channel, sink: Channel, down: Downstream, counter: str, activity: _Activity, idle: float) -> None:
    loop = source.loop or asyncio.get_running_loop()
    while True:
        # ``idle`` counts from the last byte either way: a direction may stay quiet while
        # the other one is busy (a server that only pushes).
        wait = activity.last + idle - loop.time() if idle else 0
        if idle and wait <= 0:
            raise TimeoutError("tunnel idle")
        try:
            data = await source.read(wait)
        except TimeoutError:
            if loop.time() - activity.last < idle:
                continue  # the other direction moved meanwhile
            raise
        if not data:
            if source.closed:  # gone both ways (reset, or we aborted): nobody left to answer
                raise ConnectionResetError("tunnel peer closed")
            break
        activity.last = loop.time()
        setattr(down, counter, getattr(down, counter) + len(data))
        sink.write(data)
        await sink.drain(idle)
    sink.shutdown_write()  # TLS: close_notify then FIN; TCP: FIN
