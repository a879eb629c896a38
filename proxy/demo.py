"""`tlsproxy demo`: the whole thing on localhost in one command.

Creates (once; reused on later runs) a CA, a server certificate for localhost and a client
certificate under ``--dir``, starts the echo upstream on a free loopback port and the proxy
on https://localhost:PORT (127.0.0.1 and ::1) with client certificates optional, and prints
curl lines to copy. Two services show that the client certificate matters: ``/`` is open,
``/private`` requires a certificate (403 without one). Everything runs in one event loop;
SIGINT / SIGTERM stop it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import shlex
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from proxy.config.model import (
    AccessLogSettings,
    AdminSettings,
    CertificatePair,
    ClientAuthSettings,
    ListenAddress,
    ProxyConfig,
    Service,
    ServiceClientAuth,
    Timeouts,
    TLSSettings,
    Upstream,
)
from proxy.errors import TlsProxyError

DEFAULT_PORT = 8443
SERVER_NAMES = ["localhost", "127.0.0.1", "::1"]
CLIENT_CN = "demo-client"
# A demo certificate this close to expiry is re-issued rather than reused.
RENEW_BEFORE = dt.timedelta(days=7)
# Ctrl-C should feel immediate; in-flight demo requests are tiny.
SHUTDOWN_GRACE = 2.0
READY = "tlsproxy demo ready on"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a CA-backed HTTPS + mTLS demo on localhost",
        description="Create a local CA, server and client certificates (once), start an echo "
        "upstream and the proxy on https://localhost:PORT, print curl lines to try.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTPS port (default {DEFAULT_PORT})")
    parser.add_argument("--dir", type=Path, default=Path("certs"), help="certificate folder (default ./certs)")
    parser.set_defaults(func=run_demo)


# --- certificates (files, made once) ------------------------------------------------------


@dataclass(frozen=True)
class DemoFiles:
    ca_pem: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    notes: tuple[str, ...]  # what was created / reused, for the banner


def ensure_demo_certificates(directory: Path) -> DemoFiles:
    """The CA, the localhost server cert and the client cert in DIRECTORY, reusing valid ones."""
    from proxy.pki.store import ensure_ca

    directory = directory.resolve()
    ca_dir = directory / "ca"
    ca_existed = (ca_dir / "ca.pem").exists()
    ca_cert, ca_key = ensure_ca(ca_dir, "tlsproxy demo CA")
    notes = [f"CA           {ca_dir / 'ca.pem'}  ({'reused' if ca_existed else 'created'})"]
    server, note = _ensure_leaf(directory / "localhost", ca_cert, ca_key, SERVER_NAMES, client=False, cn=None)
    notes.append(f"server cert  {server[0]}  ({', '.join(SERVER_NAMES)}; {note})")
    client, note = _ensure_leaf(directory / "client", ca_cert, ca_key, [CLIENT_CN], client=True, cn=CLIENT_CN)
    notes.append(f"client cert  {client[0]} + {client[1].name}  (CN {CLIENT_CN}; {note})")
    return DemoFiles(ca_dir / "ca.pem", server, client, tuple(notes))


def _ensure_leaf(prefix: Path, ca_cert, ca_key, names: list[str], *, client: bool, cn: str | None):
    from proxy.pki.build import issue_leaf
    from proxy.pki.store import write_leaf

    pem, key = prefix.with_name(prefix.name + ".pem"), prefix.with_name(prefix.name + ".key")
    problem = _reuse_problem(pem, key, ca_cert)
    if problem is None:
        return (pem, key), "reused"
    cert, private_key = issue_leaf(ca_cert, ca_key, names, client=client, cn=cn)
    # These files belong to the demo: replacing a stale or foreign one is the point.
    write_leaf(prefix, cert, private_key, [ca_cert], force=True)
    return (pem, key), "created" if problem == "missing" else f"re-issued: {problem}"


def _reuse_problem(pem: Path, key: Path, ca_cert) -> str | None:
    """Why the existing certificate at PEM/KEY cannot be reused, or None if it can."""
    from proxy.pki.build import keys_match
    from proxy.pki.store import load_certificates, load_private_key

    if not pem.exists() and not key.exists():
        return "missing"
    try:
        cert = load_certificates(pem)[0]
        private_key = load_private_key(key)
    except TlsProxyError as exc:
        return str(exc)
    if not keys_match(cert, private_key):
        return "key does not match"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by the demo CA"
    if cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) < RENEW_BEFORE:
        return "expires soon"
    return None


# --- the running demo ---------------------------------------------------------------------


def demo_config(files: DemoFiles, listen: list[ListenAddress], upstream_port: int) -> ProxyConfig:
    """Two services on one echo upstream: ``/private`` needs a client certificate, ``/`` not."""
    upstream = Upstream(url=f"http://127.0.0.1:{upstream_port}", host="127.0.0.1", port=upstream_port)
    services = (
        Service(name="private", upstreams=(upstream,), path_prefix="/private",
                client_auth=ServiceClientAuth(require=True)),
        Service(name="public", upstreams=(upstream,)),
    )
    return ProxyConfig(
        services=services,
        listen=tuple(listen),
        tls=TLSSettings(certificates=(CertificatePair(*files.server),), ca_dir=files.ca_pem.parent),
        client_auth=ClientAuthSettings(mode="optional", ca=files.ca_pem, forward="xfcc"),
        timeouts=Timeouts(shutdown_grace=SHUTDOWN_GRACE),
        access_log=AccessLogSettings(format="text", path="-"),
        admin=AdminSettings(listen=None),
    )


def listen_addresses(port: int) -> list[ListenAddress]:
    """127.0.0.1, plus ::1 when this host has IPv6 loopback (curl tries ::1 for localhost)."""
    addresses = [ListenAddress("127.0.0.1", port)]
    if port != 0 and _ipv6_loopback():
        addresses.append(ListenAddress("::1", port))
    return addresses


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def usage_text(files: DemoFiles, port: int) -> str:
    """The banner: what was set up, the curl lines to paste, and how to trust the CA."""
    from proxy.pki.trust import ca_banner

    url = f"https://localhost:{port}"
    ca = shlex.quote(str(files.ca_pem))
    cert, key = (shlex.quote(str(path)) for path in files.client)
    trust = " ".join(f"{name}={ca}" for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                                                  "NODE_EXTRA_CA_CERTS"))
    lines = [
        "tlsproxy demo",
        *(f"  {note}" for note in files.notes),
        f"  proxy        {url}  -> echo upstream; client certificates optional,",
        "               required under /private",
        "",
        "Try it (the echo upstream answers with the request it received, as JSON):",
        "  # 200: HTTPS with the demo CA trusted, no client certificate needed",
        f"  curl --cacert {ca} {url}/hello",
        "  # 200: /private with the client certificate; see X-Forwarded-Client-Cert in the echo",
        f"  curl --cacert {ca} --cert {cert} --key {key} {url}/private",
        "  # 403: /private without a client certificate is refused",
        f"  curl --cacert {ca} {url}/private",
        "",
        "Or trust the demo CA for this shell (curl, Python ssl/requests/httpx, node):",
        f"  export {trust}",
        f"  curl {url}/hello",
        "",
        "Or trust it in this machine's stores (system, browsers' NSS databases, Java):",
        *(f"  {line}" for line in ca_banner(files.ca_pem)),
        "",
    ]
    return "\n".join(lines)


async def serve_demo(files: DemoFiles, port: int, stop: asyncio.Event | None = None) -> None:
    """Run echo + proxy until STOP is set (or SIGINT / SIGTERM when STOP is None)."""
    from proxy.echo import start_echo
    from proxy.server import start_proxy

    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    echo = await start_echo("127.0.0.1", 0)
    try:
        upstream_port = echo.sockets[0].getsockname()[1]
        config = demo_config(files, listen_addresses(port), upstream_port)
        try:
            proxy = await start_proxy(config)
        except OSError as exc:
            raise TlsProxyError(
                f"cannot listen on port {port}: {exc.strerror or exc} (another demo running? try --port)"
            ) from exc
        try:
            bound = proxy.addresses[0][1] if proxy.addresses else port
            print(usage_text(files, bound), flush=True)
            print(f"{READY} https://localhost:{bound} (upstream http://127.0.0.1:{upstream_port})"
                  " -- Ctrl-C to stop", flush=True)
            await stop.wait()
            print("tlsproxy demo: stopping", flush=True)
        finally:
            await proxy.close()
    finally:
        echo.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(echo.wait_closed(), SHUTDOWN_GRACE)
        # The proxy closed its pooled upstream connections; let the echo's handlers see the
        # EOF and end on their own rather than be cancelled mid-close by the loop's teardown.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=SHUTDOWN_GRACE)


def run_demo(args: argparse.Namespace) -> int:
    files = ensure_demo_certificates(args.dir)
    with _runner() as runner:
        runner.run(serve_demo(files, args.port))
    print("tlsproxy demo: stopped", flush=True)
    return 0


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
