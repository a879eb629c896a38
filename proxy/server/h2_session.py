"""H2Session: one HTTP/2 client connection — frames in, one task per stream, frames out.

The TLS handshake chose ``h2`` by ALPN (``tls_accept``). The session reads the
connection, feeds the codec (``proxy.http.h2.codec``) and acts on its events: a new
stream's header block becomes a ``RequestHead`` (``proxy.http.h2.messages``; refused on
its stream with 400/431 when HTTP/2 forbids it) and a task running
``request.handle_request`` with a ``StreamDownstream`` as its client, so every rule of
the HTTP/1.1 path applies per stream. Body DATA goes to its stream; window updates
release queued response DATA; a reset cancels the stream's task (and so its upstream
exchange).

Bounds: ``limits.max_concurrent_streams`` (SETTINGS; more are refused: REFUSED_STREAM),
header blocks (CONTINUATION included) by h2's frame buffer and the HPACK decoder's limit, then
``max_header_bytes`` per request (431); per-stream receive windows of STREAM_WINDOW and
a connection window of CONNECTION_WINDOW, reopened only as the upstream takes the data;
response data per stream by ``h2_stream.STREAM_BUFFER``. The connection is not read
while its writes are above the channel's high-water mark, so a client that floods
PINGs or SETTINGS without reading their acknowledgements stops being read. Streams
reset before their response completed and control frames draw on ``Budget``s; past
either, GOAWAY ENHANCE_YOUR_CALM (CVE-2023-44487, "rapid reset").

Draining (SIGTERM): GOAWAY naming the last stream received; those streams finish,
newer ones are refused (REFUSED_STREAM: the client may retry them elsewhere), and the
connection closes when the last one is done.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.errors import ConnectionFailed, HTTPError
from proxy.http.h2 import grpc
from proxy.http.h2.budget import Budget
from proxy.http.h2.codec import (
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    REFUSED_STREAM,
    PeerClosing,
    ServerCodec,
    StreamData,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowOpened,
)
from proxy.http.h2.messages import request_head
from proxy.server.channel import Channel, ConnectionLost
from proxy.server.connection import CLOSE_WAIT
from proxy.server.downstream import ClientInfo
from proxy.server.h2_stream import STREAM_BUFFER, StreamDownstream
from proxy.server.request import handle_request, refuse_request
from proxy.server.state import ServerState

log = logging.getLogger("tlsproxy")

STREAM_WINDOW = 256 * 1024  # request body a client may send on a stream before it is taken
CONNECTION_WINDOW = 1024 * 1024  # ... and on all its streams together
# A decoded header block larger than this ends the connection (COMPRESSION / CALM);
# one up to it but over max_header_bytes gets 431 on its stream.
HEADER_LIST_SLACK = 2
# Streams the client resets before their response is complete: a burst (a page
# navigation cancelling its loads), then a steady rate.
RESET_BURST = 200
MAX_RESET_BURST_STREAMS = 1000  # (a limit of 0, "unlimited", must not make the burst endless)
UNLIMITED_STREAMS = 2**31 - 1
RESETS_PER_SECOND = 100
# PING / SETTINGS / PRIORITY / empty DATA frames: as many, and no more.
CONTROL_BURST = 1000
CONTROL_PER_SECOND = 100


class H2Session:
    """One client connection speaking HTTP/2."""

    __slots__ = (
        "channel", "info", "state", "loop", "codec", "streams", "draining", "write_timeout",
        "_blocked", "_resets", "_control", "_control_seen", "_writer", "_writable_waiters", "_max_header_bytes",
        "_dirty", "_send_scheduled",
        "_max_streams",
    )

    def __init__(self, channel: Channel, info: ClientInfo, state: ServerState) -> None:
        config = state.generation.config
        limits = config.limits
        self.channel = channel
        self.info = info
        self.state = state
        self.loop = channel.loop
        self._max_header_bytes = limits.max_header_bytes
        # 0 = unlimited (SPEC 3): as many as SETTINGS can say; the reset budget stays finite.
        self._max_streams = limits.max_concurrent_streams or UNLIMITED_STREAMS
        self.codec = ServerCodec(
            max_concurrent_streams=self._max_streams,
            header_list_limit=max(limits.max_header_bytes, 16 * 1024) * HEADER_LIST_SLACK,
            stream_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
        )
        self.write_timeout = config.timeouts.idle
        self.streams: dict[int, StreamDownstream] = {}  # open, or still sending their response
        self.draining = False  # GOAWAY sent or received: no new streams
        self._blocked: dict[int, StreamDownstream] = {}  # response data waiting for a window
        self._dirty: dict[int, StreamDownstream] = {}  # written to since the last send pass
        self._send_scheduled = False
        self._resets = Budget(RESET_BURST + 2 * min(self._max_streams, MAX_RESET_BURST_STREAMS), RESETS_PER_SECOND)
        self._control = Budget(CONTROL_BURST, CONTROL_PER_SECOND)
        self._control_seen = 0
        self._writer: asyncio.Task | None = None  # waits while the channel is above its high-water mark
        self._writable_waiters: list[asyncio.Future] = []

    # -- the read loop ---------------------------------------------------------------

    async def run(self, received: bytes = b"") -> None:
        """Serve the connection; ``received``: bytes already read from it (h2c's preface)."""
        state = self.state
        channel = self.channel
        with state.track(self, on_shutdown=self.shutdown) as tracked:
            try:
                self.flush()  # our SETTINGS and the connection window
                first = True
                while True:
                    timeouts = state.generation.config.timeouts
                    tracked.idle = not self.streams
                    try:
                        data, received = received or await channel.read(
                            timeouts.request_header if first else timeouts.idle
                        ), b""
                    except TimeoutError:
                        if self.streams:
                            continue  # busy streams keep their own deadlines
                        self.codec.goaway(self.codec.highest_stream_id)
                        self.flush()
                        return
                    if not data:
                        return
                    first = False
                    try:
                        events = self.codec.feed(data)
                        for event in events:
                            self._dispatch(event)
                        self._check_control_frames()
                    except ConnectionFailed as exc:
                        log.info("HTTP/2 connection from %s ended: %s", self.info.address, exc)
                        state.metrics.h2_connection_errors.labels(exc.kind).inc()
                        self.flush()
                        return
                    self.flush()
                    if channel.writing_paused:  # the client reads nothing: read nothing from it
                        await self._writable()
                    if self.draining and not self.streams:
                        return
            except (ConnectionError, TimeoutError):
                pass
            except Exception:  # a bug: log it, never take the process down
                log.exception("internal error on the HTTP/2 connection from %s", self.info.address)
            finally:
                try:
                    await self._end_streams()
                finally:
                    await channel.close_and_wait(CLOSE_WAIT)

    def _dispatch(self, event: object) -> None:
        kind = type(event)
        if kind is StreamData:
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.request_ended:
                stream.received(event.data, event.flow_length)
            else:  # its request was answered already: discard, but give the window back
                self.codec.ack(event.stream_id, event.flow_length)
        elif kind is StreamOpened:
            self._open(event)
        elif kind is StreamEnded:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended()
        elif kind is WindowOpened:
            if event.stream_id == 0:
                self._send_blocked()
            else:
                stream = self._blocked.get(event.stream_id)
                if stream is not None:
                    self.send_queued(stream)
        elif kind is StreamReset:
            self._reset_by_client(event.stream_id)
        elif kind is PeerClosing:
            self.draining = True
        # StreamTrailers: request trailers have no place in an HTTP/1.1 request: dropped.

    def _open(self, event: StreamOpened) -> None:
        stream_id = event.stream_id
        if self.draining or self._open_streams() >= self._max_streams:  # past our SETTINGS: RFC 9113 5.1.2
            self.codec.reset(stream_id, REFUSED_STREAM)
            return
        method = next((value for name, value in event.fields if name == b":method"), b"")
        stream = StreamDownstream(self, stream_id, self.info, method, self.write_timeout)
        stream.request_ended = event.ended
        self.streams[stream_id] = stream
        try:
            head = request_head(event.fields, ended=event.ended, max_header_bytes=self._max_header_bytes)
        except HTTPError as exc:  # refused on this stream alone; nothing goes upstream
            log.info("HTTP/2 request from %s refused: %s", self.info.address, exc)
            refuse_request(stream, exc, self.state)
            self.finish(stream)
            return
        stream.grpc = grpc.is_grpc(head.header(b"content-type"))
        stream.expected_length = head.content_length
        task = stream.task = self.loop.create_task(self._serve(stream, head))
        # A task cancelled before its first step (a stream reset in the read that opened
        # it) never runs _serve's ``finally``: finish the stream here, or it stays forever.
        task.add_done_callback(lambda _task, stream=stream: stream.task is _task and self.finish(stream))

    def _open_streams(self) -> int:
        """Streams counted against max_concurrent_streams: a reset one is closed (RFC 9113 5.1)."""
        return sum(1 for stream in self.streams.values() if not stream.reset)

    async def _serve(self, stream: StreamDownstream, head: object) -> None:
        try:
            await handle_request(stream, head, self.state)  # type: ignore[arg-type]
        finally:
            self.finish(stream)

    def finish(self, stream: StreamDownstream) -> None:
        """The stream's request was handled: it ends once its response has gone."""
        if not stream.reset:
            if not stream.end_queued:  # handled without a complete response
                self.reset_stream(stream, INTERNAL_ERROR)
            elif not stream.request_ended:
                stream.reset_after_end = True  # answered before the body: stop the client sending it
                if stream.end_sent:
                    self.codec.reset(stream.stream_id, NO_ERROR)
        stream.task = None
        self._forget_if_done(stream)
        try:
            self.flush()
        except ConnectionLost:
            pass

    def _forget_if_done(self, stream: StreamDownstream) -> None:
        if stream.task is None and (stream.end_sent or stream.reset):
            self.streams.pop(stream.stream_id, None)
            self._blocked.pop(stream.stream_id, None)
            if self.draining and not self.streams:
                try:
                    self.flush()  # (what the last stream wrote, framed but maybe not yet sent)
                except ConnectionLost:
                    return
                self.channel.close()  # the read loop sees the end

    def _reset_by_client(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not stream.end_sent and not self._resets.spend(time.monotonic()):
            self._calm_down("too many streams reset before their response (rapid reset)")
        stream.was_reset()
        self._blocked.pop(stream_id, None)
        task = stream.task
        if task is not None:
            task.cancel()  # its upstream exchange ends with it
        else:
            self._forget_if_done(stream)

    def _check_control_frames(self) -> None:
        count = self.codec.control_frames
        if count != self._control_seen:
            spent = count - self._control_seen
            self._control_seen = count
            if not self._control.spend(time.monotonic(), spent):
                self._calm_down("too many PING, SETTINGS, PRIORITY or empty DATA frames")

    def _calm_down(self, reason: str) -> None:
        self.codec.fail(ENHANCE_YOUR_CALM)
        raise ConnectionFailed(f"GOAWAY ENHANCE_YOUR_CALM: {reason}", kind="abuse")

    async def _end_streams(self) -> None:
        """The connection is over: cancel what still runs (their upstream exchanges end)."""
        tasks = []
        for stream in list(self.streams.values()):
            stream.was_reset()
            if stream.task is not None:
                stream.task.cancel()
                tasks.append(stream.task)
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT)
        if self._writer is not None:
            self._writer.cancel()
        self.streams.clear()
        self._blocked.clear()

    # -- draining --------------------------------------------------------------------

    def shutdown(self) -> None:
        """SIGTERM: GOAWAY; the streams received so far finish, then the connection closes."""
        if self.draining:
            return
        self.draining = True
        self.codec.goaway(self.codec.highest_stream_id)
        try:
            self.flush()
        except ConnectionLost:
            return
        if not self.streams:
            self.channel.close()

    # -- sending (for the streams) ---------------------------------------------------

    def flush(self) -> None:
        data = self.codec.bytes_to_send()
        if data:
            self.channel.write(data)

    def ack(self, stream_id: int, flow_length: int) -> None:
        self.codec.ack(stream_id, flow_length)
        self.flush()

    def send_soon(self, stream: StreamDownstream) -> None:
        """Frame what the stream wrote at the end of this loop iteration, with whatever else
        it writes meanwhile (its end most often: then END_STREAM rides on its last frame)."""
        self._dirty[stream.stream_id] = stream
        if not self._send_scheduled:
            self._send_scheduled = True
            self.loop.call_soon(self._send_written)

    def _send_written(self) -> None:
        self._send_scheduled = False
        dirty, self._dirty = self._dirty, {}
        try:
            for stream in dirty.values():
                if not stream.reset:
                    self.send_queued(stream, flush=False)
            self.flush()
        except ConnectionLost:
            pass

    def reset_stream(self, stream: StreamDownstream, code: int) -> None:
        self.codec.reset(stream.stream_id, code)
        stream.was_reset()
        self._blocked.pop(stream.stream_id, None)
        try:
            self.flush()
        except ConnectionLost:
            pass
        self._forget_if_done(stream)

    def send_queued(self, stream: StreamDownstream, *, flush: bool = True) -> None:
        """Frame what the stream queued: its heads, then its body as far as the windows
        allow (the rest waits in ``_blocked`` for a WINDOW_UPDATE, or for the channel to
        take writes again), then its end."""
        if stream.reset:
            raise ConnectionLost("the stream was reset")
        stream_id = stream.stream_id
        out = stream.out
        heads = stream.heads
        while heads:
            fields = heads.pop(0)
            whole = not heads and stream.end_queued and not out and not stream.trailers
            self.codec.send_headers(stream_id, fields, end=whole)
            if whole:
                stream.end_sent = True
        if out:
            if self.channel.writing_paused:
                self._blocked[stream_id] = stream
                self.wait_writable()
                return
            codec = self.codec
            window = codec.window(stream_id)
            max_frame = codec.max_frame
            while out and window > 0:
                chunk = out[0]
                size = len(chunk)
                if size <= window and size <= max_frame:
                    out.popleft()
                else:
                    size = min(window, max_frame)
                    out[0] = chunk[size:]
                    chunk = chunk[:size]
                last = not out and stream.end_queued and not stream.trailers
                codec.send_data(stream_id, chunk, end=last)
                if last:
                    stream.end_sent = True
                window -= size
                stream.out_bytes -= size
        if out:
            self._blocked[stream_id] = stream
        else:
            self._blocked.pop(stream_id, None)
            if stream.end_queued and not stream.end_sent:
                if stream.trailers:
                    self.codec.send_headers(stream_id, stream.trailers, end=True)
                else:
                    self.codec.send_data(stream_id, b"", end=True)
                stream.end_sent = True
            if stream.end_sent:
                if stream.reset_after_end:
                    self.codec.reset(stream_id, NO_ERROR)
                self._forget_if_done(stream)
        if flush:
            self.flush()
        if stream.out_bytes < STREAM_BUFFER:
            stream.wake_writer()

    def _send_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self.channel.writing_paused:
                return
            if not stream.reset:
                self.send_queued(stream)

    def wait_writable(self) -> None:
        """Start waiting for the channel to take writes again (one waiter per session)."""
        if self._writer is None:
            self._writer = self.loop.create_task(self._wait_writable())

    async def _wait_writable(self) -> None:
        try:
            await self.channel.drain(self.write_timeout)
        except (ConnectionError, TimeoutError):
            self.channel.abort()  # the client stopped reading the whole connection
        finally:
            self._writer = None
            waiters, self._writable_waiters = self._writable_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        try:
            self._send_blocked()
        except ConnectionLost:
            return
        for stream in list(self.streams.values()):
            stream.wake_writer()

    async def _writable(self) -> None:
        waiter = self.loop.create_future()
        self._writable_waiters.append(waiter)
        self.wait_writable()
        await waiter
        if self.channel.closed:
            raise ConnectionLost("connection closed")
