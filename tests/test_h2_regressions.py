"""Bugs found driving the proxy with real HTTP/2 clients, pinned down with a raw h2 client.

1. An upstream that answers before reading the request body (413, then close) and a
   stream whose task is cancelled while the relay stops the body pump — the client resets
   the stream, or its connection ends — left the upstream connection open and owned by
   nobody (curl over h2 to such an upstream did it 5 times in 6: the proxy's event loop
   then refused to close, "unclosed resource <TCPTransport>").
2. h2 checks ``content-length`` against the DATA received itself and treats a mismatch as
   a connection error: GOAWAY PROTOCOL_ERROR ends every stream of the client, where RFC
   9113 8.1.1 makes it a stream error. curl meets it for real: answered early (413 before
   its body), it ends its request with an empty DATA + END_STREAM, and when that arrives
   before the proxy's RST_STREAM the connection dies with the 413's body unsent
   (``curl: (18) HTTP/2 stream 1 was not closed cleanly``, 3 times in 10).
3. Empty DATA frames (CVE-2019-9518, "empty frames flood") were not counted against the
   control-frame budget the session's docstring says they draw on: 5,000 of them on one
   stream were all processed, where 5,000 PINGs get GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame
from test_h2_serve import H2Client
from upstream import WAIT, ProxyThread, proxy_config, service

from proxy.server.body_pump import BodyPump
from proxy.server.upstream_pool import UpstreamConnection


def post_headers(client: H2Client, stream_id: int, path: str, port: int, length: int) -> None:
    client.conn.send_headers(stream_id, [(":method", "POST"), (":scheme", "https"), (":authority", f"localhost:{port}"),
                                         (":path", path), ("content-length", str(length))])
    client.sock.sendall(client.conn.data_to_send())


def test_a_stream_cancelled_while_its_body_pump_stops_closes_its_upstream_connection(
    pki, upstream, tmp_path, monkeypatch
):
    ended: list[UpstreamConnection] = []  # upstream connections closed or aborted
    for name in ("close", "abort"):
        original = getattr(UpstreamConnection, name)

        def ending(self, original=original):
            ended.append(self)
            original(self)

        monkeypatch.setattr(UpstreamConnection, name, ending)
    stopping = threading.Event()
    original_stop = BodyPump.stop

    async def slow_stop(self):  # the window, held open: the stream is reset meanwhile
        stopping.set()
        await asyncio.Event().wait()
        return await original_stop(self)

    monkeypatch.setattr(BodyPump, "stop", slow_stop)
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        client = H2Client(px.port, pki.ca_pem)
        try:
            post_headers(client, 1, "/early", px.port, 10)  # the upstream answers 413 unread
            assert stopping.wait(WAIT)  # the response is relayed; the relay stops the pump
            client.sock.sendall(RstStreamFrame(1, error_code=0x8).serialize())  # CANCEL

            async def settle() -> None:
                while any(s.task is not None for t in px.running.state.connections
                          for s in getattr(t.down, "streams", {}).values()):
                    await asyncio.sleep(0.01)

            px.call(settle())  # the stream's task has ended
            assert [c.upstream.port for c in ended] == [upstream.port], "the upstream connection was left open"
        finally:
            client.close()


def test_a_content_length_mismatch_ends_its_stream_not_its_neighbours(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        client = H2Client(px.port, pki.ca_pem)
        try:
            held = client.get("/held", f"localhost:{px.port}")
            assert upstream.holding.wait(WAIT)
            post_headers(client, held + 2, "/echo", px.port, 10)
            client.sock.sendall(DataFrame(held + 2, b"abc", flags=["END_STREAM"]).serialize())  # 3 of 10
            refused = None
            while refused is None:
                frames = client.frames()
                assert frames, "the proxy closed the connection"
                for frame in frames:
                    assert not isinstance(frame, GoAwayFrame), f"GOAWAY error {frame.error_code}: the connection died"
                    if frame.stream_id == held + 2 and isinstance(frame, (RstStreamFrame, HeadersFrame)):
                        refused = frame
            upstream.let_go()
            status = None
            while status is None:
                frames = client.frames()
                assert frames, "the proxy closed the connection"
                status = next((f.fields[b":status"] for f in frames
                               if isinstance(f, HeadersFrame) and f.stream_id == held), None)
            assert status == b"200"  # the neighbour was answered
            # The malformed one was refused on its own stream (a 400 saying why, or a reset).
            # Its head had gone upstream as it came (bodies are streamed); its body never
            # completed there: the upstream connection carrying it was aborted.
            if isinstance(refused, HeadersFrame):
                assert refused.fields[b":status"] == b"400"
        finally:
            client.close()


def empty_data_flood(px: ProxyThread, pki, frames: int) -> tuple[GoAwayFrame | None, bytes | None]:
    """A POST whose body is ``frames`` empty DATA frames, then END_STREAM: the GOAWAY the
    proxy sent, if any, and the stream's :status, if it was answered."""
    client = H2Client(px.port, pki.ca_pem)
    try:
        client.conn.send_headers(1, [(":method", "POST"), (":scheme", "https"),
                                     (":authority", f"localhost:{px.port}"), (":path", "/echo")])
        # one write: the head and the flood are read together, before any answer could come
        client.sock.sendall(client.conn.data_to_send() + DataFrame(1, b"").serialize() * frames
                            + DataFrame(1, b"", flags=["END_STREAM"]).serialize())
        while True:
            received = client.frames()
            if not received:
                return None, None
            for frame in received:
                if isinstance(frame, GoAwayFrame):
                    return frame, None
                if isinstance(frame, HeadersFrame) and frame.stream_id == 1:
                    return None, frame.fields[b":status"]
    finally:
        client.close()


def test_a_flood_of_empty_data_frames_gets_goaway_enhance_your_calm(pki, upstream, tmp_path):
    """CVE-2019-9518 ("empty frames flood"): empty DATA frames cost the proxy work and
    carry nothing; they draw on the control-frame budget, as PING and SETTINGS do."""
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        assert empty_data_flood(px, pki, 3) == (None, b"200")  # a few are ordinary (curl ends bodies so)
        goaway, status = empty_data_flood(px, pki, 5000)
        assert goaway is not None and goaway.error_code == 0xB, (goaway, status)  # ENHANCE_YOUR_CALM
        assert empty_data_flood(px, pki, 0) == (None, b"200")  # and the proxy goes on serving
