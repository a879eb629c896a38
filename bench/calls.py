#!/usr/bin/env python3
"""Function calls per proxied request: the interpreter's work, counted, not timed.

Timing on a shared VM moves by 10 % from one minute to the next; a call count does not.
One run:

1. issues a certificate with our toolkit and starts bench/run.py's nginx upstream (``/small``);
2. starts ``tlsproxy serve`` (this checkout, or ``--tree DIR``'s) inside a small wrapper that
   turns cProfile on at the first SIGUSR2 and off (writing the stats) at the second, so
   start-up and the TLS handshakes of the warm-up are not counted;
3. warms up with wrk (``-c32``, keep-alive), profiles a second wrk load of ``--duration``
   seconds, and divides the calls cProfile saw by the responses wrk counted.

It prints calls per request -- Python functions, and everything (builtins and C methods
included) -- and the functions called most per request; ``--json`` writes the record.
``--profile FILE`` also samples a third load of the same length with py-spy (997 Hz, busy
samples only, collapsed stacks into FILE) and prints its share of samples per category
(bench/categories.py): the same measurement for any tree, before and after a change.
The figure includes the load's own edges (a few of the 32 connections' requests in flight
when profiling starts or stops): a few per thousand.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import categories  # noqa: E402  (bench/categories.py)
import run as bench  # noqa: E402  (bench/run.py: certificates, upstream, configs, wrk)

# Runs ``python -m proxy ARGS`` with cProfile switched on and off by SIGUSR2.
WRAPPER = r"""
import cProfile, signal, sys
from proxy.cli import main
profiler = cProfile.Profile()
state = {"on": False}
stats_path = sys.argv[1]
def toggle(signum, frame):
    if state["on"]:
        profiler.disable()
        profiler.dump_stats(stats_path)
    else:
        profiler.enable()
    state["on"] = not state["on"]
signal.signal(signal.SIGUSR2, toggle)
sys.argv = ["tlsproxy", *sys.argv[2:]]
sys.exit(main())
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="checkout to measure instead of this one")
    parser.add_argument("--engine", default="httptools", choices=("httptools", "h11"))
    parser.add_argument("--duration", type=float, default=3.0, help="seconds profiled (default 3)")
    parser.add_argument("--access-log", default="/dev/null", help="tlsproxy access_log path")
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    parser.add_argument("--json", type=Path, help="write the record here")
    parser.add_argument("--stats", type=Path, help="keep cProfile's stats here (pstats, for self times)")
    parser.add_argument("--profile", type=Path, help="also sample a load with py-spy into this file (raw)")
    return parser.parse_args(argv)


def count(stats_file: Path, requests: int, top: int) -> dict:
    stats = pstats.Stats(str(stats_file)).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    python_calls = sum(nc for (file, _line, _name), (_cc, nc, *_rest) in stats.items() if file != "~")
    all_calls = sum(nc for (_cc, nc, *_rest) in stats.values())
    ranked = sorted(stats.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return {
        "requests": requests,
        "python_calls_per_request": python_calls / requests,
        "all_calls_per_request": all_calls / requests,
        "top": [
            {"function": name if file == "~" else f"{name} ({_short(file)}:{line})", "per_request": nc / requests}
            for (file, line, name), (_cc, nc, *_rest) in ranked
        ],
    }


def _short(file: str) -> str:
    marker = "/proxy/"
    return file[file.rindex(marker) + 1:] if marker in file else Path(file).name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tree = (args.tree or bench.REPO).resolve()
    with tempfile.TemporaryDirectory(prefix="tlsproxy-calls-") as tmp:
        workdir = Path(tmp)
        _ca, cert, key = bench.make_certificates(workdir)
        upstream, upstream_port = bench.start_upstream(workdir, None, {"small": bench.SMALL_BODY})
        port = bench.free_port()
        config = workdir / "tlsproxy.yaml"
        config.write_text(bench.tlsproxy_yaml(port, upstream_port, cert, key, args.access_log, args.engine, 1))
        stats_file = workdir / "profile.pstats"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        argv_ = [sys.executable, "-c", WRAPPER, str(stats_file), "serve", "-c", str(config)]
        server = bench.start_logged("tlsproxy (profiled)", "tlsproxy", workdir, workdir / "tlsproxy.log", argv_,
                                    port, env)
        try:
            url = f"https://127.0.0.1:{port}/small"
            subprocess.run(["wrk", "-t1", "-c32", "-d1", url], capture_output=True, check=True, timeout=30)
            os.kill(server.pid, signal.SIGUSR2)
            time.sleep(0.2)  # (the handler runs at the loop's next turn: let it)
            out = subprocess.run(["wrk", "-t1", "-c32", f"-d{args.duration:g}", url], capture_output=True,
                                 text=True, check=True, timeout=args.duration + 30).stdout
            os.kill(server.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not stats_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # dump_stats writes in one go; let it finish
            if not stats_file.exists():
                raise bench.BenchError(f"no profile written:\n{bench._tail(workdir / 'tlsproxy.log')}")
            requests = bench.parse_wrk(out)["requests"]
            sampled = sample(server.pid, url, args.duration, args.profile) if args.profile else 0
            if args.stats:
                args.stats.write_bytes(stats_file.read_bytes())
            record = {"tree": str(tree), "engine": args.engine, **count(stats_file, requests, args.top)}
            if args.profile:
                shares, samples = categories.categorize(args.profile.read_text(errors="replace").splitlines())
                record["profile"] = {"requests": sampled, "samples": samples,
                                     "samples_per_1000_requests": {name: 1000 * n / sampled for name, n in shares.items()}}
        finally:
            server.stop()
            upstream.stop()
    print(f"{record['tree']} ({args.engine}): {record['requests']} requests profiled")
    print(f"  Python function calls per request: {record['python_calls_per_request']:.1f}")
    print(f"  all calls per request (builtins and C methods too): {record['all_calls_per_request']:.1f}")
    for entry in record["top"]:
        print(f"  {entry['per_request']:6.2f}  {entry['function']}")
    if args.profile:
        profile = record["profile"]
        print(f"  py-spy (997 Hz, busy samples): {profile['samples']} samples over {profile['requests']} requests; "
              "per category, share and samples per 1,000 requests:")
        per_request = profile["samples_per_1000_requests"]
        total = sum(per_request.values())
        for name, value in sorted(per_request.items(), key=lambda item: -item[1]):
            print(f"    {name:<36} {100 * value / total:5.1f}%  {value:6.1f}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def sample(pid: int, url: str, duration: float, output: Path) -> int:
    """py-spy on ``pid`` while wrk loads it (the profiler off: cProfile's toggle is even);
    the responses wrk counted meanwhile."""
    spy = bench.py_spy()
    if spy is None:
        raise bench.BenchError("--profile needs py-spy on PATH or beside this Python (pip install py-spy)")
    seconds = max(1, round(duration))
    profiler = subprocess.Popen([spy, "record", "--rate", "997", "--format", "raw", "-o", str(output), "--pid",
                                 str(pid), "--duration", str(seconds)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
    time.sleep(0.5)  # (py-spy attaches)
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}", url], capture_output=True, text=True, check=True,
                         timeout=seconds + 30).stdout
    profiler.wait(timeout=60)
    return bench.parse_wrk(out)["requests"]


if __name__ == "__main__":
    sys.exit(main())
