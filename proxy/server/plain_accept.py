"""An accepted socket on a ``listen_plain`` listener: plain HTTP/1.1, served by the same
request loop as TLS connections (``connection.serve_connection``), over a plain
``Channel`` instead of a ``TLSChannel`` — or HTTP/2 with prior knowledge (h2c, what
gRPC clients on an insecure channel speak), served by ``h2_session.H2Session``: the
client's first bytes decide (the HTTP/2 connection preface, RFC 9113 3.3).

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

from proxy.http.h2.codec import PREFACE as H2_PREFACE

from proxy.server.channel import Channel
from proxy.server.connection import serve_connection
from proxy.server.downstream import ClientInfo, Downstream
from proxy.server.h2_session import H2Session
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
    timeouts = generation.config.timeouts
    try:
        first = await _first_bytes(channel, timeouts.request_header)
    except (TimeoutError, ConnectionError):
        channel.abort()
        return
    if not first:
        channel.abort()
        return
    if first.startswith(H2_PREFACE):
        await H2Session(channel, info, state).run(first)
        return
    engine = generation.engines.server(generation.config.limits.max_header_bytes)
    engine.feed(first)
    await serve_connection(Downstream(channel, engine, info, write_timeout=timeouts.idle), state)


async def _first_bytes(channel: Channel, timeout: float) -> bytes:
    """What the client sent first: enough to tell the HTTP/2 preface from an HTTP/1.1
    request line (b"" if it closed first)."""
    data = b""
    deadline = channel.loop.time() + (timeout or 1e9)
    while len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
        chunk = await channel.read(max(deadline - channel.loop.time(), 0.001))
        if not chunk:
            return data
        data += chunk
    return data
