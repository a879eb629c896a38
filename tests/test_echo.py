"""The echo upstream: real HTTP on 127.0.0.1 port 0, driven by requests / http.client."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from proxy.echo import start_echo

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def echo_url():
    """The echo server on its own loop thread, for blocking clients."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_echo("127.0.0.1", 0), loop).result(TIMEOUT)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"

    async def stop():
        server.close()
        await server.wait_closed()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(TIMEOUT)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(TIMEOUT)
    loop.close()


def test_get_reports_method_path_query_and_headers(echo_url):
    response = requests.get(
        f"{echo_url}/api/x?q=1&r=2", headers={"X-Test": "yes", "Accept": "*/*"}, timeout=TIMEOUT
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    seen = response.json()
    assert seen["method"] == "GET" and seen["path"] == "/api/x" and seen["query"] == "q=1&r=2"
    assert seen["headers"]["x-test"] == "yes" and seen["headers"]["host"] == echo_url[len("http://") :]
    assert seen["body_bytes"] == 0


def test_repeated_headers_are_joined(echo_url):
    host, port = echo_url[len("http://") :].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.putrequest("GET", "/")
    conn.putheader("X-Forwarded-For", "10.0.0.1")
    conn.putheader("X-Forwarded-For", "10.0.0.2")
    conn.endheaders()
    assert json.loads(conn.getresponse().read())["headers"]["x-forwarded-for"] == "10.0.0.1, 10.0.0.2"
    conn.close()


def test_bodies_are_counted_with_content_length_and_chunked(echo_url):
    fixed = requests.post(f"{echo_url}/upload", data=b"x" * 100_000, timeout=TIMEOUT).json()
    assert fixed["method"] == "POST" and fixed["body_bytes"] == 100_000

    chunked = requests.put(f"{echo_url}/stream", data=(b"y" * 1000 for _ in range(50)), timeout=TIMEOUT).json()
    assert chunked["body_bytes"] == 50_000 and chunked["headers"]["transfer-encoding"] == "chunked"


def test_keep_alive_serves_several_requests_on_one_connection(echo_url):
    host, port = echo_url[len("http://") :].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    paths = []
    for path in ("/one", "/two", "/three"):
        conn.request("GET", path)
        if path == "/one":
            first_socket = conn.sock
        paths.append(json.loads(conn.getresponse().read())["path"])
    assert paths == ["/one", "/two", "/three"] and conn.sock is first_socket
    conn.close()


def test_head_gets_headers_only(echo_url):
    response = requests.head(f"{echo_url}/h", timeout=TIMEOUT)
    assert response.status_code == 200 and int(response.headers["content-length"]) > 0
    assert response.content == b""


def raw_exchange(echo_url: str, *chunks: bytes, expect: bytes) -> bytes:
    """Send CHUNKS one after another, each after the previous reply contained EXPECT."""
    host, port = echo_url[len("http://") :].split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            while expect not in received:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
    return received


def test_expect_100_continue_is_answered_before_the_body(echo_url):
    headers = b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    first = raw_exchange(echo_url, headers, expect=b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 100 ")


def test_malformed_request_gets_400_and_close(echo_url):
    reply = raw_exchange(echo_url, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", expect=b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"connection: close" in reply.lower()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (in the child, before exec: as a shell's background job)


@pytest.mark.parametrize(
    ("signum", "sigint_ignored_at_start"),
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "ctrl-c, started as a background job", "sigterm"],
)
def test_command_prints_its_address_serves_and_stops_on_ctrl_c(signum, sigint_ignored_at_start):
    """Stops cleanly (exit 0, "stopped") on SIGINT and SIGTERM, as serve and demo do, also
    when it inherited SIGINT ignored: a non-interactive shell starts background jobs so
    (`tlsproxy echo &` in a script, CI), and asyncio.run's own handler skips that case."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "echo", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_ignore_sigint if sigint_ignored_at_start else None,
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            line = pool.submit(proc.stdout.readline).result(timeout=15)
        assert line.startswith("tlsproxy echo: listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert requests.get(f"{url}/cli", timeout=TIMEOUT).json()["path"] == "/cli"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "tlsproxy echo: stopped" in out
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)


def test_command_rejects_a_bad_listen_address():
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "echo", "--listen", "nope"], capture_output=True, text=True, timeout=15
    )
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


def test_loop_shutdown_with_an_open_keep_alive_connection_is_quiet():
    problems: list[dict] = []
    client = socket.socket()
    client.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: problems.append(context))
        server = await start_echo("127.0.0.1", 0)
        await loop.sock_connect(client, server.sockets[0].getsockname()[:2])
        await loop.sock_sendall(client, b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while not received.endswith(b"}\n"):
            received += await asyncio.wait_for(loop.sock_recv(client, 65536), TIMEOUT)
        server.close()  # the connection stays open: asyncio.run cancels its handler

    try:
        asyncio.run(main())
    finally:
        client.close()
    assert problems == []
