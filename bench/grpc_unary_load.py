#!/usr/bin/env python3
"""The load generator of bench/grpc_unary.py: a fixed number of unary gRPC calls, several at once.

Run as its own process (pinned by bench/grpc_unary.py) so that its CPU stays off the servers'
cores and out of their accounting. One grpc.aio channel -- one HTTP/2 connection, as a real
client keeps -- and ``--concurrency`` tasks taking calls from one counter until ``--calls`` are
done. Every reply is checked against the request. Prints one JSON object:
``{"calls", "errors", "wall_s"}``, wall time from the first call to the last reply (the
import and the connection are outside it).

    python3 bench/grpc_unary_load.py --target 127.0.0.1:50051 --calls 10000 --concurrency 32
    python3 bench/grpc_unary_load.py --target localhost:8443 --ca ca.pem ...   # over TLS
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc

METHOD = "/demo.Echo/Echo"  # examples/grpc_echo_server.py
PAYLOAD = b"x" * 100


async def load(target: str, calls: int, concurrency: int, ca: Path | None) -> dict:
    if ca is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))
    async with channel:
        await asyncio.wait_for(channel.channel_ready(), 20)
        echo = channel.unary_unary(METHOD)
        remaining, errors = calls, 0

        async def caller() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                try:
                    if await echo(PAYLOAD, timeout=30) != PAYLOAD:
                        errors += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return {"calls": calls, "errors": errors, "wall_s": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ca", type=Path, help="TLS, trusting this CA (default: plaintext h2c)")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(load(args.target, args.calls, args.concurrency, args.ca))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
