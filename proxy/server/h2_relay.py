"""H2Relay: one request to an HTTP/2 upstream (h2c://, https:// with http2) and back.

The same contract as ``relay.Relay`` — called by ``request.handle_request`` with the
routed, authorised request and its rewritten headers; returns the status; raises
``proxy.errors`` for the caller to answer — for upstreams that speak HTTP/2, which is
what gRPC needs: trailers (``grpc-status``) pass through both ways, request and
response bodies stream at once in both directions (client, server and bidirectional
streaming), and a reset passes on: a client that cancels resets the upstream stream,
an upstream that resets the stream resets the client's (HTTP/2 clients get its code).

The request body goes up in a task of its own, as with ``BodyPump``: a gRPC server may
answer (and finish) before the client has finished sending. Backpressure both ways:
a request piece is read from the client only once the previous one fitted the
upstream's window; a response piece is acknowledged to the upstream only when the
client side took it (``UpstreamStream.next_event``).

Sending again: a stream the upstream refused with GOAWAY was never processed, so it
goes once more on a fresh connection — when no body byte was taken from the client.
"""

from __future__ import annotations

import asyncio

from proxy.errors import BadGateway, GatewayTimeout, HTTPError, PayloadTooLarge
from proxy.forwarding.headers import downstream_response_headers
from proxy.http.engine import Body, Headers, ResponseHead
from proxy.http.h2.messages import request_fields
from proxy.server.body_pump import REQUEST_TIMEOUT
from proxy.server.channel import ConnectionLost
from proxy.server.downstream import reason_phrase
from proxy.server.h2_upstream import H2UpstreamPool, UpstreamReset, UpstreamStream
from proxy.server.relay import Exchange
from proxy.server.task import stop_task


class H2Relay(Exchange):
    """One request's trip to an HTTP/2 upstream and back; ``run`` returns the status."""

    __slots__ = ("_scheme", "_body_events")

    pool: H2UpstreamPool

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._scheme = b"https" if self.service.upstream_scheme == "https" else b"http"
        self._body_events = 0  # pieces of body taken from the client: 0 = may be sent again

    async def run(self, headers: Headers, target: bytes, raw_fields: None = None) -> int:
        """As ``Relay.run``; an HTTP/2 upstream gets header fields, never a client's raw
        HTTP/1.1 lines (the request path gives none for it: ``raw_fields`` is None)."""
        upstream = self.service.upstreams[0]
        authority = f"[{upstream.host}]:{upstream.port}" if ":" in upstream.host else f"{upstream.host}:{upstream.port}"
        fields = request_fields(self.head, headers, target, scheme=self._scheme, authority=authority.encode())
        for attempt in (1, 2):
            stream = await self.pool.open_stream(self.service, fields, end=not self.head.has_body, tls=self.upstream_tls)
            self.upstream_url = stream.connection.upstream.url
            try:
                return await self._exchange(stream)
            except BadGateway:
                if attempt == 1 and stream.refused and self._body_events == 0 and self.status == 0:
                    continue  # GOAWAY: the upstream never saw it; once more, elsewhere
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, stream: UpstreamStream) -> int:
        if self.head.has_body:
            self._pump = asyncio.get_running_loop().create_task(self._send_body(stream))
        try:
            await self._relay_response(stream)
        except BaseException:
            stream.cancel()  # the upstream stops working for a client that is gone
            await self._stop_pump()
            raise
        try:
            unfinished = await self._stop_pump()
        except BaseException:  # cancelled meanwhile (the client went away)
            stream.cancel()
            raise
        if unfinished:
            stream.cancel()  # answered before the whole request: stop the upload
        else:
            stream.finished()
        return self.status

    async def _stop_pump(self) -> bool:
        """Stop the body task; True when it had not sent the whole body."""
        pump = self._pump
        if pump is None:
            return False
        self._pump = None
        return await stop_task(pump)

    async def _send_body(self, stream: UpstreamStream) -> None:
        down = self.down
        limit = self.max_body_bytes
        read_timeout = self.timeouts.request_header
        try:
            while True:
                try:
                    event = await down.next_body_event(read_timeout)
                except TimeoutError:
                    raise HTTPError(
                        f"the request body stalled for more than {read_timeout:g}s", status=REQUEST_TIMEOUT
                    ) from None
                self._body_events += 1
                if type(event) is not Body:
                    stream.end(getattr(event, "trailers", None))
                    return
                down.bytes_in += len(event.data)
                if limit and down.bytes_in > limit:
                    raise PayloadTooLarge(f"request body larger than {limit} bytes")
                await stream.send_body(event.data, self.timeouts.idle)
        except ConnectionLost:
            return  # the upstream stream ended; its response (if any) is still relayed
        except Exception as exc:
            stream.fail(exc)  # the relay raises this: the request cannot complete
            stream.cancel()

    async def _relay_response(self, stream: UpstreamStream) -> None:
        down = self.down
        timeout = self.timeouts.upstream_response
        while True:
            try:
                event = await stream.next_event(timeout)
            except TimeoutError:
                raise GatewayTimeout(
                    f"service {self.service.name!r}: upstream {self.upstream_url} did not respond "
                    f"within {timeout:g}s"
                ) from None
            except UpstreamReset as reset:
                if self.status and not down.can_respond:
                    down.abort(reset.code)  # mid-response: the client's stream gets the same code
                raise
            kind = type(event)
            if kind is Body:
                if down.write_body(event.data):
                    await down.drain()
            elif kind is ResponseHead:
                if self._relay_head(event, stream):
                    return
            else:  # EndOfMessage, with the upstream's trailers (gRPC's status) when it sent any
                down.write_end(event.trailers)
                return

    def _relay_head(self, head: ResponseHead, stream: UpstreamStream) -> bool:
        """Pass a response head on; True when it was the whole response (Trailers-Only)."""
        if head.status < 200:
            if head.status == 101 or self.head.http_version == b"1.0":
                return False  # no interim responses for HTTP/1.0; HTTP/2 switches nothing
            self.down.write_head(ResponseHead(head.status, head.headers, reason_phrase(head.status)))
            return False
        headers = downstream_response_headers(head.headers, upgrade=False)
        if self.closing():
            headers.append((b"connection", b"close"))
        self.status = head.status
        final = ResponseHead(head.status, headers, reason_phrase(head.status))
        if stream.head_ended:
            self.down.write_head(final, end=True)
            return True
        self.down.write_head(final)
        return False

