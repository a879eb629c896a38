#!/usr/bin/env python3
"""Memory of tlsproxy while N clients read a 1 MiB response slowly (they stop reading).

1. raises RLIMIT_NOFILE (soft -> hard; children inherit it);
2. starts a local upstream (this script with ``--upstream PORT``: uvloop, answers every
   request with ``--size`` bytes, 1 MiB by default, written with backpressure) and a fresh
   ``tlsproxy serve`` (``workers: 1``, long timeouts, access log to /dev/null) in front of it;
3. reads the proxy's RSS (VmRSS of the process and its descendants), opens N TLS connections
   (``--connections``, default 1000; ``--concurrency`` handshakes in flight), sends
   ``GET /1m`` on each and stops reading once the first bytes of the response arrived;
4. waits until the proxy's RSS holds still (no change above 1 MiB for ``--settle`` seconds,
   at most ``--hold``), reads it again; then (unless ``--no-verify``) reads every response
   to its end and checks its length, closes everything.

Prints RSS before / held, the growth per slow reader, and what the proxy must hold at most
(SPEC: 256 KiB of response data per connection beyond the kernel's socket buffers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (certificates, free ports, /proc helpers)

BODY_PIECE = 64 * 1024


# --- the upstream (a child process) ----------------------------------------------------


async def serve_upstream(port: int, size: int) -> None:
    body = bytes(range(256)) * (BODY_PIECE // 256)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
                left = size
                while left:
                    piece = body[: min(left, BODY_PIECE)]
                    writer.write(piece)
                    left -= len(piece)
                    await writer.drain()  # the upstream's memory must not grow either
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def run_upstream(port: int, size: int) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve_upstream(port, size))


# --- the proxy ---------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of PID and its live descendants, KiB."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        stack.extend(bench._children(current))
    return total


# --- the slow readers --------------------------------------------------------------------


class SlowReader(asyncio.Protocol):
    """Sends one request, stops reading at the first response bytes; ``finish()`` reads on."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.first = asyncio.get_running_loop().create_future()
        self.done = asyncio.get_running_loop().create_future()
        self.received = 0
        self.head_end = -1
        self.head = b""
        self.expected = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.expected < 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            for line in self.head[:end].split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.expected = int(value)
            self.received = len(self.head) - end - 4
            self.head = b""
        else:
            self.received += len(data)
        if not self.first.done():
            self.first.set_result(None)
            self.transport.pause_reading()  # the slow reader: nothing more for now
        if self.received >= self.expected >= 0 and not self.done.done():
            self.done.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.first, self.done):
            if not future.done():
                future.set_result(False)

    def finish(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


async def open_readers(port: int, count: int, concurrency: int, timeout: float, rcvbuf: int) -> list[SlowReader]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    readers: list[SlowReader] = []
    request = b"GET /1m HTTP/1.1\r\nHost: localhost\r\n\r\n"

    async def one() -> None:
        async with gate:
            reader = SlowReader(request)
            sock = socket.socket()
            if rcvbuf:  # before connect(): the window the client announces stays this small
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
                await asyncio.wait_for(
                    loop.create_connection(lambda: reader, sock=sock, ssl=context,
                                           server_hostname="localhost", ssl_handshake_timeout=timeout),
                    timeout,
                )
                await asyncio.wait_for(reader.first, timeout)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                sock.close()
                print(f"  a connection failed: {exc!r}", file=sys.stderr)
                return
            readers.append(reader)

    await asyncio.gather(*(one() for _ in range(count)))
    return readers


async def measure(args: argparse.Namespace, proxy: bench.Server) -> dict:
    await asyncio.sleep(1.0)  # a fresh process settles before the baseline
    before = rss_kib(proxy.pid)
    started = time.monotonic()
    readers = await open_readers(proxy.port, args.connections, args.concurrency, args.timeout, args.client_rcvbuf)
    opened = time.monotonic() - started
    print(f"  {len(readers)} slow readers holding a {args.size} byte response after {opened:.1f}s", flush=True)
    # The proxy fills its buffers (and the kernel's) after the readers stopped: wait until
    # its RSS holds still, bounded by --hold.
    last, still_since, deadline = rss_kib(proxy.pid), time.monotonic(), time.monotonic() + args.hold
    while time.monotonic() < deadline and time.monotonic() - still_since < args.settle:
        await asyncio.sleep(0.5)
        now = rss_kib(proxy.pid)
        if abs(now - last) > 1024:
            last, still_since = now, time.monotonic()
    held = rss_kib(proxy.pid)
    result = {
        "connections": args.connections, "client_rcvbuf": args.client_rcvbuf, "slow_readers": len(readers), "size": args.size,
        "rss_before_kib": before, "rss_held_kib": held,
        "per_reader_kib": round((held - before) / max(1, len(readers)), 1),
    }
    if args.verify:
        for reader in readers:
            reader.finish()
        finished = await asyncio.wait_for(asyncio.gather(*(reader.done for reader in readers)), args.timeout)
        result["complete_responses"] = sum(1 for ok in finished if ok)
        result["rss_after_reading_kib"] = rss_kib(proxy.pid)
    for reader in readers:
        if reader.transport is not None:
            reader.transport.abort()
    return result


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        raise bench.BenchError(f"RLIMIT_NOFILE hard limit {hard} < {needed}: use fewer --connections")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", "-n", type=int, default=1000, help="slow readers (default 1000)")
    parser.add_argument("--size", type=int, default=1 << 20, help="response body bytes (default 1 MiB)")
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes in flight (default 100)")
    parser.add_argument("--hold", type=float, default=30.0, help="at most this long for RSS to settle (s)")
    parser.add_argument("--settle", type=float, default=3.0, help="RSS unchanged this long = settled (s)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--client-rcvbuf", type=int, default=0,
                        help="SO_RCVBUF of each client socket (default 0: the system's, autotuned)")
    parser.add_argument("--http-engine", default="auto", choices=("auto", "httptools", "h11"))
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="do not read the responses to their end afterwards")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # the child process mode
    args = parser.parse_args(argv)
    if args.upstream:
        run_upstream(args.upstream, args.size)
        return 0
    raise_nofile(2 * args.connections + 200)
    with tempfile.TemporaryDirectory(prefix="slow-readers-") as tmp:
        workdir = Path(tmp)
        _ca, cert, key = bench.make_certificates(workdir)
        upstream_port, port = bench.free_port(), bench.free_port()
        upstream_log = workdir / "upstream.log"
        with open(upstream_log, "wb") as out:
            upstream_proc = subprocess.Popen(
                [sys.executable, __file__, "--upstream", str(upstream_port), "--size", str(args.size)],
                stdout=out, stderr=subprocess.STDOUT)
        upstream = bench.Server("upstream", upstream_port, upstream_proc, upstream_log)
        proxy = None
        try:
            bench.wait_connectable(upstream_port, upstream_proc, "upstream", upstream_log)
            config = workdir / "tlsproxy.yaml"
            config.write_text(bench.many_connections_yaml(
                "bench/slow_readers.py", "big", port, upstream_port, cert, key, args.connections, args.http_engine))
            log = workdir / "tlsproxy.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(config)],
                                        stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
            proxy = bench.Server("tlsproxy", port, proc, log)
            bench.wait_connectable(port, proc, "tlsproxy serve", log)
            try:
                import uvloop

                runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
            except ImportError:
                runner = asyncio.Runner()
            with runner:
                result = runner.run(measure(args, proxy))
        finally:
            if proxy is not None:
                proxy.stop()
            upstream.stop()
    mib = 1024
    print(f"\n{result['slow_readers']} slow readers of a {args.size} byte response through tlsproxy "
          f"(engine {args.http_engine}, client SO_RCVBUF {args.client_rcvbuf or 'system'}):")
    print(f"  proxy RSS before  {result['rss_before_kib'] / mib:8.1f} MiB")
    print(f"  proxy RSS held    {result['rss_held_kib'] / mib:8.1f} MiB")
    print(f"  per slow reader   {result['per_reader_kib']:8.1f} KiB (bound: 256 KiB of response data "
          "+ the connection's own objects)")
    if "complete_responses" in result:
        print(f"  then read to the end: {result['complete_responses']}/{result['slow_readers']} complete; "
              f"RSS {result['rss_after_reading_kib'] / mib:.1f} MiB")
    print(json.dumps(result))
    ok = result["slow_readers"] == args.connections and result.get("complete_responses", args.connections) == \
        result["slow_readers"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
