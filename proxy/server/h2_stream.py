"""StreamDownstream: one HTTP/2 stream, seen by the request path as its client.

``request.handle_request``, the ``Relay`` and the ``BodyPump`` serve an HTTP/2
request exactly as an HTTP/1.1 one — routing, 421/403/413/431, identity headers, the
upstream exchange, 502/504, the access log — because a stream offers the same calls as
``downstream.Downstream``: read the request body, write the response head, body and
end with backpressure, answer an error, abort. The difference is underneath: the
stream's bytes are frames on a connection it shares (``h2_session.H2Session``), so

* a body piece read here is acknowledged to the client (its flow-control window
  reopened) only when read, that is when the upstream has taken the one before;
* a response piece is queued on the stream and sent as the client's windows allow;
  ``write_body`` says "wait" (``drain``) once STREAM_BUFFER bytes are queued, so a
  client that stops reading this stream stops its upstream, not its neighbours;
* ``abort`` resets this stream only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from proxy.errors import BadRequest, HTTPError
from proxy.http.engine import Body, EndOfMessage, Headers, ResponseHead
from proxy.http.h2 import grpc
from proxy.http.h2.codec import INTERNAL_ERROR
from proxy.http.h2.messages import response_fields
from proxy.server.channel import Channel, ConnectionLost
from proxy.server.downstream import ClientInfo, plain_response

# Response bytes queued on one stream before its writer waits (the client's window
# decides how fast they leave). Per connection: max_concurrent_streams times this.
STREAM_BUFFER = 64 * 1024

_END = EndOfMessage()


class Session(Protocol):
    """What a stream needs of its connection (``h2_session.H2Session``)."""

    channel: Channel
    loop: asyncio.AbstractEventLoop

    def ack(self, stream_id: int, flow_length: int) -> None: ...
    def send_soon(self, stream: StreamDownstream) -> None: ...
    def reset_stream(self, stream: StreamDownstream, code: int) -> None: ...
    def wait_writable(self) -> None: ...


class StreamDownstream:
    """The client side of one request on an HTTP/2 connection."""

    __slots__ = (
        "session", "stream_id", "info", "bytes_in", "bytes_out", "method", "write_timeout", "task",
        "request_ended", "reset", "out", "out_bytes", "end_queued", "end_sent", "response_started",
        "reset_after_end", "trailers", "grpc", "expected_length", "received_length", "body_error", "heads",
        "_body", "_body_waiter", "_drain_waiter",
    )

    protocol = "HTTP/2"

    def __init__(self, session: Session, stream_id: int, info: ClientInfo, method: bytes, write_timeout: float):
        self.session = session
        self.stream_id = stream_id
        self.info = info
        self.bytes_in = 0
        self.bytes_out = 0
        self.method = method
        self.write_timeout = write_timeout
        self.task: asyncio.Task | None = None
        self.request_ended = False  # END_STREAM received: the request body is complete
        self.reset = False  # RST_STREAM either way (or the connection ended): nothing more moves
        self.out: deque[bytes] = deque()  # response DATA waiting for the client's windows
        self.out_bytes = 0
        self.end_queued = False  # the response is complete once ``out`` has gone
        self.end_sent = False
        self.response_started = False  # a final response head went out
        self.reset_after_end = False  # then tell the client to stop sending its body (RFC 9113 8.1)
        self.trailers: Headers = ()  # sent after the body, ending the stream (gRPC's status)
        self.heads: list[Headers] = []  # response heads (1xx, then the final one) not yet framed
        self.grpc = False  # a gRPC call: the proxy's own answers are gRPC statuses
        self.expected_length: int | None = None  # the request's content-length
        self.received_length = 0  # DATA received so far
        self.body_error: HTTPError | None = None  # the DATA broke the request's framing
        self._body: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self._body_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None

    # -- from the session ------------------------------------------------------------

    def received(self, data: bytes, flow_length: int) -> None:
        self.received_length += len(data)
        expected = self.expected_length
        if expected is not None and self.received_length > expected:
            self._framing_error()
        if self.body_error is not None:
            self.session.ack(self.stream_id, flow_length)  # dropped, but the window reopens
            return
        self._body.append((data, flow_length))
        self._wake_reader()

    def ended(self) -> None:
        self.request_ended = True
        if self.expected_length is not None and self.received_length != self.expected_length:
            self._framing_error()
        self._wake_reader()

    def _framing_error(self) -> None:
        """DATA disagrees with content-length (RFC 9113 8.1.1): the request is malformed;
        what was not yet passed on never is, and the stream is refused."""
        if self.body_error is None:
            self.body_error = BadRequest(
                f"malformed HTTP/2 request: content-length {self.expected_length} but "
                f"{self.received_length}{'' if self.request_ended else ' or more'} bytes of DATA"
            )
            for _data, flow_length in self._body:
                self.session.ack(self.stream_id, flow_length)
            self._body.clear()
            self._wake_reader()

    def was_reset(self) -> None:
        self.reset = True
        self.out.clear()
        self.out_bytes = 0
        self._wake_reader()
        self.wake_writer()

    def wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the request body ------------------------------------------------------------

    async def next_body_event(self, timeout: float) -> Body | EndOfMessage:
        """The next piece of the request body (its window is reopened now: the one
        before it has been taken); ``ConnectionLost`` if the stream was reset,
        TimeoutError if the client sends nothing for ``timeout``."""
        body = self._body
        while not body:
            if self.body_error is not None:
                raise self.body_error
            if self.request_ended:
                return _END
            if self.reset:
                raise ConnectionLost("the client reset the stream")
            waiter = self._body_waiter = self.session.loop.create_future()
            try:
                async with asyncio.timeout(timeout or None):
                    await waiter
            finally:
                self._body_waiter = None
        if self.body_error is not None:
            raise self.body_error
        data, flow_length = body.popleft()
        self.session.ack(self.stream_id, flow_length)
        return Body(data)

    # -- the response ----------------------------------------------------------------

    # What is written is framed once per loop iteration (``Session.send_soon``), so that
    # a small response's head, body and end written together leave as one HEADERS and one
    # DATA frame carrying END_STREAM (a response without a body: one HEADERS frame).

    def write_head(self, head: ResponseHead, *, end: bool = False) -> None:
        """Send a response head; ``end``: it is the whole response (gRPC Trailers-Only)."""
        self._queue_head(response_fields(head), final=head.status >= 200, end=end)

    def _queue_head(self, fields: Headers, *, final: bool, end: bool) -> None:
        if self.reset:
            raise ConnectionLost("the stream was reset")
        if final:
            self.response_started = True
        self.heads.append(fields)
        if end:
            self.end_queued = True
        self.session.send_soon(self)

    def write_body(self, data: bytes) -> bool:
        """Queue a piece of body; True when the caller must ``await drain()`` first."""
        if self.reset:
            raise ConnectionLost("the stream was reset")
        self.bytes_out += len(data)
        if data:
            self.out.append(data)
            self.out_bytes += len(data)
            self.session.send_soon(self)
        return self.out_bytes >= STREAM_BUFFER or self.session.channel.writing_paused

    async def drain(self) -> None:
        """Wait until this stream's queue is below STREAM_BUFFER and the connection
        takes writes (``write_timeout``: a client that stops reading it)."""
        session = self.session
        channel = session.channel
        if self.out_bytes >= STREAM_BUFFER or channel.writing_paused:
            async with asyncio.timeout(self.write_timeout or None):
                while (self.out_bytes >= STREAM_BUFFER or channel.writing_paused) and not self.reset:
                    if channel.writing_paused:
                        session.wait_writable()
                    waiter = self._drain_waiter = session.loop.create_future()
                    try:
                        await waiter
                    finally:
                        self._drain_waiter = None
        if self.reset:
            raise ConnectionLost("the stream was reset")

    def write_end(self, trailers: Headers = ()) -> None:
        if self.reset:
            raise ConnectionLost("the stream was reset")
        self.trailers = trailers
        self.end_queued = True
        self.session.send_soon(self)

    def send_error(self, status: int, message: str, *, close: bool = False, unauthenticated: bool = False) -> None:
        """The proxy's own answer: plain text, or for a gRPC call a gRPC status."""
        if self.grpc:
            self.response_started = True
            code = grpc.status_for(status, unauthenticated=unauthenticated)
            self._queue_head(grpc.error_fields(code, message), final=True, end=True)
            return
        self.send_simple(status, (message + "\n").encode(), close=close)

    def send_simple(self, status: int, body: bytes, headers: list | None = None, *, close: bool = False) -> None:
        """A complete response (``close`` means nothing on a stream: the stream ends anyway)."""
        head, body = plain_response(status, body, headers, head_only=self.method == b"HEAD")
        self.write_head(head)
        if body:
            self.write_body(body)
        self.write_end()

    # -- the exchange's end ----------------------------------------------------------

    @property
    def can_respond(self) -> bool:
        return not self.response_started and not self.reset

    @property
    def request_complete(self) -> bool:
        return self.request_ended

    def next_cycle(self) -> bool:
        """A stream carries one request: False."""
        return False

    def abort(self, code: int | None = None) -> None:
        """This stream failed mid-way: reset it (its neighbours go on); ``code``: the
        upstream's, when it reset its own stream."""
        if not self.reset:
            self.session.reset_stream(self, INTERNAL_ERROR if code is None else code)
