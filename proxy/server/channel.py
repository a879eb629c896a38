"""Channel: one connection's bytes as awaitable reads and writes, bounded both ways.

An ``asyncio.BufferedProtocol`` (so it works with plain and TLS transports alike, and with
``connect_accepted_socket``) that turns the callback API into ``await read()`` and
``await drain()`` for the relay, with explicit flow control:

* reading: the transport receives into one READ_SIZE buffer per thread (so one receive
  hands over at most READ_SIZE bytes, and an idle connection holds no buffer); received
  chunks queue up to ``read_limit`` bytes, then the transport is paused until the relay
  has consumed half of them;
* writing: the transport's high-water mark is ``write_limit``; ``drain()`` blocks while
  the transport is above it, which is what stops the relay from reading the other side.

So a proxied exchange holds, per direction, at most READ_LIMIT - 1 + READ_SIZE received
bytes on one side and WRITE_LIMIT + one write (a read's worth plus what was queued,
under SEND_NOW) on the other: 256 KiB (SPEC 4, "Memory is bounded per connection").

``forward`` (a Content-Length response body, past both engines) holds less: each receive
(up to FORWARD_READ_SIZE) goes on from the receive callback, and the destination stops it
once above WRITE_LIMIT, with reading paused here, so nothing is queued on the receiving
side: WRITE_LIMIT + FORWARD_READ_SIZE + TLS framing < 256 KiB. (Bytes past the body in
its last receive stay here, and pause reading: that receive is split, not added.)

Writes are queued here, the one write-coalescing layer (the response writer and the TLS
channel add none): small writes are sent at the end of the loop iteration, large ones
(from SEND_NOW bytes queued) at once, so backpressure sees them as before. Measured with
bench/run.py's keep-alive load (paired runs, same core): sending each connection's
bytes in a batch with the other connections' sends, instead of from inside every task
step, is 7-10 % more requests per CPU second each way (TLS to clients, plain to
upstreams) — the kernel's and the interpreter's code each stay hot in the CPU caches
— and a response followed by a close leaves in one send (TLS: with its close_notify).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import Iterable
from heapq import heapify, heappop, heappush
from typing import Protocol, Self

# The most one receive hands over; then (see the module docstring) received bytes held
# <= READ_LIMIT - 1 + READ_SIZE and unsent bytes <= WRITE_LIMIT + one write, per direction:
# 48 + 64 + 64 + (64 + 16) = 256 KiB.
READ_SIZE = 64 * 1024
READ_LIMIT = 48 * 1024
WRITE_LIMIT = 64 * 1024
# The most one receive hands over while forwarding (``Channel.forward``): nothing is held
# on the receiving side then, so the sending side's WRITE_LIMIT + one such receive (+ its
# TLS framing, 22 bytes a record) stays within the same 256 KiB; and fewer receives and
# sends per body are cheaper. 1 MiB responses, paired on one core: 64 -> 128 KiB, 0.92x ->
# 0.96x Caddy per core; 128 -> 190 KiB, +3.0 % requests per CPU second.
FORWARD_READ_SIZE = 190 * 1024
# Loops may run a timer up to their clock resolution early; that early is on time.
_TIMER_SLACK = 0.001
# Queued writes reaching this many bytes are sent at once instead of at the end of the
# loop iteration (about one TLS record: large bodies see the high-water mark at once).
SEND_NOW = 16 * 1024


# What ``Channel._chunks`` holds while nothing received is unread: an empty deque costs
# ~0.75 KiB per connection (tracemalloc), and idle connections are had by the ten thousand.
_NO_CHUNKS: tuple = ()


class ConnectionLost(ConnectionError):
    """The peer went away (or we aborted) while we still wanted to write."""


class Watcher(Protocol):
    """What ``Channel.watch`` calls (each at most once per watch)."""

    def received(self, channel: Channel, data: bytes) -> None: ...

    def ended(self, channel: Channel) -> None: ...

    def timed_out(self, channel: Channel) -> None: ...


_receive_buffers = threading.local()


def _receive_buffer() -> memoryview:
    """This thread's receive buffer: a loop fills it and hands it on synchronously
    (``get_buffer``, recv, ``buffer_updated``), so its connections can share one. One
    per thread, not per process: a loop releases the GIL around its receives."""
    view = getattr(_receive_buffers, "view", None)
    if view is None:
        _receive_buffers.forward_view = memoryview(bytearray(FORWARD_READ_SIZE))
        view = _receive_buffers.view = _receive_buffers.forward_view[:READ_SIZE]
    return view


def _forward_buffer() -> memoryview:
    """The same buffer, whole: the receives of a ``forward`` (FORWARD_READ_SIZE)."""
    _receive_buffer()
    return _receive_buffers.forward_view


class Channel(asyncio.BufferedProtocol):
    """Bounded, awaitable byte stream over one transport."""

    # One per connection, idle ones by the ten thousand: no instance dict (about 1.3 KiB
    # each with one; tracemalloc on 2,000 idle TLS connections).
    __slots__ = (
        "transport", "loop", "_read_limit", "_write_limit", "_chunks", "_buffered", "_reading_paused", "_eof",
        "closed", "_read_waiter", "_read_deadline", "_read_timer", "_drain_waiter", "writing_paused",
        "_closed_waiter", "write_shut", "_unsent", "_unsent_bytes", "_send_scheduled", "_receive_view", "lost_error",
        "_forward", "_going_idle_due", "_watcher", "_sends_due",
    )

    def __init__(self, read_limit: int = READ_LIMIT, write_limit: int = WRITE_LIMIT) -> None:
        self._going_idle_due = False  # call _going_idle before the next read waits
        self.transport: asyncio.Transport | None = None
        # The loop, kept: on Python 3.11 every asyncio.get_running_loop() is a getpid()
        # syscall (its fork check), and the request path would make several per request.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._read_limit = read_limit
        self._write_limit = write_limit
        self._chunks: deque[bytes] | tuple = _NO_CHUNKS  # a deque from the first chunk received
        self._buffered = 0
        self._reading_paused = False
        self._eof = False
        self.closed = False
        self._read_waiter: asyncio.Future | None = None
        # The channel's read deadline, kept lazily (see ``read``); ``_read_timer`` is its
        # entry in the loop's _ReadDeadlines (None: none).
        self._read_deadline = 0.0
        self._read_timer: list | None = None
        self._drain_waiter: asyncio.Future | None = None
        self.writing_paused = False  # the transport is above its high-water mark: drain()
        self._closed_waiter: asyncio.Future | None = None
        self.write_shut = False  # shutdown_write() ended our direction
        self._unsent: list[bytes] = []  # queued writes (see the module docstring)
        self._unsent_bytes = 0
        self._send_scheduled = False
        self._receive_view: memoryview | None = None
        self.lost_error: Exception | None = None  # why the transport ended (a TLS alert...)
        self._forward: _Forward | None = None  # received bytes go straight on (``forward``)
        self._watcher: Watcher | None = None  # received bytes go to its callbacks (``watch``)

    # -- protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self._sends_due = _SendsDue.of(self.loop)
        self._receive_view = _receive_buffer()
        transport.set_write_buffer_limits(high=self._write_limit)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        forward = self._forward
        return self._receive_view if forward is None else forward.buffer

    def buffer_updated(self, nbytes: int) -> None:
        # data_received's watcher step, inlined: this runs once per receive on every
        # upstream connection.
        forward = self._forward
        if forward is not None:
            start = self._forward_received(nbytes)
            if start == nbytes:
                return
            # Bytes past the body (junk: the upstream connection will not be pooled):
            # no more until they are read, or this receive and the READ_LIMIT of the
            # usual path could together pass the 256 KiB.
            chunk = forward.buffer[start:nbytes].tobytes()
            if not self._reading_paused and not self.closed:
                self._reading_paused = True
                self.transport.pause_reading()
        else:
            chunk = self._receive_view[:nbytes].tobytes()
            watcher = self._watcher
            if watcher is not None:  # (nothing is buffered while watched)
                self._watcher = None  # (unwatch, inlined: once per request each way)
                self._read_deadline = 0.0
                watcher.received(self, chunk)
                return
        self._keep(chunk)

    def data_received(self, data: bytes) -> None:
        watcher = self._watcher
        if watcher is not None:  # (nothing is buffered while watched)
            self._watcher = None  # (unwatch, inlined: once per request each way)
            self._read_deadline = 0.0
            watcher.received(self, data)
            return
        self._keep(data)

    def _keep(self, data: bytes) -> None:
        """Queue received bytes for the next read (reading pauses at ``read_limit``) and
        wake that read."""
        if self._chunks:
            self._chunks.append(data)
        else:
            self._chunks = deque((data,))
        self._buffered += len(data)
        if self._buffered >= self._read_limit and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        # Plain TCP: keep our side open, a half-closed client still gets its response.
        # (TLS transports close on EOF whatever this returns, and warn if it is True.)
        return self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_error = exc
        self._eof = True
        self.closed = True
        self._drop_queued()
        if self._read_timer is not None:
            _ReadDeadlines.drop(self._read_timer)  # it holds the channel alive until it fires
            self._read_timer = None
        self._wake_reader()
        self._wake_drainer()
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_drainer()

    # -- for the relay -----------------------------------------------------------------

    @property
    def unread(self) -> bool:
        """Received bytes wait to be read."""
        return bool(self._chunks)

    @property
    def quiet(self) -> bool:
        """Open both ways and nothing received unread (an idle pooled connection)."""
        return not (self.closed or self._eof or self._chunks or self.transport.is_closing())

    async def read(self, timeout: float = 0) -> bytes:
        """The next received chunk; ``b""`` once the peer has closed.

        ``timeout`` (0 = none) bounds the wait; TimeoutError when it passes. Reading
        buffered data costs nothing. Waiting sets a deadline; the channel's one entry in
        the loop's read deadlines (_ReadDeadlines) is not removed when data arrives but,
        when it is due, times out a read still waiting past its deadline or re-arms for
        the current one — so a keep-alive connection does not create and cancel a timer
        per read, and an idle one holds a small heap entry, not a loop timer."""
        while not self._chunks:
            if self._eof:
                return b""
            self._before_waiting()
            waiter = self._read_waiter = self.loop.create_future()
            if timeout:
                self._set_read_deadline(timeout)
            try:
                await waiter
            finally:
                self._read_waiter = None
                self._read_deadline = 0.0
        chunks = self._chunks
        chunk = chunks.popleft()
        if not chunks:
            self._chunks = _NO_CHUNKS  # (an idle connection holds no deque)
        self._buffered -= len(chunk)
        if self._reading_paused and self._buffered <= self._read_limit // 2 and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    def watch(self, watcher: Watcher, timeout: float = 0) -> bool:
        """A read by callbacks instead of a coroutine: the next received chunk goes to
        ``watcher.received(channel, chunk)`` from the receive callback, EOF or the
        connection's end to ``watcher.ended(channel)``, and ``timeout`` seconds (0 =
        none) without a byte to ``watcher.timed_out(channel)`` -- once, as ``read``
        returns once (the watcher watches again for more). False, watching nothing, when
        ``read`` would not wait: received bytes are unread, or the peer has closed.

        Why: a request or a response that arrives whole is then handled where it
        arrives, without a future and a task step to resume the coroutine that waited
        for it (``proxy.server.connection``)."""
        if self._chunks or self._eof:
            return False
        self._before_waiting()
        self._watcher = watcher
        if timeout:
            self._set_read_deadline(timeout)
        return True

    def _before_waiting(self) -> None:
        """What a read or a watch does before it waits for bytes."""
        if self._reading_paused and not self.closed:  # (left paused by forward)
            self._reading_paused = False
            self.transport.resume_reading()
        if self._going_idle_due:  # (once: a subclass frees what an idle connection need not hold)
            self._going_idle_due = False
            self._going_idle()

    def unwatch(self) -> None:
        """Stop a ``watch`` (its watcher is not called)."""
        self._watcher = None
        self._read_deadline = 0.0

    async def forward(self, to: Channel, count: int, timeout: float = 0) -> tuple[int, Exception | None]:
        """Send the next ``count`` bytes received here on through ``to`` as they arrive,
        straight from the receive buffer (bytes past them are read as usual); the number
        sent, and what stopped it early if anything did. It also returns early, with no
        failure, when ``to`` is above its high-water mark (reading here stays paused
        until the next ``read`` or ``forward``: the caller drains ``to`` first), or at
        EOF. Nothing may be buffered unread here. (A plain Channel's receives: a
        TLSChannel decrypts its own.)

        Why: a large body relayed as it is (Content-Length) needs no parsing, and this
        way a receive costs one call instead of a bytes copy, a task wake-up and the
        engines' events per chunk (bench/run.py's 1 MiB test: see ``_Forward``).
        The failures: TimeoutError when nothing arrived for ``timeout`` seconds (0 =
        no limit), ConnectionLost when ``to`` is gone; the count is what went out
        before (for the access log)."""
        if self._chunks:
            raise RuntimeError("forward() with received bytes unread")
        if self._eof or count <= 0 or to.writing_paused:
            return 0, None
        loop = self.loop
        forward = self._forward = _Forward(self, to, count, loop.create_future(), timeout)
        self._read_waiter = forward.waiter  # EOF, connection_lost and abort() wake it
        if timeout:
            forward.timer = loop.call_at(forward.last + timeout, forward.timer_fired)
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        try:
            await forward.waiter
        finally:
            self._forward = None
            self._read_waiter = None
            if forward.timer is not None:
                forward.timer.cancel()
        return count - forward.left, forward.error

    def _forward_received(self, nbytes: int) -> int:
        """A receive while forwarding: send what ``forward`` still wants of it on at once
        (the receive buffer is reused by the next receive); how many bytes it took."""
        forward = self._forward
        left = forward.left
        take = nbytes if nbytes <= left else left
        to = forward.to
        try:
            to.send_now(forward.buffer[:take])
            left = forward.left = left - take
        except ConnectionError as exc:
            forward.error = exc  # (the caller raises it)
            take = nbytes  # for nobody: the client is gone
        if forward.timeout:
            forward.last = self.loop.time()
        if not left or to.writing_paused or forward.error is not None:
            self._forward = None
            if left and not self.closed:  # (to is full: pause here, as a queue over READ_LIMIT would)
                self._reading_paused = True
                self.transport.pause_reading()
            if not forward.waiter.done():
                forward.waiter.set_result(None)
        return take

    def send_now(self, data: bytes | memoryview) -> None:
        """Send ``data`` after what is queued, now: it may be a view of a buffer that is
        reused as soon as this returns (``forward``)."""
        self.write(bytes(data))
        self._send_queued()

    def write(self, data: bytes) -> None:
        if self.closed or self.write_shut or self.transport.is_closing():
            raise ConnectionLost("connection closed")
        if data:
            self._unsent.append(data)
            self._unsent_bytes += len(data)
            self._send_soon()

    def writelines(self, pieces: Iterable[bytes]) -> None:
        if self.closed or self.write_shut or self.transport.is_closing():
            raise ConnectionLost("connection closed")
        unsent = self._unsent
        for piece in pieces:
            if piece:
                unsent.append(piece)
                self._unsent_bytes += len(piece)
        self._send_soon()

    # The write queue (plaintext on a TLSChannel too: it encrypts when it sends).

    def _send_queued(self) -> None:
        """Hand everything queued to the transport now."""
        unsent = self._unsent
        if not unsent:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if len(unsent) == 1:
                transport.write(unsent[0])
            else:
                transport.writelines(unsent)  # no joined copy of large pieces
        self._drop_queued()

    def _drop_queued(self) -> None:
        self._unsent = []
        self._unsent_bytes = 0

    def _send_soon(self) -> None:
        if self._unsent_bytes >= SEND_NOW:
            self._send_queued()
        elif not self._send_scheduled:
            self._send_scheduled = True
            self._sends_due.add(self)

    def _going_idle(self) -> None:
        """A read is about to wait, the first time since ``_going_idle_due`` was set: a
        subclass frees what an idle connection need not hold (TLSChannel)."""

    def _scheduled_send(self) -> None:
        self._send_scheduled = False
        self._send_queued()

    async def drain(self, timeout: float = 0) -> None:
        """Wait while the transport's write buffer is above the high-water mark;
        ``timeout`` (0 = none) bounds the wait for a peer that stopped reading."""
        if self.writing_paused and not self.closed:
            async with asyncio.timeout(timeout or None):
                while self.writing_paused and not self.closed:
                    self._drain_waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._drain_waiter
                    finally:
                        self._drain_waiter = None
        if self.closed:
            raise ConnectionLost("connection closed")

    def shutdown_write(self) -> None:
        """End our direction after what is queued (a FIN), keeping the other one open: a
        tunnel passing on its peer's half-close. Later writes raise ``ConnectionLost``."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing() or self.write_shut:
            return
        self._send_queued()
        self.write_shut = True
        if transport.can_write_eof():
            transport.write_eof()

    def close(self) -> None:
        """Close after what is queued and the transport's write buffer are sent."""
        if self.transport is not None and not self.transport.is_closing():
            self._send_queued()
            self.transport.close()

    async def close_and_wait(self, timeout: float) -> None:
        """Close (TLS: send close_notify) and wait up to ``timeout`` for the transport
        to be gone, then abort: a peer that never answers the TLS shutdown must not
        keep the connection (or the proxy's shutdown) waiting."""
        self.close()
        if self.closed:
            return
        # A plain timer rather than ``asyncio.timeout``: one per connection, it is cheaper.
        loop = self.loop or asyncio.get_running_loop()
        waiter = self._closed_waiter = loop.create_future()
        timer = loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        except TimeoutError:
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            self._closed_waiter = None
            timer.cancel()

    def abort(self) -> None:
        """Drop the connection now; pending reads see EOF and writes fail at once."""
        self._eof = True
        self.closed = True
        self._drop_queued()
        if self.transport is not None:
            self.transport.abort()
        self._wake_reader()
        self._wake_drainer()

    def _set_read_deadline(self, timeout: float) -> None:
        """The waiting read's (or watch's) deadline, ``timeout`` from now."""
        loop = self.loop
        deadline = self._read_deadline = loop.time() + timeout
        entry = self._read_timer
        if entry is None or entry[0] > deadline:
            if entry is not None:
                _ReadDeadlines.drop(entry)
            self._read_timer = _ReadDeadlines.of(loop).add(deadline, self)

    def _read_timer_fired(self) -> None:
        self._read_timer = None
        deadline = self._read_deadline
        waiter = self._read_waiter
        watcher = self._watcher
        if not deadline or (waiter is None or waiter.done()) and watcher is None:
            return  # nobody is waiting with a deadline: the next wait arms a timer
        loop = self.loop
        if loop.time() < deadline - _TIMER_SLACK:
            self._read_timer = _ReadDeadlines.of(loop).add(deadline, self)
        elif watcher is not None:
            self.unwatch()
            watcher.timed_out(self)
        else:
            waiter.set_exception(TimeoutError())

    def _wake_reader(self) -> None:
        watcher = self._watcher
        if watcher is not None:
            self.unwatch()
            watcher.ended(self)
            return
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drainer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Forward:
    """One ``Channel.forward`` in progress: where to, how much is left, its waiter and
    read timer (one per call, not per receive: ``last`` moves at each receive).

    Measured (bench/run.py, 1 MiB responses, TLS 1.3 to the client, nginx upstream):
    relaying the body as engine events cost a 64 KiB copy, a future, a task step and
    about thirty Python calls per receive; forwarding it from the receive callback took
    MiB per server CPU second from 566 to 742 (medians of 5; Caddy 810-839, nginx 928-961
    in the same runs)."""

    __slots__ = ("channel", "to", "left", "waiter", "timeout", "timer", "last", "error", "buffer")

    def __init__(self, channel: Channel, to: Channel, count: int, waiter: asyncio.Future, timeout: float) -> None:
        self.channel = channel
        self.to = to
        self.left = count
        self.waiter = waiter
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.last = channel.loop.time()  # of the last receive (or the start)
        self.error: Exception | None = None
        self.buffer = _forward_buffer()  # (get_buffer hands it to the transport)

    def timer_fired(self) -> None:
        self.timer = None
        if self.waiter.done():
            return
        loop = self.channel.loop
        deadline = self.last + self.timeout
        if loop.time() >= deadline - _TIMER_SLACK:
            self.error = TimeoutError(f"nothing received for {self.timeout:g}s")
            self.channel._forward = None  # (what arrives now is read as usual)
            self.waiter.set_result(None)
        else:
            self.timer = loop.call_at(deadline, self.timer_fired)


