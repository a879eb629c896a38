"""``tlsproxy health [-c FILE]``: is the proxy this config describes up? Exit 0 or 1
and one line saying what was checked (as ``traefik healthcheck`` does), for a
container's HEALTHCHECK or any supervisor.

It follows the config instead of a fixed address, so a HEALTHCHECK is right whatever
port ``admin.listen`` names:

* with ``admin.listen``: ``GET /healthz`` on it (a wildcard address is asked on
  loopback) must answer 200;
* without an admin listener: the first ``listen`` address must answer a TLS handshake
  (no certificate is verified: the question is whether the proxy speaks TLS there,
  not whether this client trusts it). A handshake the proxy ends with an alert (it
  requires a client certificate) still proves it is up.

Only the config file is read (not the certificates), so a health check never fails for
what ``tlsproxy check`` is for.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import ssl
from pathlib import Path

from proxy.config.model import ListenAddress, ProxyConfig

__all__ = ["add_parser", "check_health"]

DEFAULT_TIMEOUT = 2.0
# Where a wildcard bind address is reached from inside the same host / container.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "health",
        help="exit 0 if the proxy a config describes is up (for container health checks)",
        description=(
            "Read the config (-c FILE; default $TLSPROXY_CONFIG, then ./config/proxy.yaml) and ask "
            "the running proxy: GET /healthz on admin.listen, or, without an admin listener, a TLS "
            "handshake on the first listen address. Prints one line; exit 0 healthy, 1 not."
        ),
    )
    parser.add_argument("-c", "--config", type=Path, metavar="FILE", help="YAML config file")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for an answer (default {DEFAULT_TIMEOUT:g})")
    parser.set_defaults(func=run_health)


def run_health(args: argparse.Namespace) -> int:
    from proxy.config.load import default_config_path, load_config

    config = load_config(args.config or default_config_path(os.environ))
    healthy, line = check_health(config, args.timeout)
    print(line)
    return 0 if healthy else 1


def check_health(config: ProxyConfig, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """(healthy, the line to print) for the proxy ``config`` describes."""
    if config.admin.listen is not None:
        return _admin_healthz(config.admin.listen, timeout)
    if config.listen:
        return _tls_handshake(config.listen[0], timeout)
    return False, "unhealthy: the config has neither an admin listener nor a TLS listener to ask"


def _reachable(address: ListenAddress) -> tuple[str, int]:
    return _LOOPBACK.get(address.host, address.host), address.port


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _admin_healthz(address: ListenAddress, timeout: float) -> tuple[bool, str]:
    host, port = _reachable(address)
    url = f"http://{_url_host(host)}:{port}/healthz"
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return False, f"unhealthy: {url} (admin.listen): {_words(exc)}"
    finally:
        connection.close()
    if status != 200:
        return False, f"unhealthy: {url} (admin.listen) answered {status}"
    return True, f"healthy: {url} (admin.listen) answered 200"


def _tls_handshake(address: ListenAddress, timeout: float) -> tuple[bool, str]:
    host, port = _reachable(address)
    where = f"{_url_host(host)}:{port} (listen; no admin listener configured)"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # liveness, not trust: any certificate will do
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                version = tls.version()
    except ssl.SSLError as exc:
        if "ALERT" in (exc.reason or ""):  # the proxy answered, and refused us (client cert)
            return True, f"healthy: {where} answered the TLS handshake (with alert {exc.reason})"
        return False, f"unhealthy: {where}: TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return False, f"unhealthy: {where}: {_words(exc)}"
    return True, f"healthy: {where} completed a TLS handshake ({version})"


def _words(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer in time"
    return str(exc) or type(exc).__name__
