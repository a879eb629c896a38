"""Attack on SPEC 4 with 190 KiB forwarding receives encrypted in one SSL_write: an upstream
with large socket buffers hands the proxy full FORWARD_READ_SIZE receives; a client that
stops reading must leave at most 256 KiB of response data inside the proxy."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from test_proxy_memory_bounds import KIB, SMALL_BUFFER, StallingUpstream, inside, proxy_to, stopped_both_ways
from test_tls_memory import capacity
from upstream import tls_connect

pytestmark = pytest.mark.both_engines

SPEC_BOUND = 256 * KIB


@pytest.mark.timeout(60)
def test_a_stalled_client_behind_a_fast_upstream_holds_at_most_256_kib(pki, tmp_path: Path) -> None:
    up = StallingUpstream(respond=True)
    up.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # (inherited by accept())
    client = None
    try:
        with proxy_to(pki, tmp_path, up) as (px, lent):
            client = tls_connect(pki, px.port, rcvbuf=SMALL_BUFFER)
            client.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
            assert up.ready.wait(20)
            state, _sent = stopped_both_ways(px, lent, up, up.sender, "upstream",
                                             ("up_reading_paused", "down_writing_paused"))
            biggest = 0
            for _ in range(20):  # (more stalls of the sender: each look inside)
                state = inside(px, lent)
                biggest = max(biggest, state["held"])

            async def bio() -> int:
                (tracked,) = px.running.state.connections
                return capacity(tracked.down.channel._outgoing)

            print("held", biggest, "outgoing BIO capacity", px.call(bio()))
            assert biggest <= SPEC_BOUND, biggest
    finally:
        if client is not None:
            client.close()
        up.close()
