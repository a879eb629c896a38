"""What an idle TLS connection keeps: the MemoryBIOs' buffers are freed once it waits after
its handshake (a memory BIO otherwise keeps the largest size it ever held, ~1.7 KiB a
connection between the two), and the channel goes on working with them. Capacities are read with
BIO_get_mem_ptr, as the releaser's docstring measured them."""

from __future__ import annotations

import asyncio
import ctypes
import ssl

import pytest
from test_tls_channel_writes import handshaken, receive

from proxy.server import tls_channel
from proxy.server.tls_channel import TLSChannel
from proxy.tls import openssl_ctl


class _BufMem(ctypes.Structure):
    _fields_ = [("length", ctypes.c_size_t), ("data", ctypes.c_void_p), ("max", ctypes.c_size_t),
                ("flags", ctypes.c_ulong)]


def capacity(bio: ssl.MemoryBIO) -> int:
    """The bytes the BIO's buffer holds allocated (BIO_get_mem_ptr -> BUF_MEM.max)."""
    lib = openssl_ctl._openssl()
    buffer = ctypes.POINTER(_BufMem)()
    lib.BIO_ctrl(openssl_ctl._bio_pointer(bio), 115, 0, ctypes.byref(buffer))  # BIO_C_GET_BUF_MEM_PTR
    return buffer.contents.max


def test_an_empty_memory_bio_gives_its_buffer_back_and_still_works():
    release = openssl_ctl.memory_bio_releaser()
    assert release is not None
    bio = ssl.MemoryBIO()
    bio.write(b"x" * 3000)
    assert bio.read() == b"x" * 3000
    assert capacity(bio) >= 3000
    release(bio)
    assert capacity(bio) == 0
    bio.write(b"again")
    assert bio.pending == 5 and bio.read() == b"again"


def test_a_memory_bio_holding_unread_bytes_keeps_them():
    release = openssl_ctl.memory_bio_releaser()
    bio = ssl.MemoryBIO()
    bio.write(b"unread")
    release(bio)
    assert bio.read() == b"unread"


def test_without_libssl_nothing_is_released(monkeypatch):
    def no_libssl():
        raise OSError("libssl not found")

    monkeypatch.setattr(openssl_ctl, "_libssl", None)
    monkeypatch.setattr(openssl_ctl, "_load_libssl", no_libssl)
    assert openssl_ctl.memory_bio_releaser() is None


def test_an_idle_channel_holds_no_tls_buffer_after_its_handshake_and_still_serves(pki):
    async def scenario():
        outgoing = []
        channel, transport, client, client_in = await handshaken(pki, outgoing=outgoing)
        client_out = outgoing[0]
        assert capacity(channel._incoming) > 0 and capacity(channel._outgoing) > 0
        # Idle: a read waits, and the handshake's buffers go.
        reading = asyncio.ensure_future(channel.read(5))
        await asyncio.sleep(0)
        assert capacity(channel._incoming) == 0 and capacity(channel._outgoing) == 0
        # The next bytes each way: the buffers are made again as needed.
        client.write(b"GET / HTTP/1.1\r\n\r\n")
        channel.data_received(client_out.read())
        assert await reading == b"GET / HTTP/1.1\r\n\r\n"
        channel.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        channel.close()
        for data in transport.written:
            client_in.write(data)
        assert receive(client) == (b"HTTP/1.1 204 No Content\r\n\r\n", True)

    asyncio.run(scenario())


def test_close_notify_is_written_with_one_shutdown_and_without_it_too(pki, monkeypatch):
    # close_notify_sender (one SSL_shutdown through ctypes) and SSLObject.unwrap (the
    # fallback when the SSL pointer cannot be trusted) end a response the same way.
    from test_tls_channel_writes import handshaken

    from proxy.server import tls_channel

    assert tls_channel._write_close_notify is not None

    async def closed_response() -> tuple[bytes, bool]:
        channel, transport, client, client_in = await handshaken(pki)
        channel.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        channel.close()
        assert len(transport.written) == 1 and transport.closing
        client_in.write(transport.written[0])
        return receive(client)

    assert asyncio.run(closed_response()) == (b"HTTP/1.1 204 No Content\r\n\r\n", True)
    monkeypatch.setattr(tls_channel, "_write_close_notify", None)
    assert asyncio.run(closed_response()) == (b"HTTP/1.1 204 No Content\r\n\r\n", True)


def test_without_libssl_close_notify_falls_back_to_unwrap(monkeypatch):
    def no_libssl():
        raise OSError("libssl not found")

    monkeypatch.setattr(openssl_ctl, "_libssl", None)
    monkeypatch.setattr(openssl_ctl, "_load_libssl", no_libssl)
    assert openssl_ctl.close_notify_sender() is None


class _SlowClientTransport:
    """A RecordingTransport whose client is behind: like uvloop's, its write calls
    ``pause_writing`` at once when the bytes do not all go out."""

    def __init__(self, transport, channel: TLSChannel) -> None:
        self.transport, self.channel = transport, channel

    def write(self, data) -> None:
        self.transport.written.append(bytes(data))
        self.transport.unsent += len(data)
        self.channel.pause_writing()


def _send_large(channel: TLSChannel, size: int) -> bytes:
    body = bytes(range(256)) * (size // 256)
    channel.send_now(memoryview(body))  # as Channel.forward sends a receive's worth
    return body


async def _loop_turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.mark.parametrize("client", ["keeps up", "is behind"])
def test_a_large_send_is_encrypted_at_once_and_its_grown_buffer_freed_a_moment_later(pki, monkeypatch, client):
    monkeypatch.setattr(tls_channel._GrownBuffers, "EVERY", 0.0)  # (1 s in use)

    async def scenario():
        channel, transport, tls_client, client_in = await handshaken(pki)
        if client == "is behind":
            channel.transport.write = _SlowClientTransport(transport, channel).write
        body = _send_large(channel, 128 * 1024)
        assert len(transport.written) == 1  # one SSL_write and one read of the BIO, not 8
        assert channel.writing_paused is (client == "is behind")
        grown = capacity(channel._outgoing)
        assert grown > 128 * 1024
        # More sends before the sweep: the buffer is reused, not freed and regrown per send.
        body += _send_large(channel, 64 * 1024)
        assert capacity(channel._outgoing) == grown
        await _loop_turns()
        assert capacity(channel._outgoing) == 0
        client_in.write(b"".join(transport.written))
        assert receive(tls_client) == (body, False)
        # And it grows again when needed, and is freed again.
        body = _send_large(channel, 128 * 1024)
        assert capacity(channel._outgoing) > 128 * 1024
        await _loop_turns()
        assert capacity(channel._outgoing) == 0

    asyncio.run(scenario())


def test_small_sends_never_list_the_channel_for_freeing(pki, monkeypatch):
    # Their twin: a buffer a record or two large is kept (freeing it per send would cost a
    # ctypes call and a regrowth each), and the channel is not listed.
    monkeypatch.setattr(tls_channel._GrownBuffers, "EVERY", 0.0)

    async def scenario():
        channel, transport, tls_client, client_in = await handshaken(pki)
        channel._going_idle_due = False  # (as after the first wait)
        for _ in range(3):
            channel.send_now(b"x" * 1000)
        await _loop_turns()
        assert not channel._grown and 0 < capacity(channel._outgoing) < 16 * 1024
        client_in.write(b"".join(transport.written))
        assert receive(tls_client) == (b"x" * 3000, False)

    asyncio.run(scenario())
