#!/usr/bin/env python3
"""A tiny gRPC client for the README's gRPC walk-through: "component A".

It calls /demo.Echo/Echo and then /demo.Echo/WhoAmI (examples/grpc_echo_server.py) and prints
one line: ``OK: ...`` with the reply and the identity the server saw, or the gRPC status the
call ended with and its message (``PERMISSION_DENIED: certificate CN=reports is not allowed
...``), which is what a caller sees when tlsproxy refuses it.

    # over TLS to tlsproxy, trusting our CA, with (or without) a client certificate
    python3 examples/grpc_echo_client.py --target localhost:7443 --ca ca/ca.pem --cert billing.pem --key billing.key
    # in plaintext to a sidecar's listen_plain port (the component speaks no TLS at all)
    python3 examples/grpc_echo_client.py --target 127.0.0.1:7080 --plaintext

Exit status 0 when the call ended with the ``--expect``ed status (default OK), else 1: the
compose recipe and the tests use it to check the refused cases too. It first waits (``--wait``,
10 s) for the target to accept a connection, so it can follow a proxy's start directly. ``--path-prefix`` puts a
prefix before the method path (the egress routes ``/as-reports/...`` to its refused twin).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

SERVICE = "demo.Echo"


def open_channel(target: str, *, plaintext: bool = False, ca: Path | None = None,
                 cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    """An insecure channel, or a TLS one trusting ``ca`` (the system store without it) and
    presenting ``cert``/``key`` when both are given."""
    if plaintext:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key and cert else None,
        certificate_chain=cert.read_bytes() if key and cert else None,
    )
    return grpc.secure_channel(target, credentials)


def wait_ready(channel: grpc.Channel, seconds: float) -> None:
    """Until the channel is connected (the proxy just started), at most ``seconds``; a
    target that never gets there is left to the call to report (UNAVAILABLE and why)."""
    try:
        grpc.channel_ready_future(channel).result(timeout=seconds)
    except grpc.FutureTimeoutError:
        pass


def echo_and_identify(channel: grpc.Channel, message: str = "hello", path_prefix: str = "",
                      timeout: float = 10.0) -> tuple[str, str]:
    """(status name, what to print): ``("OK", "echo ...; server saw ...")`` or the name of
    the status the call failed with and its message."""
    prefix = path_prefix.rstrip("/")
    try:
        reply = channel.unary_unary(f"{prefix}/{SERVICE}/Echo")(message.encode(), timeout=timeout)
        identity = channel.unary_unary(f"{prefix}/{SERVICE}/WhoAmI")(b"", timeout=timeout).decode()
    except grpc.RpcError as failure:
        return failure.code().name, failure.details() or ""
    return "OK", f"echo {reply.decode()!r}; server saw x-forwarded-client-cert: {identity or '(none)'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="localhost:7443", help="HOST:PORT (default localhost:7443)")
    parser.add_argument("--plaintext", action="store_true", help="no TLS (h2c): to a listen_plain port")
    parser.add_argument("--ca", type=Path, help="CA bundle trusted for the proxy's certificate")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM, chain)")
    parser.add_argument("--key", type=Path, help="client certificate's key")
    parser.add_argument("--message", default="hello")
    parser.add_argument("--path-prefix", default="", help="put before /demo.Echo/... (routing at the proxy)")
    parser.add_argument("--expect", default="OK", help="status that means success (default OK)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for the target to accept connections first (default 10)")
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    with open_channel(args.target, plaintext=args.plaintext, ca=args.ca, cert=args.cert, key=args.key) as channel:
        wait_ready(channel, args.wait)
        status, text = echo_and_identify(channel, args.message, args.path_prefix, args.timeout)
    print(f"{status}: {text}", flush=True)
    return 0 if status == args.expect.upper() else 1


if __name__ == "__main__":
    sys.exit(main())
