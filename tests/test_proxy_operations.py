"""Operating a running proxy without dropping anything: a request in flight across
SIGHUP, a new route after SIGHUP in the same process, a Kubernetes-style Secret symlink
swap picked up without a signal, and a real WebSocket client across a reload."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import ssl
from pathlib import Path

import pytest
import requests
from test_proxy_reload import _reload, der, served_der
from test_proxy_serve import LISTENING, Served
from ws_upstream import WebSocketEcho
from upstream import WAIT, ProxyThread, TestUpstream, pattern_sha256, proxy_config, proxy_log_waiter, service

from proxy.config.model import CertificatePair, Service, TLSSettings, Upstream

websockets = pytest.importorskip("websockets", reason="the WebSocket test needs the websockets package")
from websockets.sync.client import connect as ws_connect  # noqa: E402

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools

RELOADED = re.compile("reloaded the configuration")


def write_config(path: Path, pki, upstream: TestUpstream, *, with_new_route: bool) -> Path:
    cert, key = pki.server
    services = f"  - name: app\n    upstream: {upstream.url}\n"
    if with_new_route:
        services += f"  - name: added\n    path_prefix: /new\n    upstream: {upstream.url}\n    set_headers: {{X-Route: added}}\n"
    path.write_text(
        'listen: ["127.0.0.1:0"]\n'
        f"tls: {{certificates: [{{cert: {cert}, key: {key}}}]}}\n"
        "access_log: {path: access.log}\n"
        f"services:\n{services}"
    )
    return path


def test_request_in_flight_across_sighup_completes_and_a_new_route_appears(pki, upstream, tmp_path):
    path = write_config(tmp_path / "proxy.yaml", pki, upstream, with_new_route=False)
    size = 32 << 20
    with Served(["-c", str(path)], tmp_path) as served:
        port = served.wait_for(LISTENING).group(1)
        base = f"https://localhost:{port}"
        with requests.Session() as session:
            session.trust_env = False
            session.verify = str(pki.ca_pem)
            # /new/x reaches "app" (prefix /) before the reload: no X-Route header
            before = session.get(f"{base}/new/echo", timeout=WAIT)
            assert before.status_code == 200 and "x-route" not in dict(before.json()["headers"])
            with session.get(f"{base}/download?size={size}", stream=True, timeout=WAIT) as download:
                pieces = download.iter_content(1 << 16)
                digest = hashlib.sha256(next(pieces))
                write_config(path, pki, upstream, with_new_route=True)
                served.proc.send_signal(signal.SIGHUP)
                served.wait_for(RELOADED)
                for piece in pieces:  # the download started before the reload finishes intact
                    digest.update(piece)
            assert digest.hexdigest() == pattern_sha256(size)
            after = requests.get(f"{base}/new/echo", verify=str(pki.ca_pem), timeout=WAIT)
            assert after.status_code == 200 and dict(after.json()["headers"])["x-route"] == "added"
        assert served.stop() == 0


def secret_volume(root: Path, pair: tuple[Path, Path], generation: int) -> None:
    """Lay out ``root`` as the kubelet does for a mounted Secret: ``tls.crt`` -> ``..data/tls.crt``,
    ``..data`` -> ``..<generation>``; a new generation is published by renaming one symlink."""
    version = root / f"..{generation}"
    version.mkdir()
    (version / "tls.crt").write_bytes(pair[0].read_bytes())
    (version / "tls.key").write_bytes(pair[1].read_bytes())
    staged = root / "..data_tmp"
    staged.symlink_to(version.name)
    os.replace(staged, root / "..data")  # the atomic swap
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


def test_the_response_in_flight_at_shutdown_says_connection_close(pki, upstream, tmp_path):
    """Draining: the request in flight gets its answer, re-framed with ``Connection: close``
    (although the upstream's head needs no other change), then the connection ends."""
    px = ProxyThread(proxy_config(pki, service("app", upstream), tmp_path))
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    try:
        with socket.create_connection(("127.0.0.1", px.port), timeout=WAIT) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /held HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert upstream.holding.wait(WAIT)
            closed = asyncio.run_coroutine_threadsafe(px.running.close(WAIT), px.loop)

            async def shutdown_begun() -> None:
                while not px.running.state.closing:
                    await asyncio.sleep(0)

            px.call(shutdown_begun())
            upstream.let_go()
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nconnection: close" in head.lower()
        assert json.loads(body)["target"] == "/held"
        closed.result(WAIT)
    finally:
        px.close()


def test_secret_symlink_swap_changes_the_served_certificate_without_a_signal(pki, upstream, tmp_path):
    first = pki.leaf("secret-first", "localhost", "127.0.0.1")
    second = pki.leaf("secret-second", "localhost", "127.0.0.1")
    root = tmp_path / "secret"
    root.mkdir()
    secret_volume(root, first, 1)
    pair = CertificatePair(root / "tls.crt", root / "tls.key")
    config = proxy_config(pki, service("app", upstream), tmp_path, tls=TLSSettings(certificates=(pair,)))
    with ProxyThread(config, config_source=lambda: config, watch_interval=0.05) as px:
        assert served_der(pki, px.port) == der(first[0])
        with proxy_log_waiter("reloaded the configuration") as waiter:
            secret_volume(root, second, 2)
            assert waiter.seen.wait(WAIT), waiter.messages
        assert served_der(pki, px.port) == der(second[0])


def test_websocket_client_exchanges_messages_across_a_reload(pki, tmp_path):
    first = pki.leaf("ws-first", "localhost", "127.0.0.1")
    second = pki.leaf("ws-second", "localhost", "127.0.0.1")
    live = tmp_path / "live"
    live.mkdir()
    pair = CertificatePair(live / "tls.pem", live / "tls.key")
    pair.cert.write_bytes(first[0].read_bytes())
    pair.key.write_bytes(first[1].read_bytes())
    with WebSocketEcho() as ws:
        upstream_url = f"http://127.0.0.1:{ws.port}"
        app = Service(name="ws", upstreams=(Upstream(upstream_url, "127.0.0.1", ws.port),))
        config = proxy_config(pki, app, tmp_path, tls=TLSSettings(certificates=(pair,)))
        context = ssl.create_default_context(cafile=str(pki.ca_pem))
        with ProxyThread(config, config_source=lambda: config) as px:
            with ws_connect(f"wss://localhost:{px.port}/chat", ssl=context, open_timeout=WAIT) as client:
                client.send("before")
                assert client.recv(WAIT) == "echo:before"
                pair.cert.write_bytes(second[0].read_bytes())
                pair.key.write_bytes(second[1].read_bytes())
                assert px.call(_reload(px)) is True
                assert served_der(pki, px.port) == der(second[0])  # new connections: new config
                for n in range(3):  # the tunnel opened before the reload goes on
                    client.send(f"after {n}")
                    assert client.recv(WAIT) == f"echo:after {n}"


def test_sigusr1_reopens_the_access_log_after_rotation(pki, upstream, tmp_path):
    path = write_config(tmp_path / "proxy.yaml", pki, upstream, with_new_route=False)
    log_file, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    with Served(["-c", str(path)], tmp_path) as served:
        port = served.wait_for(LISTENING).group(1)
        url = f"https://localhost:{port}/echo"
        assert requests.get(url + "?before", verify=str(pki.ca_pem), timeout=WAIT).status_code == 200
        assert served.stop() == 0  # flushes: the first line is in the file before the rotation
    assert "?before" in log_file.read_text()
    with Served(["-c", str(path)], tmp_path) as served:
        port = served.wait_for(LISTENING).group(1)
        url = f"https://localhost:{port}/echo"
        os.replace(log_file, rotated)
        served.proc.send_signal(signal.SIGUSR1)
        # the handler runs on the loop before the next accepted connection is served
        assert requests.get(url + "?after", verify=str(pki.ca_pem), timeout=WAIT).status_code == 200
        assert served.stop() == 0
    assert "?after" in log_file.read_text() and "?after" not in rotated.read_text()