class PerLoop:
    """A helper of which each event loop has one (``of``): what a loop's channels share."""

    __slots__ = ()
    _by_loop: dict  # (each subclass has its own; made with ``cls(loop)``)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Self:
        found = cls._by_loop.get(loop)
        if found is None:
            for closed in [other for other in list(cls._by_loop) if other.is_closed()]:
                del cls._by_loop[closed]  # (a process that ran several loops: tests)
            found = cls._by_loop[loop] = cls(loop)
        return found


class _SendsDue(PerLoop):
    """The channels whose writes wait for the end of this loop iteration, sent there
    together by one loop callback rather than one each (a callback is a uvloop Handle and
    a bound method to make, and a call to dispatch, per send: two per proxied request)."""

    __slots__ = ("_loop", "_channels")
    _by_loop: dict[asyncio.AbstractEventLoop, _SendsDue] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._channels: list[Channel] = []

    def add(self, channel: Channel) -> None:
        channels = self._channels
        if not channels:
            self._loop.call_soon(self._send)
        channels.append(channel)

    def _send(self) -> None:
        channels, self._channels = self._channels, []
        for channel in channels:
            try:
                channel._scheduled_send()
            except Exception as exc:  # (one channel's failure is not the others')
                self._loop.call_exception_handler({"message": "sending a channel's queued writes", "exception": exc})


