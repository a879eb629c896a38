"""The ``redirect_http`` listener: every plain-HTTP request gets ``308`` to https://.

``redirect_location`` is the pure part: same host, same path and query, the port
replaced by the first TLS listener's (left out when that is 443).
"""

from __future__ import annotations

import asyncio
import socket

from proxy.errors import BadRequest, HTTPError
from proxy.http.engine import RequestHead
from proxy.server.channel import Channel
from proxy.server.connection import CLOSE_WAIT
from proxy.server.downstream import ClientInfo, Downstream
from proxy.server.state import ServerState

_HOST_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")


def redirect_location(host: bytes | None, target: bytes, https_port: int) -> bytes:
    """The https:// URL for a plain request; BadRequest when Host is missing or not a
    host name (which would make the redirect point elsewhere)."""
    if not host or not _HOST_BYTES.issuperset(host):
        raise BadRequest("a Host header naming this server is needed to redirect to https://")
    if host.startswith(b"["):
        name = host[: host.find(b"]") + 1]
        if len(name) < 3:
            raise BadRequest("malformed Host header")
    else:
        name = host.rpartition(b":")[0] if host.count(b":") == 1 else host
    if target.startswith((b"http://", b"https://")):  # absolute-form: keep path and query
        rest = target.partition(b"://")[2]
        target = b"/" + rest.partition(b"/")[2]
    if not target.startswith(b"/"):
        target = b"/"
    port = b"" if https_port == 443 else b":%d" % https_port
    return b"https://" + name.lower() + port + target


async def serve_redirect_socket(sock: socket.socket, peer: tuple, state: ServerState) -> None:
    """Answer requests on one plain connection with redirects until it closes."""
    channel = Channel()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: channel, sock)
    info = ClientInfo(ip=peer[0], port=peer[1], server_port=sock.getsockname()[1])
    timeouts = state.config.timeouts
    down = Downstream(channel, state.engines.server(state.config.limits.max_header_bytes), info, timeouts.idle)
    try:
        with state.track(down) as tracked:
            first_wait = timeouts.request_header
            while not state.closing:
                tracked.idle = True
                head = await down.read_head(first_wait, timeouts.request_header)
                tracked.idle = False
                if head is None or not _redirect(down, head, state):
                    return
                first_wait = timeouts.idle
    except HTTPError as exc:
        if down.engine.can_respond:
            down.send_error(exc.status, str(exc), close=True)
    finally:
        await channel.close_and_wait(CLOSE_WAIT)


def _redirect(down: Downstream, head: RequestHead, state: ServerState) -> bool:
    """Send one 308 (or 400); True if the connection may carry another request."""
    try:
        location = redirect_location(head.header(b"host"), head.target, state.https_port)
    except BadRequest as exc:
        down.send_error(exc.status, str(exc), close=True)
        return False
    body = b"Use " + location + b"\n"
    close = head.has_body or state.closing  # the body is not read: end the connection
    down.send_simple(308, body, [(b"location", location)], close=close)
    return not close and down.engine.start_next_cycle()
