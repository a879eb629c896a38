"""An accepted socket on a ``listen_plain`` listener: plain HTTP/1.1, served by the same
request loop as TLS connections (``connection.serve_connection``), over a plain
``Channel`` instead of a ``TLSChannel``.

No TLS means no client identity: the connection has no certificate, so identity headers
a client sends are stripped as always and none are added, and a service (or listener)
that requires a client certificate answers 403. ``X-Forwarded-Proto`` / ``Forwarded``
say ``http``. This is the egress side of a sidecar pair (SPEC 4b): a local component
speaks plain HTTP to it and the proxy adds TLS (and its client certificate) on the way
to an ``https://`` upstream.
"""

from __future__ import annotations

import asyncio
import socket

from proxy.server.channel import Channel
from proxy.server.connection import serve_connection
from proxy.server.downstream import ClientInfo, Downstream
from proxy.server.state import ServerState


async def serve_plain_socket(sock: socket.socket, peer: tuple, state: ServerState) -> None:
    generation = state.generation
    channel = Channel()
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: channel, sock)
    except OSError:
        sock.close()
        return
    info = ClientInfo(ip=peer[0], port=peer[1], server_port=sock.getsockname()[1], scheme=b"http")
    engine = generation.engines.server(generation.config.limits.max_header_bytes)
    await serve_connection(Downstream(channel, engine, info, write_timeout=generation.config.timeouts.idle), state)
