"""An accepted socket on a TLS listener: sniff the first byte, run the handshake with
the current generation's TLS contexts, read the client's identity once (the verified
certificate) and render it for upstreams under the handshake's generation (a request
under a later one checks and renders it again: ``request._check_client``), then
serve its requests."""

from __future__ import annotations

import asyncio
import logging
import socket

from proxy.errors import PKIError
from proxy.server.connection import serve_connection
from proxy.server.downstream import ClientInfo, Downstream
from proxy.server.h2_session import H2Session
from proxy.server.listeners import LINGER_SECONDS, PLAIN_HTTP_RESPONSE
from proxy.server.state import ServerState
from proxy.server.tls_channel import NothingReceived, PlainHTTP, TLSChannel
from proxy.tls.handshake import describe_handshake_failure
from proxy.tls.identity import client_identity

log = logging.getLogger("tlsproxy")


def _address(peer: tuple) -> str:
    host, port = peer[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_tls_socket(sock: socket.socket, peer: tuple, state: ServerState) -> None:
    generation = state.generation  # the handshake's: its contexts, CAs and engines
    timeouts = generation.config.timeouts
    # No separate MSG_PEEK wait: the channel's first received chunk decides TLS or
    # plain HTTP (PlainHTTP below); a client that sends nothing is closed silently.
    channel = TLSChannel(generation.tls.context)
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: channel, sock)
    except OSError:
        sock.close()
        return
    try:
        await channel.handshake(timeouts.handshake)
    except NothingReceived:
        channel.abort()
        return
    except PlainHTTP:
        state.metrics.handshake_failures.labels("plain_http").inc()
        log.info("plain HTTP from %s on the TLS port: answered 400", _address(peer))
        state.events.refused_handshake(_address(peer), "plain HTTP sent to the TLS port (answered 400)")
        await channel.refuse_plain_http(PLAIN_HTTP_RESPONSE, LINGER_SECONDS)
        return
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError; the alert went out
        key, words = describe_handshake_failure(exc)
        state.metrics.handshake_failures.labels(key).inc()
        log.warning("TLS handshake with %s failed: %s", _address(peer), words)
        state.events.refused_handshake(_address(peer), words)
        return

    ssl_object = channel.ssl_object
    info = ClientInfo(
        ip=peer[0],
        port=peer[1],
        # The transport took its address when it was made (uvloop and asyncio alike): no
        # getsockname() syscall of our own per connection.
        server_port=channel.transport.get_extra_info("sockname")[1],
        tls_version=ssl_object.version(),
        sni=generation.tls.server_name(ssl_object),
        ssl_object=ssl_object,
    )
    try:
        info.identity = client_identity(ssl_object, generation.tls.client_cas)
    except PKIError as exc:  # verified by OpenSSL yet unparseable: refuse the connection
        log.warning("client certificate from %s cannot be used: %s", _address(peer), exc)
        state.events.refused_handshake(_address(peer), f"client certificate cannot be used: {exc}")
        channel.abort()
        return
    # What the handshake's generation makes of this client; a reload makes requests redo it.
    info.generation, info.trusted_identity = generation, info.identity
    info.identity_headers = generation.identity_headers(info.identity)
    if ssl_object.selected_alpn_protocol() == "h2":
        await H2Session(channel, info, state).run()
        return
    engine = generation.engines.server(generation.config.limits.max_header_bytes)
    await serve_connection(Downstream(channel, engine, info, write_timeout=timeouts.idle), state)