class _ReadDeadlines(PerLoop):
    """Every channel's read deadline on one loop, behind one loop timer.

    A waiting read needs its deadline kept, and idle connections wait by the ten
    thousand: a loop timer each (uvloop: a TimerHandle, a libuv timer, a bound method)
    is ~0.55 KiB a connection (tracemalloc), an entry here ~0.14 KiB. Entries are
    ``[when, order, channel, deadlines]`` in a heap; the loop timer is armed for the earliest, and
    due entries call their channel's ``_read_timer_fired`` in deadline order (ties: in
    the order they were added), as loop timers would. An entry is dropped by clearing
    its channel (a closed channel is not kept until its deadline); cleared entries are
    skipped when due, and swept when they are most of the heap."""

    __slots__ = ("_loop", "_heap", "_order", "_timer", "_timer_when", "_cleared")
    _by_loop: dict[asyncio.AbstractEventLoop, _ReadDeadlines] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[list] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._cleared = 0

    def add(self, when: float, channel: Channel) -> list:
        entry = [when, next(self._order), channel, self]
        heappush(self._heap, entry)
        if self._timer is None or when < self._timer_when:
            self._arm(when)
        return entry

    @staticmethod
    def drop(entry: list) -> None:
        """The entry's channel no longer waits for it (it may be due later: skipped)."""
        if entry[2] is not None:
            entry[2] = None
            deadlines = entry[3]
            deadlines._cleared += 1
            heap = deadlines._heap
            if deadlines._cleared > 64 and deadlines._cleared * 2 > len(heap):
                heap[:] = [live for live in heap if live[2] is not None]
                heapify(heap)
                deadlines._cleared = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._due)
        self._timer_when = when

    def _due(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._loop.time() + _TIMER_SLACK
        while heap and heap[0][0] <= now:
            entry = heappop(heap)
            channel = entry[2]
            if channel is None:
                self._cleared -= 1
                continue
            entry[2] = None
            channel._read_timer = None
            channel._read_timer_fired()  # (may add an entry, arming the timer for it)
        if heap and (self._timer is None or heap[0][0] < self._timer_when):
            self._arm(heap[0][0])


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
