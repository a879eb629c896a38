"""HTTP/2 flow control and backpressure (SPEC 4, 4a): many streams on one connection,
16 MiB both ways byte-exact, a stream its client stops reading does not stall its
neighbour, and a request body the upstream stops reading stops being acknowledged
(the proxy never takes more than its windows)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket

import pytest
from h2client import H2Client
from test_proxy_memory_bounds import StallingUpstream, inq, outq
from upstream import ProxyThread, pattern, pattern_sha256, proxy_config, service

from proxy.server.h2_session import STREAM_WINDOW

pytestmark = pytest.mark.both_engines

MIB = 1024 * 1024
BIG = 16 * MIB


@pytest.fixture
def px(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as proxy:
        yield proxy


def test_fifty_concurrent_streams_each_get_their_own_answer(pki, upstream, px):
    with H2Client(pki, px.port) as client:
        streams = {client.request(f"/echo/{n}", method="POST", body=b"x" * n): n for n in range(50)}
        for stream_id, n in streams.items():
            answer = client.response(stream_id)
            assert answer.status == 200 and answer.ended, answer
            seen = json.loads(answer.body)
            assert seen["target"] == f"/echo/{n}" and seen["body_bytes"] == n
    assert len(upstream.requests) == 50


def test_16_mib_upload_arrives_byte_exact(pki, upstream, px):
    body = b"".join(pattern(BIG))
    with H2Client(pki, px.port) as client:
        answer = client.response(client.request("/echo", method="POST", body=body))
        assert answer.status == 200, answer
        seen = json.loads(answer.body)
    assert seen["body_bytes"] == BIG and seen["body_sha256"] == pattern_sha256(BIG)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_16_mib_download_arrives_byte_exact(pki, upstream, px, chunked):
    path = f"/download?size={BIG}" + ("&chunked=1" if chunked else "")
    with H2Client(pki, px.port) as client:
        answer = client.response(client.request(path))
        assert answer.status == 200 and answer.ended
    assert len(answer.body) == BIG
    assert hashlib.sha256(answer.body).hexdigest() == pattern_sha256(BIG)


def test_a_stream_its_client_stops_reading_does_not_stall_its_neighbour(pki, upstream, px):
    """Stream A's DATA is never acknowledged (its window stays shut at the client's
    65535 bytes); stream B on the same connection still gets its whole 1 MiB."""
    with H2Client(pki, px.port) as client:
        stalled = client.request(f"/download?size={4 * MIB}")
        client.hold.add(stalled)
        neighbour = client.request(f"/download?size={MIB}")
        answer = client.response(neighbour)
        assert answer.status == 200 and answer.ended and len(answer.body) == MIB
        assert hashlib.sha256(answer.body).hexdigest() == pattern_sha256(MIB)
        held = client.answers[stalled]
        assert not held.ended and len(held.body) <= 65535
        # and once A is read again, it completes too
        client.hold.discard(stalled)
        client.conn.acknowledge_received_data(len(held.body), stalled)
        client.flush()
        done = client.response(stalled)
        assert done.ended and len(done.body) == 4 * MIB


def proxy_socket(local_port: int | None = None, peer_port: int | None = None) -> socket.socket | None:
    """This process's TCP socket (a dup) with that local and/or peer port: the proxy runs
    in-process, so its sockets are here to ask the kernel about."""
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET:
                local, peer = sock.getsockname()[1], sock.getpeername()[1]
                if (local_port is None or local == local_port) and (peer_port is None or peer == peer_port):
                    return sock
        except OSError:
            pass
        sock.close()
    return None


def test_a_request_body_the_upstream_stops_reading_stops_being_acknowledged(pki, tmp_path):
    """The upstream reads the head, then nothing. The client sends as its windows allow;
    once it stalls (no WINDOW_UPDATE comes), what it sent, less what sits in kernel
    queues on the way and what the upstream read, is what the proxy holds: at most its
    stream window plus its 256 KiB write bound (and one read)."""
    up = StallingUpstream(respond=False)
    try:
        with ProxyThread(proxy_config(pki, service("app", up.model()), tmp_path)) as px, \
                H2Client(pki, px.port) as client:
            stream_id = client.request("/upload", method="POST", end=False)
            sent = 0
            pieces = pattern(BIG)
            piece = b""
            while sent < BIG:
                window = min(client.conn.local_flow_control_window(stream_id), client.conn.max_outbound_frame_size)
                if window > 0:
                    piece = piece or next(pieces)
                    client.conn.send_data(stream_id, piece[:window])
                    sent += len(piece[:window])
                    piece = piece[window:]
                    client.flush()
                    continue
                client.sock.settimeout(1.0)  # stalled once no WINDOW_UPDATE comes for this long
                try:
                    client.receive()
                except TimeoutError:
                    break
                finally:
                    client.sock.settimeout(5.0)
            assert sent < BIG, "the whole body was acknowledged though the upstream read none of it"
            assert up.ready.wait(5)
            to_upstream = proxy_socket(peer_port=up.port)
            from_client = proxy_socket(local_port=px.port, peer_port=client.sock.getsockname()[1])
            assert to_upstream is not None and from_client is not None
            with contextlib.closing(to_upstream), contextlib.closing(from_client):
                in_kernel = outq(client.sock) + inq(from_client) + outq(to_upstream) + inq(up.conn)
            inside = sent - in_kernel - up.body_read
            assert inside <= STREAM_WINDOW + 256 * 1024 + 64 * 1024, (sent, in_kernel, up.body_read)
    finally:
        up.close()
