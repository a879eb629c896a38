#!/usr/bin/env python3
"""Memory of a TLS terminator holding many idle TLS connections: tlsproxy, and nginx for comparison.

One run of this script, for each server and each mode (with / without one request):

1. raises RLIMIT_NOFILE (soft -> hard) so this process and the servers it starts can hold
   the sockets;
2. starts a fresh server (``tlsproxy serve`` with ``workers: 1``, long handshake/idle
   timeouts, ``max_connections`` above the count; or nginx as a single-process TLS 1.3
   terminator with ``worker_connections`` above the count), both proxying to an nginx static
   upstream, and reads its RSS (VmRSS of the process and its descendants, from /proc);
3. opens N TLS connections from this process (asyncio + ssl, ``--concurrency`` handshakes in
   flight), optionally sends one keep-alive ``GET /small`` on each and reads the response,
   then holds them all idle for ``--hold`` seconds;
4. reads the server's RSS again, counts the server's ESTABLISHED sockets in /proc/net/tcp and
   the client connections the server closed (EOF seen), then proves a sample of the
   connections still answers a request, closes everything and reads RSS once more.

Figures: RSS before / with N held / after closing, per-connection KiB = (held - before) / N.
Results as a table on stdout and in bench/results/idle.json (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import contextlib
import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: certificates, nginx start, /proc helpers)

RESULTS = bench.RESULTS_DIR / "idle.json"
REQUEST = b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n"
MODES = {"no": False, "yes": True}


# --- limits and /proc ------------------------------------------------------------------


def raise_nofile(needed: int) -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise bench.BenchError(
            f"RLIMIT_NOFILE hard limit is {hard}, {needed} descriptors are needed per process "
            f"(raise it: ulimit -Hn as root, or fewer --connections)"
        )
    return soft, hard


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, ... in KiB from /proc/PID/status ({} if the process is gone)."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith(" kB"):
                values[key] = int(rest.split()[0])
    return values


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon (KiB) summed over PID and its live descendants, and how many processes."""
    total = {"rss_kib": 0, "anon_kib": 0, "processes": 0}
    stack = [pid]
    while stack:
        current = stack.pop()
        status = _status(current)
        if status:
            total["rss_kib"] += status.get("VmRSS", 0)
            total["anon_kib"] += status.get("RssAnon", 0)
            total["processes"] += 1
        stack.extend(bench._children(current))
    return total


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets open in PID and its live descendants (/proc/PID/fd)."""
    inodes: set[int] = set()
    stack = [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{current}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
        stack.extend(bench._children(current))
    return inodes


def established(port: int, server_pid: int) -> dict:
    """ESTABLISHED TCP sockets (/proc/net/tcp{,6}): ``server_side`` = local port PORT, owned by
    the server process and paired with a socket of this client (the server's end of each client
    connection); ``client_side`` = this process's ends; ``upstream`` = other sockets the server
    holds; ``other`` = local port PORT but not such a pair (should be 0; a few shown in
    ``other_sample``); ``server_owned`` = the server's sockets on PORT, paired or not."""
    server, ours = socket_inodes(server_pid), socket_inodes(os.getpid())
    counts: dict = {"server_side": 0, "client_side": 0, "upstream": 0, "other": 0, "server_owned": 0}
    # /proc/net/tcp is read in chunks while other sockets on the host come and go: a line can
    # appear twice, so everything is keyed by inode.
    ends: dict[int, tuple[int, str]] = {}
    client_ends: dict[int, int] = {}
    upstream: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[3] != "01":  # TCP_ESTABLISHED
                    continue
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                inode = int(fields[9])
                if local == port:
                    ends[inode] = (remote, f"{fields[1]}->{fields[2]} inode {inode}")
                elif inode in server:
                    upstream.add(inode)
                if remote == port and inode in ours:
                    client_ends[inode] = local
    counts["client_side"], counts["upstream"] = len(client_ends), len(upstream)
    client_ports = set(client_ends.values())
    sample = []
    for inode, (remote, text) in ends.items():
        counts["server_owned"] += inode in server
        if inode in server and remote in client_ports:
            counts["server_side"] += 1
        else:
            counts["other"] += 1
            sample.append(text + (" (server's)" if inode in server else ""))
    if sample:
        counts["other_sample"] = sample[:5]
    return counts


