#!/usr/bin/env python3
"""Share of profile samples per category, from py-spy's collapsed stacks.

    .venv/bin/python bench/run.py --targets tlsproxy-httptools --tests keepalive --profile --profile-format txt
    .venv/bin/python bench/categories.py bench/results/profile.txt

Each sample goes to the category of its innermost frame that belongs to a category
(the frame running when it was taken: a sample inside ``ssl.py`` called by the TLS
channel is TLS). The categories are by module, so a before/after pair of profiles shows
where a change moved the time, not just that it did. py-spy samples Python frames: time
in C code (OpenSSL, the kernel's send/recv, uvloop) is charged to the Python frame that
called it, and samples with no Python frame are uvloop's own loop (``event loop``).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

# (category, module path fragments), first match wins, checked innermost frame first.
CATEGORIES = (
    ("TLS (handshake, records, ssl.py)", ("proxy/server/tls_channel.py", "proxy/server/tls_accept.py", "/ssl.py",
                                          "proxy/tls/")),
    ("HTTP parsing and framing", ("proxy/http/",)),
    ("routing and headers", ("proxy/forwarding/",)),
    ("access log and metrics", ("proxy/server/access_log.py", "proxy/server/metrics.py")),
    ("channel I/O (reads, writes, sends)", ("proxy/server/channel.py",)),
    ("upstream pool", ("proxy/server/upstream_pool.py",)),
    ("request loop and relay", ("proxy/server/connection.py", "proxy/server/request.py", "proxy/server/relay.py",
                                "proxy/server/downstream.py",
                                "proxy/server/body_pump.py", "proxy/server/h2_")),
    ("event loop (uvloop, asyncio)", ("asyncio/", "runners.py", "uvloop")),
)
OTHER = "other"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def categorize(lines: list[str]) -> tuple[collections.Counter, int]:
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        stack, _, number = line.rstrip().rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        counts[_category(stack.split(";"))] += samples
    return counts, total


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        file = match.group("file") if match else frame
        for name, fragments in CATEGORIES:
            if any(fragment in file for fragment in fragments):
                return name
    return OTHER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", help="py-spy raw (collapsed stack) files; several: side by side")
    args = parser.parse_args(argv)
    results = []
    for path in args.profiles:
        with open(path, encoding="utf-8", errors="replace") as file:
            results.append(categorize(file.readlines()))
    names = [name for name, _ in CATEGORIES] + [OTHER]
    width = max(map(len, names))
    print(" " * width + "".join(f"  {path[-24:]:>24}" for path in args.profiles))
    for name in names:
        print(f"{name:<{width}}" + "".join(f"  {100 * counts[name] / total if total else 0:23.1f}%"
                                           for counts, total in results))
    print(f"{'samples':<{width}}" + "".join(f"  {total:>24}" for _counts, total in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
