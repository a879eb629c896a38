"""Channel flow control with a recording transport (no sockets): reading pauses at the
limit and resumes at half of it; drain() blocks while the transport is above its
high-water mark; close/abort wake every waiter; small writes are queued until the end
of the loop iteration, large ones go out at once."""

from __future__ import annotations

import asyncio
import collections

import pytest

from proxy.server.channel import SEND_NOW, Channel, ConnectionLost

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.written: list[bytes] = []
        self.closing = False
        self.protocol: Channel | None = None

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.calls.append(f"limits {high}")

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def writelines(self, pieces) -> None:
        for piece in pieces:
            self.write(piece)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return default

    def close(self) -> None:
        self.closing = True
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.closing = True


def make_channel(read_limit: int = 100) -> tuple[Channel, RecordingTransport]:
    channel = Channel(read_limit=read_limit, write_limit=1000)
    transport = RecordingTransport()
    transport.protocol = channel
    channel.connection_made(transport)
    return channel, transport


def test_reading_pauses_at_the_limit_and_resumes_at_half():
    async def scenario():
        channel, transport = make_channel(read_limit=100)
        assert transport.calls == ["limits 1000"]
        for _ in range(4):
            channel.data_received(b"x" * 30)
        assert transport.calls[-1] == "pause"  # 120 buffered >= 100
        assert await channel.read() == b"x" * 30  # 90 left: still above half
        assert transport.calls[-1] == "pause"
        await channel.read()  # 60 left
        await channel.read()  # 30 left: below half
        assert transport.calls[-1] == "resume"
        assert transport.calls.count("pause") == 1 and transport.calls.count("resume") == 1

    asyncio.run(scenario())


def test_read_waits_for_data_and_sees_eof():
    async def scenario():
        channel, _ = make_channel()
        pending = asyncio.ensure_future(channel.read())
        await asyncio.sleep(0)
        assert not pending.done()
        channel.data_received(b"hello")
        assert await pending == b"hello"
        channel.eof_received()
        assert await channel.read() == b"" and await channel.read() == b""

    asyncio.run(scenario())


def test_chunks_keep_their_order_and_an_idle_channel_holds_no_queue():
    # Idle connections come by the ten thousand: once everything received has been read,
    # the channel drops its receive queue (an empty deque is ~0.75 KiB) and makes a new
    # one for the next chunk, in order, through both ways in (data_received, buffer_updated).
    async def scenario():
        channel, _ = make_channel(read_limit=1000)
        channel.data_received(b"one")
        view = channel.get_buffer(-1)
        view[:3] = b"two"
        channel.buffer_updated(3)
        channel.data_received(b"three")
        assert [await channel.read() for _ in range(3)] == [b"one", b"two", b"three"]
        assert not channel._chunks and not isinstance(channel._chunks, collections.deque)
        assert channel.quiet
        channel.data_received(b"four")
        assert not channel.quiet
        assert await channel.read() == b"four"
        assert not isinstance(channel._chunks, collections.deque)

    asyncio.run(scenario())


def test_read_deadlines_time_out_in_order_and_spare_channels_that_received():
    # One loop timer serves every channel's read deadline: each waiting read still times
    # out at its own deadline (earliest first), a read that got its data does not, and a
    # deadline pushed later by a new read is kept.
    async def scenario():
        channels = [make_channel()[0] for _ in range(4)]
        timed_out: list[int] = []
        received: list[bytes] = []

        async def wait(index: int, timeout: float) -> None:
            try:
                received.append(await channels[index].read(timeout))
            except TimeoutError:
                timed_out.append(index)

        reads = [asyncio.ensure_future(wait(index, timeout))
                 for index, timeout in enumerate((0.09, 0.03, 0.06, 0.03))]
        await asyncio.sleep(0)
        channels[3].data_received(b"in time")
        await asyncio.gather(*reads)
        assert timed_out == [1, 2, 0] and received == [b"in time"]
        # A second wait on a channel whose first deadline was met: its own deadline counts.
        with pytest.raises(TimeoutError):
            await channels[3].read(0.02)

    asyncio.run(scenario())


def test_a_closed_channel_is_not_held_until_its_read_deadline():
    import gc
    import weakref

    class Tracked(Channel):
        __slots__ = ("__weakref__",)  # (Channel has none: one per connection)

    async def scenario():
        channel = Tracked(read_limit=100, write_limit=1000)
        transport = RecordingTransport()
        transport.protocol = channel
        channel.connection_made(transport)
        pending = asyncio.ensure_future(channel.read(3600))
        await asyncio.sleep(0)
        channel.connection_lost(None)
        assert await pending == b""
        gone = weakref.ref(channel)
        del channel, pending, transport
        gc.collect()
        assert gone() is None

    asyncio.run(scenario())


def test_drain_blocks_above_the_high_water_mark_until_resumed():
    async def scenario():
        channel, transport = make_channel()
        channel.write(b"abc")
        await channel.drain()  # not paused: returns at once
        channel.pause_writing()
        drained = asyncio.ensure_future(channel.drain())
        await asyncio.sleep(0)
        assert not drained.done()
        channel.resume_writing()
        await drained
        assert transport.written == [b"abc"]

    asyncio.run(scenario())


def test_drain_times_out_for_a_peer_that_stopped_reading():
    async def scenario():
        channel, _ = make_channel()
        channel.pause_writing()
        with pytest.raises(TimeoutError):
            await channel.drain(timeout=0.01)

    asyncio.run(scenario())


def test_abort_wakes_readers_and_writers_and_refuses_writes():
    async def scenario():
        channel, _ = make_channel()
        channel.pause_writing()
        reader = asyncio.ensure_future(channel.read())
        writer = asyncio.ensure_future(channel.drain())
        await asyncio.sleep(0)
        channel.abort()
        assert await reader == b""
        with pytest.raises(ConnectionLost):
            await writer
        with pytest.raises(ConnectionLost):
            channel.write(b"late")

    asyncio.run(scenario())


def test_close_and_wait_returns_when_the_transport_is_gone():
    async def scenario():
        channel, transport = make_channel()
        await channel.close_and_wait(timeout=5)
        assert transport.closing and channel.closed

    asyncio.run(scenario())


def test_small_writes_leave_together_at_the_end_of_the_loop_iteration():
    async def scenario():
        channel, transport = make_channel()
        channel.write(b"GET / HTTP/1.1\r\n")
        channel.writelines([b"host: x\r\n", b"", b"\r\n"])
        assert transport.written == []  # queued: other connections' sends go out with it
        await asyncio.sleep(0)
        assert transport.written == [b"GET / HTTP/1.1\r\n", b"host: x\r\n", b"\r\n"]  # one writelines
        await asyncio.sleep(0)
        assert len(transport.written) == 3  # nothing sent twice

    asyncio.run(scenario())


def test_large_writes_go_out_at_once_after_what_was_queued():
    async def scenario():
        channel, transport = make_channel()
        channel.write(b"head")
        body = b"x" * SEND_NOW
        channel.writelines([body])  # the transport (and its high-water mark) sees it now
        assert transport.written == [b"head", body]
        await asyncio.sleep(0)
        assert transport.written == [b"head", body]

    asyncio.run(scenario())


def test_close_sends_the_queue_first_and_abort_drops_it():
    async def scenario():
        channel, transport = make_channel()
        channel.write(b"last response")
        channel.close()
        assert transport.written == [b"last response"] and transport.closing
        other, other_transport = make_channel()
        other.write(b"never sent")
        other.abort()
        await asyncio.sleep(0)
        assert other_transport.written == []

    asyncio.run(scenario())
