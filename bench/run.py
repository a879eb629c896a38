#!/usr/bin/env python3
"""tlsproxy against nginx and Caddy as TLS terminators: same upstream, certificate and load.

One run of this script:

1. issues an ECDSA P-256 CA + server certificate with our own toolkit (``proxy.pki``);
2. starts the upstream: an nginx serving a small file and a 1 MiB file on a plain port;
3. starts every selected target (``--targets``; default all): nginx with 1 worker (the
   reference) and with 2, ``tlsproxy serve`` with each HTTP engine and 1 worker and with
   httptools and 2 workers, and Caddy (``reverse_proxy``) with GOMAXPROCS 1 and 2 -- all TLS 1.3
   only, without session resumption;
4. loads each with wrk -- keep-alive small requests, a new TLS connection per request, and
   1 MiB responses -- one target at a time, alternating the order, ``--runs`` times;
5. reads each target's CPU time from /proc over every test window (the whole process tree:
   nginx master + workers, the tlsproxy parent + workers, all Caddy threads -> cores used),
   prints a table of medians with ratios to nginx with 1 worker (absolute and per server core)
   and the performance targets with PASS/MISS, and writes the whole record to
   bench/results/latest.json.

The load generator and the upstream run on one core, 1-worker targets on another
(``taskset``), so "cores used" is the server's own cost; 2-worker targets may use every core.
All targets run for the whole session; only one is loaded at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "bench" / "results"
SMALL_BODY = b'{"ok":true,"bench":"tlsproxy","note":"a small response body of about one hundred bytes"}\n'
LARGE_SIZE = 1 << 20
TESTS = ("keepalive", "handshake", "large")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
PROFILE_FORMATS = {".svg": "flamegraph", ".txt": "raw", ".json": "speedscope"}


@dataclass(frozen=True)
class Target:
    """One server configuration under test."""

    name: str
    kind: str  # nginx | tlsproxy | caddy
    workers: int  # nginx worker_processes, tlsproxy workers, Caddy GOMAXPROCS
    engine: str | None = None  # tlsproxy http_engine


TARGETS = {
    t.name: t
    for t in (
        Target("nginx", "nginx", 1),
        Target("nginx2", "nginx", 2),
        Target("tlsproxy-h11", "tlsproxy", 1, "h11"),
        Target("tlsproxy-httptools", "tlsproxy", 1, "httptools"),
        Target("tlsproxy-httptools-w2", "tlsproxy", 2, "httptools"),
        Target("caddy", "caddy", 1),
        Target("caddy2", "caddy", 2),
    )
}
REFERENCE = "nginx"  # every ratio is to nginx with one worker
# Performance targets, per server core, ratio to the reference.
# Issue #17's goals, per server core: (minimum x Caddy with the same worker count,
# minimum x nginx with 1 worker or None).
GOALS = {"keepalive": (1.0, 0.35), "handshake": (0.9, None), "large": (1.0, None)}

# A new TLS connection for every request: ask the server to close after each response, and
# count responses that did not announce the close (then the figure would not be handshakes).
HANDSHAKE_LUA = """\
wrk.headers["Connection"] = "close"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) kept_alive = 0 end
function response(status, headers, body)
  local c = headers["Connection"] or headers["connection"]
  if c == nil or string.lower(c) ~= "close" then kept_alive = kept_alive + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + (t:get("kept_alive") or 0) end
  io.write(string.format("keepalive_responses: %d\\n", total))
end
"""


class BenchError(Exception):
    """A precondition or a server start failed; the message says what to do."""


# --- processes and CPU time ------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields after the last ")" start at "state".
    return text.rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        children = _children(stack.pop())
        found += children
        stack += children
    return found


def cpu_seconds(pid: int) -> float:
    """utime+stime of PID (all its threads), its live descendants and its reaped children."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        fields = _stat_fields(current)
        if fields is None:
            continue
        # utime, stime, cutime, cstime (fields 14-17 of proc(5); index 0 here is field 3)
        total += sum(int(value) for value in fields[11:15])
        stack.extend(_children(current))
    return total / CLK_TCK


