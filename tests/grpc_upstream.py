"""A real gRPC server (grpcio, insecure port on 127.0.0.1) with generic byte handlers,
for the gRPC tests: the upstream behind an ``h2c://`` service.

Service ``test.Echo``:
  Unary         -> the request bytes back; the call's metadata in the trailing metadata
                   (``seen-<name>``), so a test sees what the proxy forwarded (XFCC...)
  ServerStream  -> request b"N:SIZE": N messages of SIZE bytes
  ClientStream  -> b"<count>:<total bytes>" of what the client sent
  Bidi          -> each message back as it comes
  Abort         -> FAILED_PRECONDITION "nope: <request>", trailing metadata x-why=because
  Slow          -> waits until cancelled (or 30 s); records the cancellation
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

SERVICE = "test.Echo"


class GrpcUpstream:
    def __init__(self) -> None:
        self.cancelled = threading.Event()  # a Slow call saw its cancellation
        self.slow_started = threading.Event()
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Abort": grpc.unary_unary_rpc_method_handler(self._abort),
            "Slow": grpc.unary_stream_rpc_method_handler(self._slow),
        }
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def url(self) -> str:
        return f"h2c://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(grace=None).wait(5)

    def __enter__(self) -> GrpcUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- handlers --------------------------------------------------------------------

    @staticmethod
    def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata(
            tuple((f"seen-{key}", value) for key, value in context.invocation_metadata() if not key.endswith("-bin"))
        )
        return request

    @staticmethod
    def _server_stream(request: bytes, context: grpc.ServicerContext):
        count, size = (int(part) for part in request.split(b":"))
        for index in range(count):
            yield bytes([index % 256]) * size

    @staticmethod
    def _client_stream(requests, context: grpc.ServicerContext) -> bytes:
        count = total = 0
        for message in requests:
            count += 1
            total += len(message)
        return f"{count}:{total}".encode()

    @staticmethod
    def _bidi(requests, context: grpc.ServicerContext):
        for message in requests:
            yield message

    @staticmethod
    def _abort(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-why", "because"),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"nope: {request.decode()}")

    def _slow(self, request: bytes, context: grpc.ServicerContext):
        context.add_callback(self.cancelled.set)
        self.slow_started.set()
        yield b"started"
        self.cancelled.wait(30)