# --- servers ---------------------------------------------------------------------------


def start_server(name: str, workdir: Path, upstream_port: int, cert: Path, key: Path,
                 args: argparse.Namespace, nofile: int) -> bench.Server:
    port = bench.free_port()
    if name == "nginx":
        prefix = workdir / "nginx"
        conf = bench.terminator_nginx_conf(prefix, port, upstream_port, cert, key,
                                            connections=args.connections + 1000, nofile=nofile,
                                            idle_timeout="300s")
        return bench.start_nginx("nginx", prefix, conf, port, args.server_cpu)
    config = workdir / "tlsproxy.yaml"
    config.write_text(bench.many_connections_yaml(
        "bench/idle.py", "idle", port, upstream_port, cert, key, args.connections, args.http_engine))
    log = workdir / "tlsproxy.log"
    argv = bench.pinned(args.server_cpu, [sys.executable, "-m", "proxy", "serve", "-c", str(config)])
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    server = bench.Server("tlsproxy", port, proc, log)
    try:
        bench.wait_connectable(port, proc, "tlsproxy serve", log)
    except bench.BenchError:
        server.stop()
        raise
    return server


# --- the client ------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 response with a Content-Length body; its status line."""
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    if match:
        await reader.readexactly(int(match.group(1)))
    return head.split(b"\r\n", 1)[0]


# asyncio's SSL transport gives every connection a 256 KiB read buffer (zero-filled, so
# resident): 10,000 client connections would cost this process ~3 GiB. 16 KiB (one TLS
# record) is plenty for a client that reads ~200-byte responses.
CLIENT_SSL_BUFFER = 16 * 1024


