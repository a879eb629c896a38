#!/usr/bin/env python3
"""A tiny gRPC server to put behind tlsproxy: the "component B" of the README's gRPC walk-through.

It listens on an insecure (plaintext HTTP/2) port, as most gRPC services in a test setup do,
and leaves TLS and client certificates to the proxy in front of it. Generic byte handlers, so
it needs grpcio only (no .proto file, no generated code):

  /demo.Echo/Echo    -> the request bytes back
  /demo.Echo/WhoAmI  -> the X-Forwarded-Client-Cert the proxy added (b"" without one): the
                        verified identity of the caller, as the service behind the proxy sees it

    pip install grpcio
    python3 examples/grpc_echo_server.py --listen 127.0.0.1:50051

Prints ``grpc echo server listening on HOST:PORT`` once it accepts calls (``--listen
127.0.0.1:0`` picks a free port: read it from that line) and stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "demo.Echo"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    metadata = dict(context.invocation_metadata())
    return metadata.get("x-forwarded-client-cert", "").encode()


def make_server(listen: str, workers: int = 8) -> tuple[grpc.Server, int]:
    """The server, not started yet, and the port it bound (the real one for port 0)."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"grpc echo server: cannot listen on {listen}")
    return server, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    parser.add_argument("--workers", type=int, default=8, help="handler threads (default 8)")
    args = parser.parse_args(argv)
    server, port = make_server(args.listen, args.workers)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(f"grpc echo server listening on {args.listen.rpartition(':')[0]}:{port}", flush=True)
    stop.wait()
    server.stop(grace=2).wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
