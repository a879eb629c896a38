"""TLSChannel's sends, with a recording transport and an in-memory TLS client (no
sockets): a response followed by close leaves in one send with the close_notify;
large writes still go out at once (the transport's high-water mark sees them); closing
waits for the transport only while it still holds unsent bytes."""

from __future__ import annotations

import asyncio
import ssl

from proxy.server.tls_channel import TLSChannel


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False
        self.unsent = 0  # what get_write_buffer_size() reports

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def receive(client: ssl.SSLObject) -> tuple[bytes, bool]:
    """Everything the client can decrypt, and whether it ended with close_notify."""
    data = b""
    while True:
        try:
            piece = client.read(64 * 1024)
        except ssl.SSLWantReadError:
            return data, False
        except ssl.SSLZeroReturnError:
            return data, True
        if not piece:  # close_notify, as the ssl module reports it by default
            return data, True
        data += piece


async def handshaken(
    pki, *, outgoing: list | None = None
) -> tuple[TLSChannel, RecordingTransport, ssl.SSLObject, ssl.MemoryBIO]:
    """A server TLSChannel past its handshake with an in-memory client, nothing sent yet
    (``outgoing``: a list that gets the client's outgoing BIO, for a test to send with)."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*pki.server)
    server_context.num_tickets = 0
    channel = TLSChannel(server_context)
    transport = RecordingTransport()
    channel.connection_made(transport)
    client_context = ssl.create_default_context(cafile=str(pki.ca_pem))
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_hostname="localhost")
    handshake = asyncio.ensure_future(channel.handshake(5))
    while not handshake.done():
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        channel.data_received(client_out.read())
        for data in transport.written:
            client_in.write(data)
        transport.written.clear()
        await asyncio.sleep(0)
    await handshake
    client.do_handshake()
    if outgoing is not None:
        outgoing.append(client_out)
    return channel, transport, client, client_in


def test_a_response_and_the_close_notify_leave_in_one_send(pki) -> None:
    async def scenario() -> None:
        channel, transport, client, client_in = await handshaken(pki)
        channel.write(b"HTTP/1.1 200 OK\r\n")
        channel.writelines([b"Connection: close\r\n", b"\r\n"])
        assert transport.written == []  # held until the end of this loop iteration
        channel.close()
        assert len(transport.written) == 1 and transport.closing
        client_in.write(transport.written[0])
        assert receive(client) == (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", True)
        await asyncio.sleep(0)  # the scheduled send finds nothing left
        assert len(transport.written) == 1

    asyncio.run(scenario())


def test_a_response_on_a_kept_connection_is_sent_within_the_iteration(pki) -> None:
    async def scenario() -> None:
        channel, transport, client, client_in = await handshaken(pki)
        channel.write(b"first")
        channel.write(b"second")
        await asyncio.sleep(0)
        assert len(transport.written) == 1
        client_in.write(transport.written[0])
        assert receive(client) == (b"firstsecond", False)

    asyncio.run(scenario())


def test_large_writes_are_sent_at_once(pki) -> None:
    async def scenario() -> None:
        channel, transport, client, client_in = await handshaken(pki)
        body = b"x" * (64 * 1024)
        channel.write(body)
        assert sum(map(len, transport.written)) > len(body)
        for data in transport.written:
            client_in.write(data)
        assert receive(client) == (body, False)

    asyncio.run(scenario())


def test_close_and_wait_returns_at_once_when_everything_was_sent(pki) -> None:
    async def scenario() -> None:
        channel, transport, client, client_in = await handshaken(pki)
        channel.write(b"bye")
        started = asyncio.get_running_loop().time()
        await channel.close_and_wait(5)  # the recording transport never reports connection_lost
        assert asyncio.get_running_loop().time() - started < 0.5
        assert transport.closing and len(transport.written) == 1

    asyncio.run(scenario())


def test_close_and_wait_waits_for_unsent_bytes_then_aborts(pki) -> None:
    async def scenario() -> None:
        channel, transport, client, client_in = await handshaken(pki)
        transport.unsent = 100  # a peer that stopped reading
        closing = asyncio.ensure_future(channel.close_and_wait(0.05))
        await asyncio.sleep(0)
        assert not closing.done()
        await asyncio.wait_for(closing, 1)
        assert channel.closed  # aborted after the timeout

    asyncio.run(scenario())
