"""`tlsproxy serve`: run the proxy from a YAML config or the zero-config flags."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from pathlib import Path

from proxy.config.model import CLIENT_AUTH_MODES, HTTP_ENGINES
from proxy.errors import TlsProxyError, UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the TLS-terminating proxy",
        description=(
            "Run the proxy from a config file (-c FILE; default $TLSPROXY_CONFIG, then "
            "./config/proxy.yaml) or, without YAML, from --listen and --upstream."
        ),
    )
    parser.add_argument("-c", "--config", type=Path, metavar="FILE", help="YAML config file")
    parser.add_argument("--http", choices=HTTP_ENGINES, metavar="ENGINE",
                        help="HTTP/1.1 engine: auto (httptools when importable), httptools or h11; "
                             "overrides http_engine in the config")
    zero = parser.add_argument_group("zero-config form (no YAML)")
    zero.add_argument("--listen", metavar="HOST:PORT", help="TLS listener, e.g. 127.0.0.1:8443; :8443 (or [::]:8443) = every interface, IPv4 and IPv6")
    zero.add_argument("--upstream", action="append", metavar="URL",
                      help="http:// upstream; repeat for round-robin")
    zero.add_argument("--cert", type=Path, metavar="FILE", help="server certificate (PEM, leaf then chain)")
    zero.add_argument("--key", type=Path, metavar="FILE", help="its private key")
    zero.add_argument("--client-ca", type=Path, metavar="FILE", help="CA bundle trusted for client certificates")
    zero.add_argument("--client-auth", choices=[m for m in CLIENT_AUTH_MODES if m != "none"],
                      help="ask for client certificates (default with --client-ca: require)")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from proxy.config.load import config_from_args, config_path, load_config
    from proxy.server.running import run_proxy

    if args.listen or args.upstream:
        if args.config is not None:
            raise UsageError("serve: use either -c FILE or --listen/--upstream, not both")
        if not (args.listen and args.upstream):
            raise UsageError("serve: --listen and --upstream go together")
        load = functools.partial(
            config_from_args, args.listen, args.upstream, cert=args.cert, key=args.key,
            client_ca=args.client_ca, client_auth=args.client_auth,
        )
    else:
        if any(value is not None for value in (args.cert, args.key, args.client_ca, args.client_auth)):
            raise UsageError("serve: --cert/--key/--client-ca/--client-auth need --listen and --upstream")
        load = functools.partial(load_config, config_path(args.config, os.environ))
    if args.http is not None:  # --http wins over the config's http_engine, also on reload
        load = functools.partial(_with_http_engine, load, args.http)
    config = load()
    try:
        return run_proxy(config, config_source=load)  # SIGHUP / changed certificates: load() again
    except OSError as exc:
        listeners = ", ".join(str(address) for address in config.listen)
        raise TlsProxyError(f"cannot listen on {listeners}: {exc.strerror or exc}") from None


def _with_http_engine(load, http_engine: str):
    """The config ``load()`` returns, with ``http_engine`` from ``--http``."""
    return dataclasses.replace(load(), http_engine=http_engine)