class Client:
    """N TLS connections to one port, opened with a bounded number of handshakes in flight."""

    def __init__(self, port: int, concurrency: int, timeout: float) -> None:
        self.port = port
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.semaphore = asyncio.Semaphore(concurrency)
        self.timeout = timeout
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.errors: dict[str, int] = {}
        self.bad_status = 0

    def _error(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        if isinstance(exc, OSError) and exc.errno is not None:
            kind += f"(errno {exc.errno})"
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def _one(self, request: bool) -> None:
        async with self.semaphore:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port, ssl=self.context, server_hostname="localhost",
                                            ssl_handshake_timeout=self.timeout, limit=16384),
                    self.timeout,
                )
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                self._error(exc)
                return
            self.streams.append((reader, writer))
            if request:
                try:
                    writer.write(REQUEST)
                    status = await asyncio.wait_for(read_response(reader), self.timeout)
                    if not status.startswith(b"HTTP/1.1 200"):
                        self.bad_status += 1
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
                    self._error(exc)

    async def open(self, count: int, request: bool) -> None:
        asyncio.sslproto.SSLProtocol.max_size = CLIENT_SSL_BUFFER
        await asyncio.gather(*(self._one(request) for _ in range(count)))

    def open_count(self) -> int:
        """Connections the server has not closed: no EOF, no error seen on them."""
        return sum(1 for reader, writer in self.streams if not reader.at_eof() and not writer.is_closing()
                   and reader.exception() is None)

    async def probe(self, sample: int) -> dict:
        """A request on SAMPLE of the held connections (spread over them): do they still answer?"""
        step = max(1, len(self.streams) // max(1, sample))
        picked = self.streams[::step][:sample]

        async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
            try:
                writer.write(REQUEST)
                return (await asyncio.wait_for(read_response(reader), self.timeout)).startswith(b"HTTP/1.1 200")
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
                return False

        answers = await asyncio.gather(*(ask(r, w) for r, w in picked))
        return {"asked": len(picked), "answered_200": sum(answers)}

    async def close(self) -> None:
        for _, writer in self.streams:
            writer.transport.abort()  # no close_notify round trips for 10,000 connections
        self.streams.clear()
        await asyncio.sleep(0)


def client_runner(loop: str) -> asyncio.Runner:
    if loop == "uvloop":
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def own_memory() -> dict[str, int]:
    return memory_kib(os.getpid())


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- one measurement -------------------------------------------------------------------


async def measure(server: bench.Server, args: argparse.Namespace, request: bool) -> dict:
    result: dict = {"server": server.name, "request": request, "connections_wanted": args.connections}
    await asyncio.sleep(1.0)  # let the fresh server settle before the baseline
    result["rss_before"] = memory_kib(server.pid)
    client = Client(server.port, args.concurrency, args.timeout)
    client_before = own_memory()
    started, server_cpu, client_cpu = time.monotonic(), bench.cpu_seconds(server.pid), own_cpu()
    try:
        await client.open(args.connections, request)
        result["open_s"] = round(time.monotonic() - started, 2)
        result["open_server_cpu_s"] = round(bench.cpu_seconds(server.pid) - server_cpu, 2)
        result["open_client_cpu_s"] = round(own_cpu() - client_cpu, 2)
        result["opened"] = len(client.streams)
        result["open_errors"] = dict(client.errors)
        result["bad_status"] = client.bad_status
        print(f"  {server.name} request={'yes' if request else 'no'}: {result['opened']} connections open in "
              f"{result['open_s']}s (CPU s: server {result['open_server_cpu_s']}, client "
              f"{result['open_client_cpu_s']}), holding {args.hold:.0f}s"
              + (f" (errors {client.errors})" if client.errors else ""), flush=True)
        await asyncio.sleep(args.hold)
        result["rss_held"] = memory_kib(server.pid)
        result["client_rss_held_kib"] = own_memory()["rss_kib"]
        result["client_rss_delta_kib"] = result["client_rss_held_kib"] - client_before["rss_kib"]
        result["established_after_hold"] = established(server.port, server.pid)
        result["still_open_after_hold"] = client.open_count()
        print(f"  after the hold: server RSS {result['rss_held']['rss_kib'] / 1024:.1f} MiB, ESTABLISHED "
              f"{result['established_after_hold']}, client RSS {result['client_rss_held_kib'] / 1024:.0f} MiB",
              flush=True)
        result["server_alive"] = server.proc.poll() is None
        result["probe"] = await client.probe(args.probe)
    finally:
        await client.close()
    deadline = time.monotonic() + 15
    while established(server.port, server.pid)["server_owned"] > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    result["established_after_close"] = established(server.port, server.pid)["server_owned"]
    result["rss_after_close"] = memory_kib(server.pid)
    opened = result["opened"] or 1
    grown = result["rss_held"]["rss_kib"] - result["rss_before"]["rss_kib"]
    result["per_connection_kib"] = round(grown / opened, 2)
    result["per_connection_anon_kib"] = round(
        (result["rss_held"]["anon_kib"] - result["rss_before"]["anon_kib"]) / opened, 2)
    result["all_held"] = (result["opened"] == args.connections
                          and result["still_open_after_hold"] == args.connections
                          and result["established_after_hold"]["server_side"] >= args.connections)
    return result


def print_table(results: list[dict], connections: int, target_mib: float) -> None:
    print(f"\n{connections} idle TLS 1.3 connections; RSS = VmRSS of the server process(es), MiB")
    header = (f"{'server':<10}{'request':>8}{'opened':>8}{'held':>7}{'estab':>7}{'before':>9}{'held':>9}"
              f"{'closed':>9}{'KiB/conn':>10}{'open s':>8}{'probe':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "rss_held" not in r:
            print(f"{r['server']:<10}{'yes' if r['request'] else 'no':>8}  failed: {r.get('error', '?')}")
            continue
        print(
            f"{r['server']:<10}{'yes' if r['request'] else 'no':>8}{r['opened']:>8}{r['still_open_after_hold']:>7}"
            f"{r['established_after_hold']['server_side']:>7}"
            f"{r['rss_before']['rss_kib'] / 1024:>9.1f}{r['rss_held']['rss_kib'] / 1024:>9.1f}"
            f"{r['rss_after_close']['rss_kib'] / 1024:>9.1f}{r['per_connection_kib']:>10.1f}{r['open_s']:>8.1f}"
            f"{r['probe']['answered_200']:>5}/{r['probe']['asked']:<3}"
        )
    print("held = client connections with no EOF after the hold; estab = server-side ESTABLISHED "
          "sockets (/proc/net/tcp); probe = sample answering a request after the hold")
    for r in results:
        if "rss_held" not in r:
            continue
        if r["server"] == "tlsproxy":
            held_mib = r["rss_held"]["rss_kib"] / 1024
            verdict = "meets" if held_mib < target_mib and r["all_held"] else "MISSES"
            print(f"tlsproxy request={'yes' if r['request'] else 'no'}: {held_mib:.1f} MiB with "
                  f"{r['still_open_after_hold']} held -> {verdict} the target ({target_mib:.0f} MiB, all "
                  f"{connections} held)")
        if r["established_after_close"]:
            print(f"warning: {r['server']}: {r['established_after_close']} server sockets still "
                  f"ESTABLISHED 15s after the client closed them")
        if not r["all_held"]:
            print(f"warning: {r['server']} request={'yes' if r['request'] else 'no'}: not all {connections} "
                  f"connections held (opened {r['opened']}, errors {r['open_errors']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", "-n", type=int, default=10000, help="idle TLS connections (default 10000)")
    parser.add_argument("--server", choices=("tlsproxy", "nginx", "both"), default="both")
    parser.add_argument("--request", nargs="?", const="yes", default="both", choices=("no", "yes", "both"),
                        help="one keep-alive request on each connection before holding it: yes (bare "
                             "--request), no, or both modes (default)")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight (default 200)")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold them idle (default 10)")
    parser.add_argument("--probe", type=int, default=100, help="held connections asked a request after the hold")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-connection handshake/response timeout")
    parser.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop of the client side (default uvloop: ~2x cheaper per handshake)")
    parser.add_argument("--http-engine", default="auto", choices=("auto", "httptools", "h11"))
    parser.add_argument("--client-cpu", default="", help="pin this client and the upstream to a core (default: no)")
    parser.add_argument("--server-cpu", default="", help="pin the server under test to a core (default: no)")
    parser.add_argument("--target-mib", type=float, default=200.0, help="tlsproxy RSS target (default 200: issue #17)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, logs)")
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        args.client_cpu = args.server_cpu = ""
    args.client_cpu = args.client_cpu or None
    args.server_cpu = args.server_cpu or None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("nginx"):
        print("idle: nginx is needed (the upstream, and the comparison): apt-get install -y nginx", file=sys.stderr)
        return 1
    servers = ["tlsproxy", "nginx"] if args.server == "both" else [args.server]
    modes = ["no", "yes"] if args.request == "both" else [args.request]
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="tlsproxy-idle-"))
    record: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": bench.tool_versions(),
        "results": [],
    }
    upstream = None
    failed = False
    try:
        nofile, hard = raise_nofile(args.connections + 1000)
        record["rlimit_nofile"] = [nofile, hard]
        if args.client_cpu is not None:
            os.sched_setaffinity(0, {int(args.client_cpu)})
        _, cert, key = bench.make_certificates(workdir)
        upstream, upstream_port = bench.start_upstream(workdir, args.client_cpu, {"small": bench.SMALL_BODY})
        print(f"RLIMIT_NOFILE {nofile}/{hard}; {args.connections} connections, {args.concurrency} handshakes "
              f"in flight, hold {args.hold:.0f}s", flush=True)
        for name in servers:
            for mode in modes:
                server = None
                try:
                    server = start_server(name, workdir, upstream_port, cert, key, args, nofile)
                    with client_runner(args.client_loop) as runner:
                        result = runner.run(measure(server, args, MODES[mode]))
                    result["server_alive_at_end"] = server.proc.poll() is None
                except bench.BenchError as exc:
                    result = {"server": name, "request": MODES[mode], "error": str(exc)}
                    print(f"idle: {name}: {exc}", file=sys.stderr)
                finally:
                    if server is not None:
                        server.stop()
                record["results"].append(result)
                failed |= not result.get("all_held", False)
        print_table(record["results"], args.connections, args.target_mib)
    except bench.BenchError as exc:
        print(f"idle: {exc}", file=sys.stderr)
        record["error"] = str(exc)
        failed = True
    finally:
        if upstream is not None:
            upstream.stop()
        bench.finish_run(record, started, args.output, workdir, keep=args.keep)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