def _children_cpu() -> float:
    """CPU seconds of our reaped children (wrk, once ``subprocess.run`` has waited for it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_connectable(port: int, proc: subprocess.Popen, name: str, log: Path | None) -> None:
    """Until 127.0.0.1:PORT accepts, bounded; BenchError (with the log's tail) if PROC exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode} before listening\n{_tail(log)}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port that is not there yet: no event to wait on
    raise BenchError(f"{name} did not listen on 127.0.0.1:{port} within {START_TIMEOUT:.0f}s\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu is not None else argv


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pid = self.proc.pid

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        # (pid, start time): a pid is signalled below only if it is still the same process.
        descendants = [(pid, (_stat_fields(pid) or [None] * 20)[19]) for pid in _descendants(self.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for pid, started in descendants:  # workers that outlived their parent
            fields = _stat_fields(pid)
            if started is not None and fields is not None and fields[19] == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


# --- certificates and configs ----------------------------------------------------------


def make_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    from proxy.pki.build import issue_leaf
    from proxy.pki.store import ensure_ca, write_leaf

    ca_cert, ca_key = ensure_ca(workdir / "ca")
    cert, key = issue_leaf(ca_cert, ca_key, ["localhost", "127.0.0.1"], key_type="ec")
    pem, key_path = write_leaf(workdir / "server", cert, key, [ca_cert])
    return workdir / "ca" / "ca.pem", pem, key_path


NGINX_COMMON = """\
daemon off;
master_process {master};
worker_processes {workers};
{rlimit}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {connections}; multi_accept on; }}
"""

NGINX_TEMP = """\
    client_body_temp_path {prefix}/tmp_body;
    proxy_temp_path {prefix}/tmp_proxy;
    fastcgi_temp_path {prefix}/tmp_fastcgi;
    uwsgi_temp_path {prefix}/tmp_uwsgi;
    scgi_temp_path {prefix}/tmp_scgi;
"""


def nginx_common(prefix: Path, workers: int = 1, connections: int = 4096, nofile: int | None = None) -> str:
    """Single process (``master_process off``) for one worker; master + N workers otherwise."""
    rlimit = f"worker_rlimit_nofile {nofile};\n" if nofile else ""
    return NGINX_COMMON.format(prefix=prefix, master="off" if workers == 1 else "on", workers=workers,
                               rlimit=rlimit, connections=connections)


def upstream_nginx_conf(prefix: Path, port: int, docroot: Path) -> str:
    return (
        nginx_common(prefix)
        + "http {\n"
        + NGINX_TEMP.format(prefix=prefix)
        + f"""\
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    open_file_cache max=16;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {docroot};
    }}
}}
"""
    )


def terminator_nginx_conf(prefix: Path, port: int, upstream_port: int, cert: Path, key: Path,
                          workers: int = 1, *, connections: int = 4096, nofile: int | None = None,
                          idle_timeout: str = "120s", http2: bool = False) -> str:
    """nginx as the TLS terminator (TLS 1.3, no tickets, no session cache, upstream
    keep-alive); ``connections``/``nofile``/``idle_timeout`` make room for bench/idle.py;
    ``http2``: offer h2 by ALPN too (``listen ... ssl http2``, nginx 1.22; bench/h2.py)."""
    # Several workers: one listening socket each (reuseport), as tlsproxy's workers do.
    listen_options = (" reuseport" if workers > 1 else "") + (" http2" if http2 else "")
    return (
        nginx_common(prefix, workers, connections, nofile)
        + "http {\n"
        + NGINX_TEMP.format(prefix=prefix)
        + f"""\
    access_log /dev/null;
    client_header_timeout {idle_timeout};
    keepalive_requests 10000000;
    keepalive_timeout {idle_timeout};
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096{listen_options};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}
}}
"""
    )


def tlsproxy_yaml(port: int, upstream_port: int, cert: Path, key: Path, access_log: str,
                  http_engine: str = "auto", workers: int = 1, upstream_scheme: str = "http") -> str:
    return f"""\
# generated by bench/run.py
listen: ["127.0.0.1:{port}"]
workers: {workers}
http_engine: {http_engine}
tls:
  certificates:
    - {{cert: {json.dumps(str(cert))}, key: {json.dumps(str(key))}}}
  min_version: "1.3"
  session_tickets: false
access_log: {{format: json, path: {json.dumps(access_log)}}}
services:
  - name: bench
    upstream: {upstream_scheme}://127.0.0.1:{upstream_port}
"""


def many_connections_yaml(script: str, service: str, port: int, upstream_port: int, cert: Path, key: Path,
                         connections: int, engine: str) -> str:
    """A tlsproxy config for many long-lived connections (bench/idle.py, bench/slow_readers.py):
    long timeouts, room for ``connections``, TLS 1.3 without tickets, one service."""
    return f"""\
# generated by {script}
listen: ["127.0.0.1:{port}"]
workers: 1
http_engine: {engine}
tls:
  certificates:
    - {{cert: {json.dumps(str(cert))}, key: {json.dumps(str(key))}}}
  min_version: "1.3"
  session_tickets: false
timeouts: {{handshake: 300s, request_header: 300s, idle: 300s, upstream_response: 300s}}
limits: {{max_connections: {connections + 1000}}}
access_log: {{format: json, path: /dev/null}}
services:
  - name: {service}
    upstream: http://127.0.0.1:{upstream_port}
"""


def start_upstream(workdir: Path, cpu: str | None, files: dict[str, bytes]) -> tuple[Server, int]:
    """The plain-HTTP nginx upstream every target proxies to, serving ``files`` (name ->
    body) from workdir/www; the server and its port."""
    docroot = workdir / "www"
    docroot.mkdir()
    for name, body in files.items():
        (docroot / name).write_bytes(body)
    port = free_port()
    server = start_nginx("upstream nginx", workdir / "upstream",
                         upstream_nginx_conf(workdir / "upstream", port, docroot), port, cpu)
    return server, port


def start_nginx(name: str, prefix: Path, conf_text: str, port: int, cpu: str | None) -> Server:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    log = prefix / "error.log"
    argv = pinned(cpu, ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(log)])
    stderr = open(prefix / "stderr.log", "wb")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    server = Server(name, port, proc, log)
    wait_connectable(port, proc, name, log)
    return server


def start_tlsproxy(name: str, workdir: Path, port: int, upstream_port: int, cert: Path, key: Path,
                   cpu: str | None, access_log: str, http_engine: str, workers: int = 1,
                   python_path: Path | None = None, upstream_scheme: str = "http",
                   python: str | None = None) -> Server:
    """``tlsproxy serve`` from the installed package, or from the checkout ``python_path``
    (bench/paired.py's tree B; the working folder is outside any checkout either way);
    ``upstream_scheme`` h2c for a gRPC upstream (bench/grpc.py); ``python``: the
    interpreter (default: this one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "tlsproxy.yaml"
    config.write_text(tlsproxy_yaml(port, upstream_port, cert, key, access_log, http_engine, workers,
                                    upstream_scheme))
    env = {**os.environ, "PYTHONPATH": str(python_path)} if python_path is not None else None
    argv = [python or sys.executable, "-m", "proxy", "serve", "-c", str(config)]
    return start_logged(f"{name} (tlsproxy serve)", name, workdir, workdir / "tlsproxy.log", pinned(cpu, argv), port, env)


def start_logged(what: str, name: str, workdir: Path, log: Path, argv: list[str], port: int,
                  env: dict | None) -> Server:
    """Start a server with its output in ``log`` and wait until ``port`` accepts (stopped
    again, with the log's tail in the error, when it does not)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    server = Server(name, port, proc, log)
    try:
        wait_connectable(port, proc, what, log)
    except BenchError:
        server.stop()
        raise
    return server


# Caddy: a Caddyfile as a user would write it. Its session tickets cannot be turned off from
# a Caddyfile (Caddy 2.6 has no such option), so the Caddyfile is adapted to JSON with
# `caddy adapt` and `apps.tls.session_tickets.disabled` is set there -- the check before
# measuring confirms that no ticket is sent.
CADDYFILE = """\
{{
	admin off
	auto_https off
	servers {{
		protocols h1 h2
	}}
}}
https://:{port} {{
	bind 127.0.0.1
	tls {cert} {key} {{
		protocols tls1.3
	}}
	reverse_proxy 127.0.0.1:{upstream_port}
}}
"""


def start_caddy(name: str, workdir: Path, port: int, upstream_port: int, cert: Path, key: Path,
                cpu: str | None, procs: int) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    caddyfile = workdir / "Caddyfile"
    caddyfile.write_text(CADDYFILE.format(port=port, upstream_port=upstream_port, cert=cert, key=key))
    # Caddy keeps state under $HOME / XDG folders: keep it in the temporary folder.
    env = {**os.environ, "HOME": str(workdir), "XDG_DATA_HOME": str(workdir / "data"),
           "XDG_CONFIG_HOME": str(workdir / "config"), "GOMAXPROCS": str(procs)}
    adapted = subprocess.run(["caddy", "adapt", "--config", str(caddyfile), "--adapter", "caddyfile"],
                             capture_output=True, text=True, env=env, timeout=30)
    if adapted.returncode != 0:
        raise BenchError(f"caddy adapt failed: {(adapted.stderr or adapted.stdout).strip()[-500:]}")
    config = json.loads(adapted.stdout)
    config.setdefault("apps", {}).setdefault("tls", {})["session_tickets"] = {"disabled": True}
    (workdir / "caddy.json").write_text(json.dumps(config, indent=2) + "\n")
    argv = ["caddy", "run", "--config", str(workdir / "caddy.json")]
    return start_logged(f"{name} (caddy run)", name, workdir, workdir / "caddy.log", pinned(cpu, argv), port, env)


# --- wrk -------------------------------------------------------------------------------

_UNITS_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_UNITS_SIZE = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_wrk(text: str) -> dict:
    """The figures we use from wrk's report (latency in ms, transfer in MiB/s)."""
    result: dict = {"requests_per_s": None, "p99_ms": None, "mib_per_s": None, "errors": {}, "non_2xx": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        result["requests_per_s"] = float(m.group(1))
    if m := re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        result["p99_ms"] = float(m.group(1)) * _UNITS_TIME[m.group(2)]
    if m := re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", text):
        result["mib_per_s"] = float(m.group(1)) * _UNITS_SIZE[m.group(2)] / (1 << 20)
    if m := re.search(r"(\d+) requests in", text):
        result["requests"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        result["errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        result["non_2xx"] = int(m.group(1))
    if m := re.search(r"keepalive_responses: (\d+)", text):
        result["keepalive_responses"] = int(m.group(1))
    return result


@dataclass
class LoadTest:
    name: str
    path: str
    connections: int
    latency: bool = False
    script: Path | None = None


def measure_load(argv: list[str], server: Server, upstream: Server, cpu: str | None,
                 timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the load generator ``argv`` (pinned to ``cpu``) to its end: its completed
    process, and the cores the server, the upstream and the load generator used meanwhile
    (CPU seconds / wall seconds; bench/h2.py's h2load runs go through here too)."""
    client0 = _children_cpu()
    server_cpu0, upstream_cpu0, wall0 = cpu_seconds(server.pid), cpu_seconds(upstream.pid), time.monotonic()
    proc = subprocess.run(pinned(cpu, argv), capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - wall0
    client_cpu = _children_cpu() - client0
    server_cpu, upstream_cpu = cpu_seconds(server.pid) - server_cpu0, cpu_seconds(upstream.pid) - upstream_cpu0
    return proc, {"server_cores": server_cpu / wall, "upstream_cores": upstream_cpu / wall,
                  "client_cores": client_cpu / wall, "wall_s": wall}


def run_wrk(spec: LoadTest, server: Server, duration: float, cpu: str | None, upstream: Server,
            profile_to: Path | None = None) -> dict:
    argv = ["wrk", "-t1", f"-c{spec.connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s"]
    if spec.latency:
        argv.append("--latency")
    if spec.script is not None:
        argv += ["-s", str(spec.script)]
    argv.append(server.url + spec.path)
    profiler = None
    if profile_to is not None:
        profiler = subprocess.Popen(
            [py_spy() or "py-spy", "record", "--subprocesses", "--format", PROFILE_FORMATS[profile_to.suffix],
             "-o", str(profile_to), "--pid", str(server.pid),
             "--duration", str(max(1, round(duration)))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
    proc, cores = measure_load(argv, server, upstream, cpu, duration + 60)
    result = parse_wrk(proc.stdout)
    result.update(cores, wrk_exit=proc.returncode)
    if proc.returncode != 0 or result["requests_per_s"] is None:
        result["wrk_output"] = (proc.stdout + proc.stderr)[-2000:]
    if profiler is not None:
        out, _ = profiler.communicate(timeout=60)
        result["profile"] = {"exit": profiler.returncode, "output": out.decode(errors="replace")[-1000:]}
    return result


def check_no_resumption(server: Server, workdir: Path) -> dict:
    """Offer the server the session from a first connection: it must do a full handshake.

    ``openssl s_client -sess_out`` then ``-sess_in`` (``-reconnect`` cannot show TLS 1.3
    resumption: it reconnects before the post-handshake ticket has been read). A request is
    sent and read to the end (``-ign_eof``) so any ticket the server sends is received.
    """
    session = workdir / f"{server.name}.session.pem"
    request = b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-servername", "localhost",
            "-tls1_3", "-ign_eof"]
    try:
        first = subprocess.run([*base, "-sess_out", str(session)], input=request, capture_output=True, timeout=30)
        if not re.search(rb"^New, TLSv1\.3", first.stdout, re.M):
            return {"ok": False, "second_connection": "first connection failed"}
        if not session.exists():  # TLS 1.3 sessions arrive only as tickets: none were sent
            return {"ok": True, "second_connection": "no session ticket was sent"}
        second = subprocess.run([*base, "-sess_in", str(session)], input=request, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "error": str(exc)}
    if re.search(rb"^Reused, ", second.stdout, re.M):
        return {"ok": False, "second_connection": "resumed"}
    if re.search(rb"^New, TLSv1\.3", second.stdout, re.M):
        return {"ok": True, "second_connection": "full handshake (ticket not honoured)"}
    return {"ok": False, "second_connection": "failed"}


def _get_until_close(server: Server, path: str, timeout: float) -> tuple[bytes, bool]:
    """``GET path`` with ``Connection: close`` over TLS (any certificate): everything
    received, and whether the server closed the connection (False: ``timeout`` ran out)."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data, closed = b"", False
            with contextlib.suppress(OSError):  # a timeout means it kept the connection open
                while chunk := tls.recv(1 << 16):
                    data += chunk
                closed = True
    return data, closed


def check_connection_close(server: Server) -> bool:
    """Does the server close after a response to a request saying ``Connection: close``?"""
    data, closed = _get_until_close(server, "/small", timeout=5)
    return closed and data.startswith(b"HTTP/1.1 200")


def check_large_body(server: Server, digest: bytes) -> bool:
    """The 1 MiB path arrives whole through the server (wrk does not check bodies)."""
    data, _closed = _get_until_close(server, "/1m", timeout=10)
    head, _, body = data.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and hashlib.sha256(body).digest() == digest


# --- the session -----------------------------------------------------------------------


def negotiated_cipher(server: Server) -> str | None:
    """The TLS 1.3 cipher suite the server picks for an OpenSSL client (Python's, as wrk's)."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with contextlib.suppress(OSError):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.cipher()[0]
    return None


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


METRICS = {"keepalive": ("requests_per_s", "p99_ms"), "handshake": ("requests_per_s",), "large": ("mib_per_s",)}


def summarize(raw: dict[str, dict[str, list[dict]]]) -> dict:
    """Medians per target and test, and ratios to nginx with one worker (absolute and per core)."""
    summary: dict = {}
    for test, keys in METRICS.items():
        row: dict = {}
        for target, tests in raw.items():
            runs = tests.get(test, [])
            if not runs:
                continue
            row[target] = {key: median_or_none([r[key] for r in runs]) for key in keys}
            row[target]["server_cores"] = median_or_none([r["server_cores"] for r in runs])
            row[target]["upstream_cores"] = median_or_none([r["upstream_cores"] for r in runs])
            row[target]["client_cores"] = median_or_none([r["client_cores"] for r in runs])
            per_core = [r[keys[0]] / r["server_cores"] for r in runs if r[keys[0]] and r["server_cores"] > 0.01]
            row[target]["per_core"] = median_or_none(per_core)
            # (max - min) / median of the main figure over the runs: how noisy this row is
            figures = [r[keys[0]] for r in runs if r[keys[0]] is not None]
            middle = median_or_none(figures)
            row[target]["spread"] = (max(figures) - min(figures)) / middle if len(figures) > 1 and middle else None
            row[target]["errors"] = sum(sum(r["errors"].values()) + r["non_2xx"] for r in runs)
        reference = row.get(REFERENCE)
        if reference:
            for target, figures in row.items():
                ratios = {}
                for key in (*keys, "per_core"):
                    a, b = figures.get(key), reference.get(key)
                    ratios[key] = a / b if a is not None and b else None
                figures["ratio"] = ratios
        if row:
            summary[test] = row
    return summary


def verdicts(summary: dict) -> list[dict]:
    """The performance goals (``GOALS``), for every tlsproxy target measured, per server core."""
    found = []
    for test, (caddy_goal, nginx_goal) in GOALS.items():
        row = summary.get(test, {})
        for name, figures in row.items():
            if TARGETS[name].kind != "tlsproxy":
                continue
            if nginx_goal is not None:
                value = figures.get("ratio", {}).get("per_core")
                found.append({"test": test, "target": name, "goal": f"per core >= {nginx_goal}x nginx",
                              "value": value, "pass": None if value is None else value >= nginx_goal})
            caddy = "caddy" if TARGETS[name].workers == 1 else "caddy2"
            mine, theirs = figures.get("per_core"), row.get(caddy, {}).get("per_core")
            value = mine / theirs if mine and theirs else None
            found.append({"test": test, "target": name, "goal": f"per core >= {caddy_goal}x {caddy}",
                          "value": value, "pass": None if value is None else value >= caddy_goal})
    return found


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


TEST_LABELS = {
    "keepalive": "keep-alive req/s (c{c})",
    "handshake": "new TLS conn/s (c{c})",
    "large": "1 MiB responses MiB/s (c{lc})",
}


def print_table(summary: dict, runs: int, duration: float, connections: int, large_connections: int,
                placement: str) -> None:
    print(f"\nmedians of {runs} run(s), {duration:.0f}s each; cores = server CPU time / wall time "
          f"(whole process tree); {placement}")
    columns = (f"{'figure':>10}{'spread':>8}{'p99 ms':>8}{'cores':>7}{'per core':>10}"
               f"{'x nginx':>9}{'per core':>10}")
    for test in TESTS:
        row = summary.get(test)
        if not row:
            continue
        key = METRICS[test][0]
        digits = ".1f" if key == "mib_per_s" else ".0f"
        header = f"{TEST_LABELS[test].format(c=connections, lc=large_connections):<30}{columns}"
        print()
        print(header)
        print("-" * len(header))
        for name, figures in row.items():
            ratio = figures.get("ratio", {})
            p99 = fmt(figures.get("p99_ms"), ".2f") if test == "keepalive" else ""
            spread = "-" if figures.get("spread") is None else f"{100 * figures['spread']:.0f}%"
            print(f"  {name:<28}{fmt(figures.get(key), digits):>10}{spread:>8}{p99:>8}"
                  f"{fmt(figures.get('server_cores'), '.2f'):>7}{fmt(figures.get('per_core'), digits):>10}"
                  f"{fmt(ratio.get(key), '.3f'):>9}{fmt(ratio.get('per_core'), '.3f'):>10}")
    print("\nspread = (max - min) / median over the runs; per core = median over the runs of figure / cores")
    print("x nginx = ratio to nginx with 1 worker: of the figure, then of the figure per server core")
    loads = []
    for test, row in summary.items():
        parts = [f"{name} {fmt(f.get('client_cores'), '.2f')}/{fmt(f.get('upstream_cores'), '.2f')}"
                 for name, f in row.items()]
        loads.append(f"{test}: " + ", ".join(parts))
    print("wrk/upstream cores while loading each target -- " + "; ".join(loads))
    for test, row in summary.items():
        for name, figures in row.items():
            if figures.get("errors"):
                print(f"warning: {name} {test}: {figures['errors']} socket errors or non-2xx responses")


def print_verdicts(found: list[dict]) -> None:
    if not found:
        return
    print("\ntargets (tlsproxy, issue #17: per server core, against Caddy with as many workers and nginx)")
    for v in found:
        mark = "-" if v["pass"] is None else ("PASS" if v["pass"] else "MISS")
        shown = "-" if v["value"] is None else f"{v['value']:.3f}x"
        print(f"  {v['test']:<10} {v['target']:<22} {v['goal']:<28} {shown:>8}  {mark}")


def tool_versions() -> dict:
    def first_line(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (proc.stdout + proc.stderr).strip().splitlines()[0]
        return "unavailable"

    return {
        "nginx": first_line(["nginx", "-v"]),
        "caddy": first_line(["caddy", "version"]),
        "wrk": first_line(["wrk", "-v"]),
        "openssl": first_line(["openssl", "version"]),
        "python": sys.version.split()[0],
        "tlsproxy_commit": first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per test and target (median taken; default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk test (default 5)")
    parser.add_argument("--quick", action="store_true", help="--runs 1 --duration 3: a smoke run, not figures")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections, keep-alive and handshake tests")
    parser.add_argument("--large-connections", type=int, default=8, help="wrk connections, 1 MiB test (default 8)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma list of targets (default all: {','.join(TARGETS)})")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # older spelling of --targets
    parser.add_argument("--tests", default=",".join(TESTS), help=f"comma list of tests (default {','.join(TESTS)})")
    parser.add_argument("--client-cpu", default="0", help="core for wrk and the upstream ('' = no pinning)")
    parser.add_argument("--server-cpu", default="1", help="core for 1-worker targets ('' = no pinning)")
    parser.add_argument("--server-cpus-wide", default=None,
                        help="cores for 2-worker targets (default: all cores; '' = no pinning)")
    parser.add_argument("--access-log", default=None,
                        help="tlsproxy access_log path (default: a JSON log file in the target's temporary "
                             "folder, as users run it; /dev/null to format lines but write none)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy record the first tlsproxy target during the first keep-alive test "
                             "-> bench/results/profile.svg")
    parser.add_argument("--profile-format", choices=("svg", "txt", "json"), default="svg",
                        help="profile.svg (flamegraph), profile.txt (collapsed stacks) or profile.json (speedscope)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration = 1, 3.0
    args.tests = [t for t in args.tests.split(",") if t]
    if unknown := set(args.tests) - set(TESTS):
        parser.error(f"unknown tests: {', '.join(sorted(unknown))}")
    if args.only:
        args.targets = {"tlsproxy": "tlsproxy-httptools"}.get(args.only, args.only)
    args.targets = [t for t in args.targets.split(",") if t]
    if unknown := set(args.targets) - set(TARGETS):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))} (known: {', '.join(TARGETS)})")
    cpus = os.cpu_count() or 1
    if args.server_cpus_wide is None:
        args.server_cpus_wide = f"0-{cpus - 1}"
    if cpus < 2 or not shutil.which("taskset"):
        args.client_cpu = args.server_cpu = args.server_cpus_wide = ""
    args.client_cpu = args.client_cpu or None
    args.server_cpu = args.server_cpu or None
    args.server_cpus_wide = args.server_cpus_wide or None
    return args


def placement(args: argparse.Namespace) -> str:
    def where(cpu: str | None) -> str:
        return f"core(s) {cpu}" if cpu is not None else "unpinned"

    text = f"wrk + upstream: {where(args.client_cpu)}; 1-worker targets: {where(args.server_cpu)}"
    if any(TARGETS[t].workers > 1 for t in args.targets):
        text += f"; 2-worker targets: {where(args.server_cpus_wide)}"
        if args.server_cpus_wide is not None and args.client_cpu is not None:
            text += " (shared with wrk + upstream)"
    return text


def check_tools(args: argparse.Namespace) -> None:
    missing = [tool for tool in ("nginx", "wrk", "openssl") if not shutil.which(tool)]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (apt-get install -y nginx wrk openssl)")
    if args.profile and not py_spy():
        raise BenchError("--profile needs py-spy on PATH or beside this Python (pip install py-spy)")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_target(target: Target, args: argparse.Namespace, workdir: Path, upstream_port: int,
                 cert: Path, key: Path) -> Server:
    cpu = args.server_cpu if target.workers == 1 else args.server_cpus_wide
    port = free_port()
    prefix = workdir / target.name
    if target.kind == "nginx":
        conf = terminator_nginx_conf(prefix, port, upstream_port, cert, key, target.workers)
        return start_nginx(target.name, prefix, conf, port, cpu)
    if target.kind == "tlsproxy":
        return start_tlsproxy(target.name, prefix, port, upstream_port, cert, key, cpu,
                              args.access_log or str(prefix / "access.log"), target.engine or "auto", target.workers)
    if not shutil.which("caddy"):
        raise BenchError("caddy is not installed (apt-get install -y caddy)")
    return start_caddy(target.name, prefix, port, upstream_port, cert, key, cpu, target.workers)


def finish_run(record: dict, started: float, output: Path, workdir: Path, *, keep: bool) -> None:
    """Write the run's JSON record and remove (or keep) its temporary folder."""
    record["elapsed_s"] = round(time.time() - started, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {output} ({record['elapsed_s']}s)")
    if keep:
        print(f"kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_tools(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-"))
    workdir.chmod(0o755)  # nginx workers under master_process run as another user (nobody)
    servers: dict[str, Server] = {}
    upstream: Server | None = None
    record: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": " ".join(["bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            "runs": args.runs, "duration_s": args.duration, "connections": args.connections,
            "large_connections": args.large_connections, "client_cpu": args.client_cpu,
            "server_cpu": args.server_cpu, "server_cpus_wide": args.server_cpus_wide,
            "placement": placement(args), "tests": args.tests, "targets": args.targets,
            "profile": args.profile, "access_log": args.access_log, "reference": REFERENCE, "goals": GOALS,
        },
        "targets": {name: {"kind": TARGETS[name].kind, "workers": TARGETS[name].workers,
                           "http_engine": TARGETS[name].engine} for name in args.targets},
        "versions": tool_versions(),
        "failures": {},
    }
    try:
        ca_pem, cert, key = make_certificates(workdir)
        large = os.urandom(LARGE_SIZE)
        large_digest = hashlib.sha256(large).digest()
        upstream, upstream_port = start_upstream(workdir, args.client_cpu, {"small": SMALL_BODY, "1m": large})
        for name in args.targets:
            try:
                servers[name] = start_target(TARGETS[name], args, workdir, upstream_port, cert, key)
            except BenchError as exc:
                message = f"{name} failed to start: {exc}"
                print(f"bench: {message}\nbench: continuing without {name}", file=sys.stderr)
                record["failures"][name] = message
        if not servers:
            raise BenchError("no target to benchmark")
        print(placement(args))
        record["checks"] = {}
        for name, server in servers.items():
            record["checks"][name] = {
                "no_session_resumption": check_no_resumption(server, workdir),
                "closes_on_connection_close": check_connection_close(server),
                "large_body_intact": check_large_body(server, large_digest),
            }
            cipher = negotiated_cipher(server)
            record["targets"][name].update(pid=server.pid, cipher=cipher)
            print(f"{name}: pid {server.pid}, {server.url}, {cipher}, checks {record['checks'][name]}")

        script = workdir / "handshake.lua"
        script.write_text(HANDSHAKE_LUA)
        specs = {
            "keepalive": LoadTest("keepalive", "/small", args.connections, latency=True),
            "handshake": LoadTest("handshake", "/small", args.connections, script=script),
            "large": LoadTest("large", "/1m", args.large_connections),
        }
        # Warm up each server (and the upstream's keep-alive pool) before measuring.
        for server in servers.values():
            run_wrk(specs["keepalive"], server, 1, args.client_cpu, upstream)

        raw: dict[str, dict[str, list[dict]]] = {name: {test: [] for test in args.tests} for name in servers}
        profile_to = RESULTS_DIR / f"profile.{args.profile_format}" if args.profile else None
        profiled = next((name for name in servers if TARGETS[name].kind == "tlsproxy"), None)
        for run in range(args.runs):
            order = list(servers) if run % 2 == 0 else list(reversed(servers))
            for test in args.tests:
                for name in order:
                    profile = profile_to if (name == profiled and test == "keepalive" and run == 0) else None
                    if profile is not None:
                        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                    result = run_wrk(specs[test], servers[name], args.duration, args.client_cpu, upstream, profile)
                    raw[name][test].append(result)
                    main_figure = result["mib_per_s"] if test == "large" else result["requests_per_s"]
                    print(f"run {run + 1}/{args.runs} {test:<9} {name:<22} {fmt(main_figure, '.1f'):>10}"
                          f"  cores {result['server_cores']:.2f}  upstream {result['upstream_cores']:.2f}"
                          f"  wrk {result['client_cores']:.2f}",
                          flush=True)
                    if servers[name].proc.poll() is not None:
                        raise BenchError(f"{name} died during the {test} test\n{_tail(servers[name].log)}")
        record["raw"] = raw
        record["summary"] = summarize(raw)
        record["verdicts"] = verdicts(record["summary"])
        print_table(record["summary"], args.runs, args.duration, args.connections, args.large_connections,
                    placement(args))
        print_verdicts(record["verdicts"])
        if "caddy" in servers or "caddy2" in servers:
            print("caddy: session tickets off via JSON (apps.tls.session_tickets.disabled; no Caddyfile "
                  "option in Caddy 2.6) -- see the no_session_resumption check")
        ciphers = {record["targets"][name].get("cipher") for name in servers}
        if len(ciphers) > 1:
            print("note: cipher suites differ -- " + ", ".join(
                f"{name} {record['targets'][name].get('cipher')}" for name in servers))
        for name, checks in record["checks"].items():
            for check, value in checks.items():
                if not (value.get("ok") if isinstance(value, dict) else value):
                    print(f"warning: {name}: check {check} failed: {value}")
        for name, message in record["failures"].items():
            print(f"not measured: {message.splitlines()[0]}")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        record["failures"]["bench"] = str(exc)
        return 1
    finally:
        for server in [*servers.values(), *([upstream] if upstream else [])]:
            server.stop()
        finish_run(record, started, args.output, workdir, keep=args.keep)
    return 0 if not record["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
