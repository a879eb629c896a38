"""One HTTP/1.1 client connection after the TLS handshake: the keep-alive request loop.

The usual request (it arrives whole, has no body, and its service's upstream has an
idle pooled connection) is served from callbacks, the way uvicorn serves HTTP: the
client's receive callback parses the head, decides the request and writes it
upstream (``RequestCycle.start``); the upstream's receive callback relays the response
as it comes (``Relay.relay_events``), returns the connection to the pool, writes the
log line and waits for the next request (``Channel.watch``). No coroutine is made or
resumed for it: measured, that was two task wake-ups through a five-deep coroutine
chain and four coroutine objects per request.

Whatever has to wait for anything else -- the rest of a head, a request body, a new
upstream connection, the client's backpressure, an HTTP/2 upstream, a second attempt,
a tunnel, a timeout -- is handed to the connection's task at the point it was reached,
and goes on there as a coroutine (the same ``RequestCycle`` and ``Relay`` code), the
callbacks taking over again at the next request. Every refusal, header rule, log field
and timeout is the same either way: the two share each step, and differ only in who
waits.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.errors import HTTPError
from proxy.server.channel import Channel
from proxy.server.downstream import MORE, Downstream
from proxy.server.relay import DONE, NEED_DATA, TIMED_OUT
from proxy.server.request import RequestCycle, refuse_request
from proxy.server.state import ServerState
from proxy.server.upstream_pool import UpstreamConnection

log = logging.getLogger("tlsproxy")

# How long a closing connection waits for the client's side of the TLS shutdown.
CLOSE_WAIT = 1.0

# What the connection's task does next (``_RequestLoop.next``; callbacks hand it over).
_PARKED = "parked"  # nothing: the callbacks have the connection (a watch is set)
_READ = "read"  # read the next chunk (bytes already received, or the client closed)
_HEAD_REST = "head rest"  # read the rest of a head begun in the engine
_RELAY = "relay"  # run the prepared request's relay as a coroutine
_RESUME = "resume"  # the started request's relay goes on as a coroutine from ``_step``
_DRAIN = "drain"  # wait for the client to take what is queued
_END = "end"  # the connection ends
_NEXT = "next"  # (within ``next``: the next request)


async def serve_connection(down: Downstream, state: ServerState) -> None:
    """Serve requests on ``down`` until either side ends the connection."""
    requests = _RequestLoop(down, state)
    # The request loop is its own record in ``state.connections`` (``state.Tracked``):
    # ``state.track``'s context manager and record cost ~0.5 KiB a connection.
    connections = state.connections
    connections.add(requests)
    try:
        await requests.run()
    finally:
        requests.stop()
        try:
            await down.channel.close_and_wait(CLOSE_WAIT)
        finally:
            connections.discard(requests)


class _RequestLoop:
    """The connection's requests, driven by its task and by receive callbacks (the
    module docstring): ``next`` serves what it can without waiting and says what the
    task must wait for; a callback that reaches such a point wakes the task with it."""

    __slots__ = ("down", "state", "idle", "first", "cycle", "conn", "_step", "_parked")
    on_shutdown = None  # (as Tracked: begin_shutdown closes it when idle)

    def __init__(self, down: Downstream, state: ServerState) -> None:
        self.down = down
        self.state = state
        self.idle = True  # as Tracked.idle: no byte of a next request received
        self.first = True  # no request yet: the wait for one is timeouts.request_header, not idle
        self.cycle: RequestCycle | None = None  # the request in progress
        self.conn: UpstreamConnection | None = None  # its upstream connection, while callbacks relay
        self._step: object = None  # where the relay stopped (``Relay.resume``)
        self._parked: asyncio.Future | None = None  # the task's wait while callbacks serve

    async def run(self) -> None:
        """The task's part: wait for what ``next`` (or a callback) says, then go on."""
        down = self.down
        step = self.next()
        while step is not _END:
            if step is _PARKED:
                parked = self._parked = down.channel.loop.create_future()
                try:
                    step = await parked
                finally:
                    self._parked = None
                continue
            if step is _READ:
                timeouts = self.state.generation.config.timeouts
                try:
                    data = await down.channel.read(timeouts.request_header if self.first else timeouts.idle)
                except TimeoutError:
                    return
                if not data:
                    return
                self.idle = False
                down.engine.feed(data)
            elif step is _HEAD_REST:
                # The head's first byte is here: the rest within request_header of the
                # next chunk (read_head's deadline starts at that chunk).
                timeout = self.state.generation.config.timeouts.request_header
                try:
                    head = await down.read_head(timeout, timeout)
                except HTTPError as exc:  # unframeable request: answer, log and close
                    refuse_request(down, exc, self.state)
                    return
                if head is None:
                    return
                step = self._serve(head)
                continue
            elif step is _RELAY:
                if not await self._relayed(self.cycle.run()):
                    return
            elif step is _RESUME:
                if not await self._relayed(self.cycle.resume(self.conn, self._step)):
                    return
            elif step is _DRAIN:
                try:
                    await down.drain()
                except (ConnectionError, TimeoutError):
                    return
            step = self.next()

    def stop(self) -> None:
        """The task ends (the connection closes, or the task was cancelled): a response
        the callbacks were still waiting for is for nobody, and its request is logged."""
        self.down.channel.unwatch()
        conn, cycle = self.conn, self.cycle
        self.conn = self.cycle = None
        if conn is not None:
            conn.channel.unwatch()
            conn.abort()
        if cycle is not None:
            cycle.end()

    def next(self) -> object:
        """Serve the requests the client has sent, as far as they go without waiting;
        what the task must do next (_PARKED: nothing, callbacks will go on)."""
        down, state = self.down, self.state
        while True:
            if not down.engine.has_unread():
                channel = down.channel
                if state.closing:  # no new request; one already (partly) received is answered
                    return _READ if channel.unread else _END
                # Idle (shutdown may close it now) until the first byte of the next
                # request arrives; bytes the client pipelined are already in the engine.
                timeouts = state.generation.config.timeouts
                if channel.watch(self, timeouts.request_header if self.first else timeouts.idle):
                    self.idle = True
                    return _PARKED
                return _READ  # (received and unread, or the client closed: not idle)
            self.first = False
            try:
                head = down.poll_head()
            except HTTPError as exc:  # unframeable request: answer, log and close
                refuse_request(down, exc, state)
                return _END
            if head is MORE:
                return _HEAD_REST
            if head is None:
                return _END
            step = self._serve(head)
            if step is not _NEXT:
                return step

    def _serve(self, head: object) -> object:
        """Begin one request and start it upstream if it can go without waiting."""
        cycle = self.cycle = RequestCycle(self.down, head, self.state)  # type: ignore[arg-type]
        try:
            cycle.begin()
            conn = cycle.start()
        except Exception as exc:
            return self._ended(cycle.failed(exc))
        if conn is None:
            return _RELAY
        self.conn = conn
        return self._await_response()

    def _await_response(self) -> object:
        conn = self.conn
        if conn.channel.watch(self, self.cycle.relay.timeouts.upstream_response):
            return _PARKED
        self._step = NEED_DATA  # (already received, or closed: the coroutine reads it)
        return _RESUME

    def _ended(self, keep_alive: bool) -> object:
        """After a request's answer: its log line; whether and how the connection goes on."""
        cycle = self.cycle
        self.cycle = self.conn = None
        cycle.end()
        if not keep_alive:
            return _END
        # Backpressure between requests: small responses never wait for the client
        # inside the relay, so a client that pipelines requests and reads nothing would
        # have every answer fetched and kept. The next request is read once the client
        # has taken what is queued below the high-water mark.
        if self.down.channel.writing_paused:
            return _DRAIN
        return _NEXT

    async def _relayed(self, relaying: object) -> bool:
        """A relay's coroutine to its end; whether the connection goes on. The
        coroutine owns the request from here: it logs it, and aborts the upstream
        connection if it fails or is cancelled."""
        cycle = self.cycle
        self.cycle = self.conn = None
        return await cycle.relayed(relaying)

    # -- Channel.watch's callbacks: the client's channel between requests, the upstream's
    #    while a started request waits for its response

    def received(self, channel: Channel, data: bytes) -> None:
        try:
            if channel is self.down.channel:
                self.idle = False
                self.down.engine.feed(data)
                step = self.next()
            else:
                step = self._response_received(data)
        except Exception:  # a bug: log it, never leave the connection hanging
            log.exception("internal error while serving %s", self.down.info.address)
            self.down.abort()
            step = _END
        if step is not _PARKED:
            self._wake(step)

    def _response_received(self, data: bytes) -> object:
        conn, cycle = self.conn, self.cycle
        relay = cycle.relay
        try:
            step = relay.received(conn, data)
            if step is DONE:
                keep_alive = cycle.done(relay.finish(conn))
        except Exception as exc:
            conn.abort()
            keep_alive, step = cycle.failed(exc), DONE  # (answered or aborted: the request is over)
        if step is NEED_DATA:
            return self._await_response()
        if step is not DONE:
            self._step = step  # (the client's backpressure, a large body, a tunnel: the coroutine)
            return _RESUME
        step = self._ended(keep_alive)
        return self.next() if step is _NEXT else step

    def ended(self, channel: Channel) -> None:
        if channel is self.down.channel:
            self._wake(_READ)  # (it returns b"": the client closed)
        else:
            self._step = NEED_DATA  # (the coroutine reads b"": a second attempt, or 502)
            self._wake(_RESUME)

    def timed_out(self, channel: Channel) -> None:
        if channel is self.down.channel:
            self._wake(_END)  # idle past its timeout: closed, as a read timing out is
        else:
            self._step = TIMED_OUT  # 504
            self._wake(_RESUME)

    def _wake(self, step: object) -> None:
        parked = self._parked
        if parked is not None and not parked.done():
            parked.set_result(step)
