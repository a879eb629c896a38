#!/usr/bin/env python3
"""Unary gRPC calls through tlsproxy against the same calls made directly, per server core.

(Not bench/grpc.py: a script there would shadow the grpc package for itself and its load
generator.) Why: gRPC is what "mTLS between test components" mostly carries, so the question a user asks
is what the proxy costs per call. Two targets, loaded one at a time with the same fixed
number of calls (bench/grpc_unary_load.py: grpc.aio, one channel, ``--concurrency`` calls at once):

- ``direct``: client -> the gRPC server (examples/grpc_echo_server.py, insecure h2c);
- ``through``: client over TLS 1.3 -> ``tlsproxy serve`` (``h2c://`` upstream) -> a second,
  identical gRPC server.

The measured server (the direct gRPC server, or tlsproxy) runs alone on ``--server-cpu`` (core
1); the client and the upstream gRPC server share ``--client-cpu`` (core 0), as bench/run.py
places wrk and its upstream. Each run reads CPU time from /proc (bench/run.py's accounting)
and gives calls/s, **calls per second of the measured server's CPU** (per core), the
measured server's CPU per call, and for ``through`` the upstream gRPC server's CPU per call
too. Medians over ``--runs`` (default 3), in alternating order; bench/results/grpc.json.

    .venv/bin/python bench/grpc_unary.py                     # ~1 minute with the defaults
    .venv/bin/python bench/grpc_unary.py --calls 2000 --runs 1   # a smoke run, not figures

Needs grpcio (``pip install -e '.[test]'``) and, for pinning, taskset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: certificates, servers, pinning, /proc CPU time)

REPO = bench.REPO
SERVER_SCRIPT = REPO / "examples" / "grpc_echo_server.py"
LOAD_SCRIPT = Path(__file__).resolve().parent / "grpc_unary_load.py"
RESULTS = bench.RESULTS_DIR / "grpc.json"
TARGETS = ("direct", "through")


def start_grpc_server(name: str, workdir: Path, cpu: str | None) -> bench.Server:
    port = bench.free_port()
    folder = workdir / name
    folder.mkdir()
    argv = bench.pinned(cpu, [sys.executable, str(SERVER_SCRIPT), "--listen", f"127.0.0.1:{port}"])
    return bench.start_logged(f"{name} (grpc echo server)", name, folder, folder / "server.log", argv, port, None)


def run_load(target: str, ca: Path | None, calls: int, concurrency: int, cpu: str | None) -> dict:
    argv = [sys.executable, str(LOAD_SCRIPT), "--target", target, "--calls", str(calls),
            "--concurrency", str(concurrency), *(["--ca", str(ca)] if ca else [])]
    proc = subprocess.run(bench.pinned(cpu, argv), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise bench.BenchError(f"load on {target} failed: {(proc.stderr or proc.stdout)[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(measured: bench.Server, upstream: bench.Server | None, target: str, ca: Path | None,
            args: argparse.Namespace) -> dict:
    """One run against one target: the load's figures and the CPU the servers spent on it."""
    before = bench.cpu_seconds(measured.pid), bench.cpu_seconds(upstream.pid) if upstream else 0.0
    result = run_load(target, ca, args.calls, args.concurrency, args.client_cpu)
    server_cpu = bench.cpu_seconds(measured.pid) - before[0]
    upstream_cpu = (bench.cpu_seconds(upstream.pid) - before[1]) if upstream else None
    done = result["calls"] - result["errors"]
    result.update(
        calls_per_s=done / result["wall_s"],
        server_cpu_s=server_cpu,
        calls_per_server_cpu_s=done / server_cpu if server_cpu > 0 else None,
        server_us_per_call=1e6 * server_cpu / done if done else None,
        upstream_us_per_call=1e6 * upstream_cpu / done if upstream_cpu is not None and done else None,
    )
    return result


SUMMARY_KEYS = ("calls_per_s", "calls_per_server_cpu_s", "server_us_per_call", "upstream_us_per_call")


def summarize(raw: dict[str, list[dict]]) -> dict:
    summary = {}
    for name, runs in raw.items():
        row = {key: bench.median_or_none([run.get(key) for run in runs]) for key in SUMMARY_KEYS}
        figures = [run["calls_per_s"] for run in runs]
        row["spread"] = (max(figures) - min(figures)) / row["calls_per_s"] if len(figures) > 1 else None
        row["errors"] = sum(run["errors"] for run in runs)
        summary[name] = row
    if all(name in summary for name in TARGETS):
        direct, through = summary["direct"], summary["through"]
        summary["through/direct"] = {
            key: through[key] / direct[key] if through[key] and direct[key] else None
            for key in ("calls_per_s", "calls_per_server_cpu_s")
        }
    return summary


