"""Command-line entry point: argument parsing only.

Each command group lives beside the code it drives and contributes its own
sub-parser through an ``add_parser(subparsers)`` function that sets ``func``;
``func(args)`` returns the exit code. Errors from our exception tree become a
one-line message and their exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from proxy import __version__
from proxy.errors import ConfigErrors, TlsProxyError

# Modules that each add one top-level command (imported lazily by main()).
COMMAND_MODULES = (
    "proxy.pki.commands",  # certs ...
    "proxy.server.commands",  # serve
    "proxy.check.commands",  # check
    "proxy.ops.health",  # health
    "proxy.echo",  # echo
    "proxy.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsproxy",
        description="TLS-terminating reverse proxy with mutual TLS, and a certificate toolkit.",
    )
    parser.add_argument("--version", action="version", version=f"tlsproxy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # command not built yet
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a reader that went away is noticed in this try
        return code
    except TlsProxyError as exc:
        # ConfigErrors: one error a line; other errors: the error, then lines saying how to go on
        first, *rest = str(exc).splitlines() or [""]
        print(f"tlsproxy: error: {first}", file=sys.stderr)
        for line in rest:
            print(f"tlsproxy: error: {line}" if isinstance(exc, ConfigErrors) else f"  {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`tlsproxy certs inspect … | head`): stop quietly, as cat
        # does, and keep Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


if __name__ == "__main__":
    sys.exit(main())
