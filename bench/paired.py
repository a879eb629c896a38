#!/usr/bin/env python3
"""Paired A/B: is this tree faster than another one, or than Caddy? Measured at the same moment.

Why: this VM's speed drifts by up to 2x between two runs of identical code (shared
host), so "run.py before, run.py after" cannot show a 5 % change. Here nginx (the
reference), tlsproxy from this tree (A) and tlsproxy from ``--b-tree`` (B) run at the same
time, all three pinned to the same core, each loaded by its own wrk (all on the other
core) for the same seconds: whatever the host does, it does to all three. Per round, each
server's figure is completed requests (keep-alive) or connections (handshake) per second
of its own CPU time; the script prints each round and the medians of A/nginx, B/nginx and
A/B. An A/A run (``--b-tree`` = a checkout of the same commit) gave A/B = 1.004.

    git worktree add /tmp/base <commit>            # the tree to compare against
    .venv/bin/python bench/paired.py --b-tree /tmp/base --test keepalive

``--caddy`` adds Caddy (GOMAXPROCS=1) to the same core, and A/caddy to the medians: when
both saturate a core (as in run.py), requests per CPU second is what decides whose
req/s is higher, and measured together it is free of the drift that flips run.py's
"above Caddy" verdict from one run to the next. ``--b-tree`` may then be left out.

The absolute ratios are lower than run.py's (the servers share one core); only servers
measured together compare. Results: bench/results/paired.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: certificates, configs, servers, /proc)

RESULTS = bench.RESULTS_DIR / "paired.json"
# test: (path, wrk connections) -- run.py's figures for the same tests
LOADS = {"keepalive": ("/small", 32), "handshake": ("/small", 32), "large": ("/1m", 8)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b-tree", type=Path, help="checkout of the tree to compare against (B)")
    parser.add_argument("--b-python", help="the interpreter B runs on (default: this one): with --b-tree, or "
                                           "alone to compare interpreters on this tree (e.g. a PGO/LTO build)")
    parser.add_argument("--caddy", action="store_true", help="measure Caddy (GOMAXPROCS=1) at the same moment too")
    parser.add_argument("--test", choices=tuple(LOADS), default="keepalive",
                        help="keepalive: GET /small on 32 connections; handshake: a new TLS connection per "
                             "request; large: GET of a 1 MiB body on 8 connections, as in run.py")
    parser.add_argument("--rounds", type=int, default=8, help="rounds (median taken; default 8)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per round (default 5)")
    parser.add_argument("--server-cpu", default="1", help="core for the servers")
    parser.add_argument("--client-cpu", default="0", help="core for the wrk processes and the upstream")
    parser.add_argument("--access-log", default=None,
                        help="tlsproxy access_log path (default: a JSON log file per tree in the temporary folder)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.b_tree is None and not args.caddy and not args.b_python:
        parser.error("nothing to compare with: give --b-tree, --b-python, --caddy or both")
    if args.b_tree is not None and not (args.b_tree / "proxy" / "__init__.py").is_file():
        parser.error(f"{args.b_tree} has no proxy/ package (a checkout of this repository is needed)")
    return args


def measure_round(servers: dict[str, bench.Server], args: argparse.Namespace, script: Path | None) -> dict[str, float]:
    """One round: every server loaded at once; completed requests per server CPU second."""
    cpu_before = {name: bench.cpu_seconds(server.pid) for name, server in servers.items()}
    extra = ["-s", str(script)] if script is not None else []
    path, connections = LOADS[args.test]
    loads = {
        name: subprocess.Popen(
            bench.pinned(args.client_cpu, ["wrk", "-t1", f"-c{connections}", f"-d{args.duration}s", *extra, server.url + path]),
            stdout=subprocess.PIPE, text=True,
        )
        for name, server in servers.items()
    }
    outputs = {name: load.communicate(timeout=args.duration + 60)[0] for name, load in loads.items()}
    figures = {}
    for name, server in servers.items():
        done = (bench.parse_wrk(outputs[name])["requests_per_s"] or 0.0) * args.duration
        cpu = bench.cpu_seconds(server.pid) - cpu_before[name]
        if cpu <= 0 or not done:  # (a /proc tick short, or wrk failed: a round that measured nothing)
            raise bench.BenchError(f"{name}: no CPU time or no responses counted in this round")
        figures[name] = done / cpu
    return figures


def _pairs(servers: dict[str, bench.Server]) -> list[tuple[str, tuple[str, str]]]:
    """The ratios to report: A/nginx first, then A/B, B/nginx, A/caddy (those measured)."""
    wanted = [("A", "nginx"), ("A", "B"), ("B", "nginx"), ("A", "caddy")]
    return [(f"{a}/{b}", (a, b)) for a, b in wanted if a in servers and b in servers]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="tlsproxy-paired-"))
    workdir.chmod(0o755)
    _ca, cert, key = bench.make_certificates(workdir)
    upstream, upstream_port = bench.start_upstream(workdir, args.client_cpu, {"small": bench.SMALL_BODY, "1m": os.urandom(bench.LARGE_SIZE)})
    servers: dict[str, bench.Server] = {}
    script = None
    if args.test == "handshake":
        script = workdir / "handshake.lua"
        script.write_text(bench.HANDSHAKE_LUA)
    rounds: list[dict[str, float]] = []
    try:
        port = bench.free_port()
        servers["nginx"] = bench.start_nginx(
            "nginx", workdir / "nginx", bench.terminator_nginx_conf(workdir / "nginx", port, upstream_port, cert, key),
            port, args.server_cpu)
        trees = {"A": None}
        if args.b_tree is not None or args.b_python:
            trees["B"] = args.b_tree.resolve() if args.b_tree is not None else bench.REPO
        for name, tree in trees.items():
            servers[name] = bench.start_tlsproxy(name, workdir / name, bench.free_port(), upstream_port, cert, key,
                                                 args.server_cpu, args.access_log or str(workdir / name / "access.log"),
                                                 "httptools", python_path=tree,
                                                 python=args.b_python if name == "B" else None)
        if args.caddy:
            servers["caddy"] = bench.start_caddy("caddy", workdir / "caddy", bench.free_port(), upstream_port,
                                                 cert, key, args.server_cpu, procs=1)
        try:
            measure_round(servers, argparse.Namespace(**{**vars(args), "duration": 1}), script)  # warm-up
        except bench.BenchError:
            pass  # (a warm-up that measured nothing warmed up all the same)
        for number in range(1, args.rounds + 1):
            try:
                figures = measure_round(servers, args, script)
            except bench.BenchError as exc:
                print(f"round {number}: left out ({exc})", flush=True)
                continue
            rounds.append(figures)
            print(f"round {number}: " + "  ".join(f"{name} {value:,.0f}" for name, value in figures.items())
                  + "".join(f"  {pair} {figures[a] / figures[b]:.3f}" for pair, (a, b) in _pairs(servers)[1:]),
                  flush=True)
    finally:
        for server in [*servers.values(), upstream]:
            server.stop()
    ratios = {pair: statistics.median(r[a] / r[b] for r in rounds) for pair, (a, b) in _pairs(servers)}
    unit = "connections" if args.test == "handshake" else "requests"
    print(f"medians over {len(rounds)} rounds x {args.duration}s ({unit} per server CPU second): "
          + "  ".join(f"{name} {value:.3f}" for name, value in ratios.items()))
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": " ".join(["bench/paired.py", *(sys.argv[1:] if argv is None else argv)]),
        "a_tree": str(bench.REPO), "b_tree": str(args.b_tree.resolve()) if args.b_tree else None,
        "a_python": sys.executable, "b_python": args.b_python or sys.executable, "test": args.test,
        "rounds": rounds, "medians": ratios,
    }
    bench.finish_run(record, started, args.output, workdir, keep=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
