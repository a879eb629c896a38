"""``tlsproxy echo``: the built-in upstream, to see exactly what the proxy forwards.

A plain HTTP/1.1 server (asyncio + h11, keep-alive) answering every request with JSON::

    {"method": "POST", "path": "/api/x", "query": "q=1",
     "headers": {"host": "api.localhost", "x-forwarded-for": "127.0.0.1", ...},
     "body_bytes": 5}

Header names are lowercase (as h11 normalises them); a repeated name's values are
joined with ", ". The body is read as it streams and only counted, never held, so the
echo can also measure large uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

import h11

from proxy.config.model import ListenAddress
from proxy.config.values import InvalidValue, parse_listen
from proxy.errors import TlsProxyError
from proxy.http.h11_engine import protocol_error_text

DEFAULT_LISTEN = "127.0.0.1:8080"
READ_SIZE = 64 * 1024
IDLE_TIMEOUT = 60.0  # an idle keep-alive connection is closed after this long
MAX_HEADER_BYTES = 64 * 1024
SERVER_HEADER = (b"server", b"tlsproxy-echo")


async def start_echo(host: str, port: int) -> asyncio.Server:
    """Listen on HOST:PORT (0 = any free port) and serve until the server is closed."""
    return await asyncio.start_server(_on_connection, host, port)


# The connections' tasks (a task nobody references may be collected while it runs).
_connection_tasks: set[asyncio.Task] = set()


def _on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Each connection in a task of our own, not the one asyncio.streams would make: on
    3.11 that one's done-callback asks a cancelled task for its exception, and logs the
    CancelledError with a traceback ("Exception in callback ...") when Ctrl-C finds a
    connection closing (in ``writer.wait_closed``) or not yet started."""
    task = asyncio.get_running_loop().create_task(_serve_connection(reader, writer))
    _connection_tasks.add(task)
    task.add_done_callback(_connection_tasks.discard)


class _RequestSeen:
    """What the echo reports about one request, filled in as its events arrive."""

    def __init__(self, request: h11.Request) -> None:
        target = request.target.decode("latin-1")
        self.method = request.method.decode("ascii")
        self.path, _, self.query = target.partition("?")
        self.headers: dict[str, str] = {}
        for name, value in request.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        self.body_bytes = 0

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "method": self.method,
                "path": self.path,
                "query": self.query,
                "headers": self.headers,
                "body_bytes": self.body_bytes,
            },
            indent=2,
        ).encode() + b"\n"


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    seen: _RequestSeen | None = None
    try:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await _send_error(conn, writer, exc.error_status_hint, protocol_error_text(exc))
                return
            if event is h11.NEED_DATA:
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT)
                except asyncio.TimeoutError:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                seen = _RequestSeen(event)
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                seen.body_bytes += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                await _send_echo(conn, writer, seen)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # one side asked to close (Connection: close, HTTP/1.0)
                conn.start_next_cycle()
            elif isinstance(event, (h11.ConnectionClosed, h11.PAUSED)):
                return
    except (ConnectionError, h11.LocalProtocolError):
        return
    except asyncio.CancelledError:
        # The loop is shutting down with this keep-alive connection open. Ending quietly
        # matters on 3.11, whose stream callback logs a cancelled handler as an error.
        return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def _send_echo(conn: h11.Connection, writer: asyncio.StreamWriter, seen: _RequestSeen) -> None:
    body = seen.as_json()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        SERVER_HEADER,
    ]
    writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
    if seen.method != "HEAD":
        writer.write(conn.send(h11.Data(data=body)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()


async def _send_error(conn: h11.Connection, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    """Answer an unparseable request when h11 still lets us, then close."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"{status}: {reason}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        SERVER_HEADER,
    ]
    with contextlib.suppress(h11.LocalProtocolError):
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


# --- command line ---------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "echo",
        help="run a plain HTTP upstream that answers with the request it received, as JSON",
        description="A plain HTTP/1.1 server answering every request with JSON "
        "{method, path, query, headers, body_bytes}: point the proxy at it to see what it forwards.",
    )
    parser.add_argument(
        "--listen", type=_listen_arg, default=DEFAULT_LISTEN, metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 = any free port)",
    )
    parser.set_defaults(func=run_echo)


def run_echo(args: argparse.Namespace) -> int:
    try:
        asyncio.run(_serve_until_signal(args.listen.host, args.listen.port))
    except KeyboardInterrupt:  # (where the loop has no signal handlers)
        pass
    print("tlsproxy echo: stopped", flush=True)
    return 0


async def _serve_until_signal(host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, as ``serve`` and ``demo`` do. Handlers of our own:
    asyncio.run installs its SIGINT one only where SIGINT is not ignored, and a job a
    non-interactive shell starts in the background inherits it ignored (Ctrl-C and kill
    -INT would do nothing; so would a container runtime's SIGTERM without a handler)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = await start_echo(host, port)
    except OSError as exc:
        raise TlsProxyError(f"echo: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"tlsproxy echo: listening on http://{shown}:{bound_port}", flush=True)
    async with server:
        await stop.wait()


def _listen_arg(text: str) -> ListenAddress:
    try:
        return parse_listen(text)
    except InvalidValue as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
