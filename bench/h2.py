#!/usr/bin/env python3
"""HTTP/2 to clients: tlsproxy against nginx and Caddy under h2load, per server core.

One run of this script, with bench/run.py's machinery (certificates, the nginx upstream,
starting and stopping servers, CPU time of each server's process tree):

1. starts the upstream (nginx, plain HTTP/1.1: ``/small`` and ``/1m``) and three targets
   offering ``h2`` and ``http/1.1`` by ALPN, TLS 1.3 only, without session resumption:
   nginx (1 process, ``listen ... ssl http2``), ``tlsproxy serve`` (httptools engine,
   1 worker, the default ``tls.alpn``) and Caddy (GOMAXPROCS=1, h2 by default);
2. checks each answers over h2 (h2load reports the negotiated protocol) and relays
   ``/1m`` byte for byte over h2 (curl --http2);
3. loads each, one target at a time, alternating the order, ``--runs`` times:
   - ``h2-small``: ``h2load -c32 -m10`` on ``/small`` (32 connections, 10 streams each),
   - ``h2-large``: ``h2load -c8 -m1`` on ``/1m`` (1 MiB response streams),
   - ``h1-keepalive``: ``wrk -c32`` on ``/small`` over HTTP/1.1 keep-alive (same
     process, same run: the figure tlsproxy's h2 is held against);
4. prints medians per target and test, per server core, the ratios (tlsproxy h2 per core
   to its own HTTP/1.1 keep-alive per core -- the target is >= 0.5 -- and to nginx and
   Caddy over h2), and writes everything to bench/results/h2.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402 - bench/run.py, beside this file

TARGETS = {"nginx": run.Target("nginx", "nginx", 1), "tlsproxy": run.Target("tlsproxy", "tlsproxy", 1, "httptools"),
           "caddy": run.Target("caddy", "caddy", 1)}
TESTS = ("h2-small", "h2-large", "h1-keepalive")
GOAL_H2_TO_H1 = 0.5  # tlsproxy h2 small requests per core / its HTTP/1.1 keep-alive per core


def parse_h2load(text: str) -> dict:
    result: dict = {"requests_per_s": None, "succeeded": None, "failed": None, "protocol": None}
    if m := re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text):
        result["requests_per_s"] = float(m.group(1))
    if m := re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                      text):
        result["succeeded"], failed, errored = map(int, m.groups())
        result["failed"] = failed + errored
    if m := re.search(r"Application protocol: (\S+)", text):
        result["protocol"] = m.group(1)
    return result


def run_h2load(server: run.Server, upstream: run.Server, path: str, clients: int, streams: int,
               duration: float, cpu: str | None, profile_to: Path | None = None) -> dict:
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{max(1, round(duration))}", server.url + path]
    profiler = None
    if profile_to is not None:
        profiler = subprocess.Popen(
            [run.py_spy() or "py-spy", "record", "--format", run.PROFILE_FORMATS[profile_to.suffix],
             "-o", str(profile_to), "--pid", str(server.pid), "--duration", str(max(1, round(duration)))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc, cores = run.measure_load(argv, server, upstream, cpu, duration + 60)
    result = parse_h2load(proc.stdout)
    result.update(cores, exit=proc.returncode)
    if path == "/1m" and result["requests_per_s"] is not None:
        result["mib_per_s"] = result["requests_per_s"] * run.LARGE_SIZE / (1 << 20)
    if proc.returncode != 0 or result["requests_per_s"] is None:
        result["output"] = (proc.stdout + proc.stderr)[-2000:]
    if profiler is not None:
        out, _ = profiler.communicate(timeout=60)
        result["profile"] = {"exit": profiler.returncode, "output": out.decode(errors="replace")[-1000:]}
    return result


def check_h2(server: run.Server, upstream: run.Server, digest: bytes, ca: Path) -> dict:
    """One h2load request negotiates h2; /1m arrives whole over HTTP/2 (curl)."""
    probe = run_h2load(server, upstream, "/small", 1, 1, 1, None)
    curl = subprocess.run(["curl", "-sS", "--http2", "--cacert", str(ca), "--resolve",
                           f"localhost:{server.port}:127.0.0.1", "-w", "%{http_version}", "-o", "-",
                           f"https://localhost:{server.port}/1m"], capture_output=True, timeout=60)
    body, version = curl.stdout[:-1], curl.stdout[-1:]
    return {"protocol": probe["protocol"], "ok": probe["protocol"] == "h2" and version == b"2"
            and hashlib.sha256(body).digest() == digest}


def figure(test: str) -> str:
    return "mib_per_s" if test == "h2-large" else "requests_per_s"


def summarize(raw: dict) -> dict:
    summary: dict = {}
    for name, tests in raw.items():
        for test, runs in tests.items():
            key = figure(test)
            values = [r[key] for r in runs if r.get(key)]
            per_core = [r[key] / r["server_cores"] for r in runs if r.get(key) and r["server_cores"] > 0.01]
            summary.setdefault(test, {})[name] = {
                key: statistics.median(values) if values else None,
                "server_cores": statistics.median(r["server_cores"] for r in runs),
                "per_core": statistics.median(per_core) if per_core else None,
                "runs_per_core": per_core,
                "errors": sum((r.get("failed") or 0) + sum((r.get("errors") or {}).values()) + r.get("non_2xx", 0)
                              for r in runs),
            }
    return summary


def ratios(summary: dict) -> dict:
    def per_core(test: str, name: str) -> float | None:
        return summary.get(test, {}).get(name, {}).get("per_core")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    found = {}
    mine = per_core("h2-small", "tlsproxy")
    found["tlsproxy h2 / tlsproxy h1 keep-alive (small, per core)"] = ratio(mine, per_core("h1-keepalive", "tlsproxy"))
    for other in ("nginx", "caddy"):
        found[f"tlsproxy h2 / {other} h2 (small, per core)"] = ratio(mine, per_core("h2-small", other))
        found[f"tlsproxy h2 / {other} h2 (1 MiB, per core)"] = ratio(per_core("h2-large", "tlsproxy"),
                                                                     per_core("h2-large", other))
    return found


def print_summary(summary: dict, found: dict, args: argparse.Namespace) -> None:
    print(f"\nmedians of {args.runs} run(s), {args.duration:.0f}s each; per core = figure / server cores")
    labels = {"h2-small": f"h2 small req/s (h2load -c{args.clients} -m{args.streams})",
              "h2-large": f"h2 1 MiB MiB/s (h2load -c{args.large_clients} -m1)",
              "h1-keepalive": f"h1 keep-alive req/s (wrk -c{args.clients})"}
    for test in TESTS:
        row = summary.get(test)
        if not row:
            continue
        header = f"{labels[test]:<44}{'figure':>10}{'cores':>7}{'per core':>10}"
        print(f"\n{header}\n{'-' * len(header)}")
        for name, f in row.items():
            print(f"  {name:<42}{run.fmt(f[figure(test)], '.1f'):>10}{run.fmt(f['server_cores'], '.2f'):>7}"
                  f"{run.fmt(f['per_core'], '.0f'):>10}" + (f"  errors {f['errors']}" if f["errors"] else ""))
    print("\nratios")
    for label, value in found.items():
        verdict = ""
        if label.startswith("tlsproxy h2 / tlsproxy h1") and value is not None:
            verdict = "  PASS" if value >= GOAL_H2_TO_H1 else "  MISS"
            verdict += f" (target >= {GOAL_H2_TO_H1})"
        print(f"  {label:<56}{run.fmt(value, '.3f'):>8}{verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per test and target (median taken; default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load test (default 5)")
    parser.add_argument("--quick", action="store_true", help="--runs 1 --duration 3: a smoke run, not figures")
    parser.add_argument("--clients", type=int, default=32, help="connections, small requests (default 32)")
    parser.add_argument("--streams", type=int, default=10, help="h2load streams per connection (default 10)")
    parser.add_argument("--large-clients", type=int, default=8, help="connections, 1 MiB responses (default 8)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma list (default nginx,tlsproxy,caddy)")
    parser.add_argument("--tests", default=",".join(TESTS), help=f"comma list (default {','.join(TESTS)})")
    parser.add_argument("--client-cpu", default="0", help="core for h2load/wrk and the upstream ('' = no pinning)")
    parser.add_argument("--server-cpu", default="1", help="core for the targets ('' = no pinning)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy record tlsproxy during its first --profile-test run "
                             "-> bench/results/h2-profile.svg")
    parser.add_argument("--profile-test", choices=("h2-small", "h2-large"), default="h2-small")
    parser.add_argument("--profile-format", choices=("svg", "txt", "json"), default="svg")
    parser.add_argument("--output", type=Path, default=run.RESULTS_DIR / "h2.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration = 1, 3.0
    args.targets = [t for t in args.targets.split(",") if t]
    args.tests = [t for t in args.tests.split(",") if t]
    if unknown := (set(args.targets) - set(TARGETS)) | (set(args.tests) - set(TESTS)):
        parser.error(f"unknown targets or tests: {', '.join(sorted(unknown))}")
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        args.client_cpu = args.server_cpu = ""
    args.client_cpu, args.server_cpu = args.client_cpu or None, args.server_cpu or None
    args.server_cpus_wide = args.server_cpu  # run.start_target's name for multi-worker targets (none here)
    args.access_log = "/dev/null"
    return args


def start_target(target: run.Target, args: argparse.Namespace, workdir: Path, upstream_port: int,
                 cert: Path, key: Path) -> run.Server:
    if target.kind != "nginx":  # tlsproxy offers h2 by default, Caddy too
        return run.start_target(target, args, workdir, upstream_port, cert, key)
    port = run.free_port()
    prefix = workdir / target.name
    conf = run.terminator_nginx_conf(prefix, port, upstream_port, cert, key, target.workers, http2=True)
    return run.start_nginx(target.name, prefix, conf, port, args.server_cpu)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("nginx", "h2load", "wrk", "curl") if not shutil.which(tool)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (apt-get install -y nginx nghttp2-client wrk curl)",
              file=sys.stderr)
        return 1
    if args.profile and not run.py_spy():
        print("bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 1
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-h2-"))
    workdir.chmod(0o755)
    servers: dict[str, run.Server] = {}
    upstream = None
    record: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "command": " ".join(["bench/h2.py", *(sys.argv[1:] if argv is None else argv)]),
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "versions": {**run.tool_versions(), "h2load": _first_line(["h2load", "--version"])},
                    "failures": {}}
    try:
        ca_pem, cert, key = run.make_certificates(workdir)
        large = os.urandom(run.LARGE_SIZE)
        digest = hashlib.sha256(large).digest()
        upstream, upstream_port = run.start_upstream(workdir, args.client_cpu, {"small": run.SMALL_BODY, "1m": large})
        for name in args.targets:
            try:
                servers[name] = start_target(TARGETS[name], args, workdir, upstream_port, cert, key)
            except run.BenchError as exc:
                print(f"bench: {name} failed to start: {exc}", file=sys.stderr)
                record["failures"][name] = str(exc)
        if not servers:
            raise run.BenchError("no target to benchmark")
        record["checks"] = {name: check_h2(server, upstream, digest, ca_pem) for name, server in servers.items()}
        for name, check in record["checks"].items():
            print(f"{name}: pid {servers[name].pid}, {servers[name].url}, check {check}")
        for server in servers.values():  # warm up (and fill the upstream keep-alive pools)
            run_h2load(server, upstream, "/small", args.clients, args.streams, 1, args.client_cpu)
        wrk_spec = run.LoadTest("keepalive", "/small", args.clients)
        raw: dict = {name: {test: [] for test in args.tests} for name in servers}
        profile_to = run.RESULTS_DIR / f"h2-profile.{args.profile_format}" if args.profile else None
        for n in range(args.runs):
            order = list(servers) if n % 2 == 0 else list(reversed(servers))
            for test in args.tests:
                for name in order:
                    server = servers[name]
                    if test == "h1-keepalive":
                        result = run.run_wrk(wrk_spec, server, args.duration, args.client_cpu, upstream)
                    else:
                        small = test == "h2-small"
                        profile = profile_to if (test == args.profile_test and name == "tlsproxy" and n == 0) else None
                        if profile is not None:
                            profile.parent.mkdir(parents=True, exist_ok=True)
                        result = run_h2load(server, upstream, "/small" if small else "/1m",
                                            args.clients if small else args.large_clients,
                                            args.streams if small else 1, args.duration, args.client_cpu, profile)
                    raw[name][test].append(result)
                    print(f"run {n + 1}/{args.runs} {test:<13} {name:<9} {run.fmt(result.get(figure(test)), '.1f'):>9}"
                          f"  cores {result['server_cores']:.2f}  upstream {result['upstream_cores']:.2f}"
                          f"  client {result['client_cores']:.2f}", flush=True)
                    if server.proc.poll() is not None:
                        raise run.BenchError(f"{name} died during {test}")
        record["raw"] = raw
        record["summary"] = summarize(raw)
        record["ratios"] = ratios(record["summary"])
        print_summary(record["summary"], record["ratios"], args)
        for name, check in record["checks"].items():
            if not check["ok"]:
                print(f"warning: {name}: h2 check failed: {check}")
    except run.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        record["failures"]["bench"] = str(exc)
        return 1
    finally:
        for server in [*servers.values(), *([upstream] if upstream else [])]:
            server.stop()
        run.finish_run(record, started, args.output, workdir, keep=args.keep)
    return 0 if not record["failures"] else 1


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unavailable"


if __name__ == "__main__":
    sys.exit(main())