def print_table(summary: dict, args: argparse.Namespace) -> None:
    print(f"\nunary gRPC calls, {args.calls} per run, {args.concurrency} at once, 100-byte messages; "
          f"medians of {args.runs} run(s)")
    header = f"{'':<10}{'calls/s':>10}{'spread':>8}{'per core':>10}{'server us/call':>16}{'upstream us/call':>18}"
    print(header + "\n" + "-" * len(header))
    for name in TARGETS:
        row = summary.get(name)
        if row:
            spread = "-" if row["spread"] is None else f"{100 * row['spread']:.0f}%"
            print(f"{name:<10}{bench.fmt(row['calls_per_s']):>10}{spread:>8}{bench.fmt(row['calls_per_server_cpu_s']):>10}"
                  f"{bench.fmt(row['server_us_per_call']):>16}{bench.fmt(row['upstream_us_per_call']):>18}")
    ratio = summary.get("through/direct")
    if ratio:
        print(f"through/direct: calls/s {bench.fmt(ratio['calls_per_s'], '.2f')}x, "
              f"per core {bench.fmt(ratio['calls_per_server_cpu_s'], '.2f')}x")
    print("per core = calls per CPU second of the measured server (direct: the gRPC server; through: "
          "tlsproxy); server us/call = its CPU per call; upstream = the gRPC server behind tlsproxy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10000, help="calls per run (default 10000)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    parser.add_argument("--runs", type=int, default=3, help="runs per target, median taken (default 3)")
    parser.add_argument("--client-cpu", default="0", help="core for the client and the upstream ('' = no pinning)")
    parser.add_argument("--server-cpu", default="1", help="core for the measured server ('' = no pinning)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        args.client_cpu = args.server_cpu = ""
    args.client_cpu, args.server_cpu = args.client_cpu or None, args.server_cpu or None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import grpc  # noqa: F401  (the servers and the load need it)
    except ImportError:
        print("bench: grpcio is not installed (pip install -e '.[test]')", file=sys.stderr)
        return 1
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-grpc-"))
    servers: list[bench.Server] = []
    record: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": " ".join(["bench/grpc_unary.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"calls": args.calls, "concurrency": args.concurrency, "runs": args.runs,
                     "client_cpu": args.client_cpu, "server_cpu": args.server_cpu},
        "versions": bench.tool_versions(),
        "failures": {},
    }
    try:
        ca_pem, cert, key = bench.make_certificates(workdir)
        direct = start_grpc_server("direct-grpc", workdir, args.server_cpu)
        upstream = start_grpc_server("upstream-grpc", workdir, args.client_cpu)
        servers += [direct, upstream]
        proxy = bench.start_tlsproxy("through-tlsproxy", workdir / "tlsproxy", bench.free_port(), upstream.port,
                                     cert, key, args.server_cpu, "/dev/null", "auto", upstream_scheme="h2c")
        servers.append(proxy)
        plan = {
            "direct": (direct, None, f"127.0.0.1:{direct.port}", None),
            "through": (proxy, upstream, f"localhost:{proxy.port}", ca_pem),
        }
        print(f"client + upstream gRPC server: core {args.client_cpu}; measured server: core {args.server_cpu}")
        for name, (measured, behind, target, ca) in plan.items():  # warm-up
            run_load(target, ca, min(1000, args.calls), args.concurrency, args.client_cpu)
        raw: dict[str, list[dict]] = {name: [] for name in plan}
        for run in range(args.runs):
            for name in (list(plan) if run % 2 == 0 else list(reversed(plan))):
                result = measure(*plan[name], args)
                raw[name].append(result)
                print(f"run {run + 1}/{args.runs} {name:<8} {result['calls_per_s']:8.0f} calls/s  "
                      f"{bench.fmt(result['calls_per_server_cpu_s']):>6} per server CPU s  errors {result['errors']}",
                      flush=True)
        record["raw"] = raw
        record["summary"] = summarize(raw)
        print_table(record["summary"], args)
    except bench.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        record["failures"]["bench"] = str(exc)
        return 1
    finally:
        for server in servers:
            server.stop()
        bench.finish_run(record, started, args.output, workdir, keep=False)
    return 0 if not record["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
