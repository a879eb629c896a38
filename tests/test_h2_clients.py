"""HTTP/2 to clients, proven with real clients: curl --http2, httpx http2=True, node's
http2 module and nghttp, each against the proxy on 127.0.0.1 with the session PKI's
certificate — what they accept, and what they are refused. A client that asks for h2 on
a listener configured ``tls.alpn: [http/1.1]`` falls back (curl --http2, httpx) or gets
the ``no_application_protocol`` alert (h2 only: node's http2, nghttp). WebSockets stay
on HTTP/1.1 on the default listener, which offers h2 too.

Each tool missing from the machine skips its tests, naming the tool."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from upstream import WAIT, ProxyThread, pattern_sha256, proxy_config, proxy_log_waiter, service

from proxy.config.model import CertificatePair, Limits, Service, TLSSettings, Upstream

H1_ONLY = ("http/1.1",)


def h1_only_tls(pki) -> TLSSettings:
    cert, key = pki.server
    return TLSSettings(certificates=(CertificatePair(Path(cert), Path(key)),), alpn=H1_ONLY)


@pytest.fixture
def h1_proxy(pki, upstream, tmp_path):
    """The same service on a listener that offers only http/1.1 by ALPN."""
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path, tls=h1_only_tls(pki))) as px:
        yield px


def access_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return found


# -- curl --http2 ------------------------------------------------------------------------

def curl(pki, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """curl trusting the session CA; the last stdout line is ``<http_version> <status>``
    (``-w``); ``stdin`` is what ``@-`` reads."""
    tool("curl", "curl")
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(WAIT), "--cacert", str(pki.ca_pem),
         "-w", r"\n%{http_version} %{http_code}", *args],
        input=stdin, capture_output=True, timeout=WAIT + 5,
    )


def curl_answer(result: subprocess.CompletedProcess) -> tuple[bytes, str, int]:
    """(body, http_version, status) of a curl run made by ``curl()``."""
    assert result.returncode == 0, result.stderr
    body, _, last = result.stdout.rpartition(b"\n")
    version, status = last.decode().split()
    return body, version, int(status)


def test_curl_get_post_head_and_404_over_h2(proxy, pki, upstream, tmp_path):
    url = proxy.url("/echo?from=curl")
    body, version, status = curl_answer(curl(pki, "--http2", url))
    assert (version, status) == ("2", 200)
    seen = json.loads(body)
    assert seen["method"] == "GET" and seen["target"] == "/echo?from=curl"
    assert dict(seen["headers"])["host"] == f"localhost:{proxy.port}"  # :authority became Host

    payload = bytes(range(256)) * 40
    body, version, status = curl_answer(curl(pki, "--http2", "--data-binary", "@-", url, stdin=payload))
    assert (version, status) == ("2", 200)
    posted = json.loads(body)
    assert posted["method"] == "POST"
    assert posted["body_bytes"] == len(payload)
    assert posted["body_sha256"] == hashlib.sha256(payload).hexdigest()

    head = curl(pki, "--http2", "-I", url)
    assert head.returncode == 0, head.stderr
    assert head.stdout.startswith(b"HTTP/2 200"), head.stdout[:200]
    assert b"content-length:" in head.stdout.lower()
    assert [r["method"] for r in upstream.requests] == ["GET", "POST", "HEAD"]


def test_curl_404_over_h2_carries_its_reason(pki, upstream, tmp_path):
    app = service("app", upstream, path_prefix="/app")
    with ProxyThread(proxy_config(pki, app, tmp_path)) as px:
        body, version, status = curl_answer(curl(pki, "--http2", px.url("/elsewhere")))
        assert (version, status) == ("2", 404)
        assert body.strip(), "a 404 says why"
        assert not upstream.requests  # refused before any upstream
    record = access_records(tmp_path / "access.log")[-1]
    assert record["status"] == 404 and record["protocol"] == "HTTP/2"


def test_curl_over_h2_is_logged_as_http2(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        assert curl_answer(curl(pki, "--http2", px.url("/echo")))[1:] == ("2", 200)
    assert [r["protocol"] for r in access_records(tmp_path / "access.log")] == ["HTTP/2"]


def test_curl_falls_back_to_http1_on_an_http1_only_listener(h1_proxy, pki):
    assert curl_answer(curl(pki, "--http2", h1_proxy.url("/echo")))[1:] == ("1.1", 200)


def test_curl_refuses_the_proxy_without_the_ca(proxy):
    tool("curl", "curl")
    result = subprocess.run(["curl", "-sS", "--http2", "--max-time", str(WAIT), proxy.url("/echo")],
                            capture_output=True, timeout=WAIT + 5)
    assert result.returncode == 60  # CURLE_PEER_FAILED_VERIFICATION


# -- httpx http2=True --------------------------------------------------------------------

def h2_client(pki, **options) -> httpx.Client:
    return httpx.Client(http2=True, verify=ssl.create_default_context(cafile=str(pki.ca_pem)), timeout=WAIT,
                        **options)


def test_httpx_h2_several_requests_on_one_connection(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px, h2_client(pki) as client:
        answers = [client.get(px.url(f"/echo?n={n}")) for n in range(5)]
        answers.append(client.post(px.url("/echo"), content=b"hello h2"))
    assert {a.http_version for a in answers} == {"HTTP/2"}
    assert [a.json()["target"] for a in answers[:5]] == [f"/echo?n={n}" for n in range(5)]
    assert answers[5].json()["body_bytes"] == 8
    clients = {r["client"] for r in access_records(tmp_path / "access.log")}
    assert len(clients) == 1  # one TLS connection (one client address:port) carried all six


def test_httpx_h2_downloads_1_mib_byte_exact(proxy, pki):
    size = 1 << 20
    with h2_client(pki) as client:
        response = client.get(proxy.url(f"/download?size={size}"))
    assert response.http_version == "HTTP/2" and response.status_code == 200
    assert len(response.content) == size
    assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(size)


def test_httpx_h2_falls_back_to_http1_on_an_http1_only_listener(h1_proxy, pki):
    with h2_client(pki) as client:
        response = client.get(h1_proxy.url("/echo"))
    assert response.status_code == 200 and response.http_version == "HTTP/1.1"


def test_httpx_h2_refuses_the_proxy_without_the_ca(proxy, pki):
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=str(pki.other_ca_pem)),
                      timeout=WAIT) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get(proxy.url("/echo"))


# -- node http2.connect -------------------------------------------------------------------

NODE_H2_GET = """
const http2 = require('http2');
const fs = require('fs');
const [url, path, ca] = process.argv.slice(1);
const session = http2.connect(url, { ca: fs.readFileSync(ca), servername: 'localhost' });
const fail = (e) => {
  console.log(JSON.stringify({ error: (e.cause && e.cause.code) || e.code || e.message }));
  process.exit(3);
};
session.on('error', fail);
const req = session.request({ ':path': path });
req.on('error', fail);
let body = '';
req.setEncoding('utf8');
req.on('response', (headers) => { req.status = headers[':status']; });
req.on('data', (d) => { body += d; });
req.on('end', () => {
  console.log(JSON.stringify({ status: req.status, alpn: session.alpnProtocol, body }));
  session.close();
});
req.end();
"""


def node_h2_get(url: str, path: str, ca: Path) -> dict:
    node = tool("node", "nodejs")
    result = subprocess.run([node, "-e", NODE_H2_GET, url, path, str(ca)], capture_output=True, text=True,
                            timeout=WAIT)
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_node_http2_connect_gets_200(proxy, pki):
    answer = node_h2_get(f"https://localhost:{proxy.port}", "/echo?from=node", pki.ca_pem)
    assert answer["status"] == 200 and answer["alpn"] == "h2"
    assert json.loads(answer["body"])["target"] == "/echo?from=node"


def test_node_http2_connect_refused_on_an_http1_only_listener(h1_proxy, pki):
    answer = node_h2_get(f"https://localhost:{h1_proxy.port}", "/echo", pki.ca_pem)
    assert answer["error"] == "ERR_SSL_TLSV1_ALERT_NO_APPLICATION_PROTOCOL", answer


def test_node_http2_connect_refuses_the_proxy_without_the_ca(proxy, pki):
    answer = node_h2_get(f"https://localhost:{proxy.port}", "/echo", pki.other_ca_pem)
    assert answer["error"] in ("UNABLE_TO_VERIFY_LEAF_SIGNATURE", "SELF_SIGNED_CERT_IN_CHAIN",
                               "UNABLE_TO_GET_ISSUER_CERT_LOCALLY"), answer


# -- nghttp ------------------------------------------------------------------------------

def nghttp(*args: str) -> subprocess.CompletedProcess:
    tool("nghttp", "nghttp2-client")
    return subprocess.run(["nghttp", "-v", "-t", f"{int(WAIT)}s", *args], capture_output=True, text=True,
                          timeout=WAIT + 5)


def test_nghttp_sees_our_settings_and_a_200(pki, upstream, tmp_path):
    limits = Limits(max_concurrent_streams=37)
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path, limits=limits)) as px:
        result = nghttp(px.url("/echo"))
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    settings = out[out.index("recv SETTINGS frame"):]
    settings = settings[: settings.index("\n[", 1)]
    assert "[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):37]" in settings, settings
    assert "[SETTINGS_INITIAL_WINDOW_SIZE(0x04):262144]" in settings, settings  # 256 KiB per stream
    assert re.search(r"recv WINDOW_UPDATE frame <length=4, flags=0x00, stream_id=0>\s*\n\s*"
                     r"\(window_size_increment=983041\)", out), out  # 1 MiB for the connection
    assert re.search(r"recv \(stream_id=\d+\) :status: 200", out), out
    assert "The negotiated protocol: h2" in out, out


def test_nghttp_refused_on_an_http1_only_listener(h1_proxy, upstream):
    with proxy_log_waiter("no protocol this listener serves") as waiter:
        result = nghttp(h1_proxy.url("/echo"))
        assert waiter.seen.wait(WAIT), waiter.messages  # the proxy's log says why
    # nghttp exits 0 here, but says so: the handshake failed on the alert, nothing was sent
    assert "negotiated protocol" not in result.stdout, result.stdout
    assert "processed=0" in result.stderr, result.stderr
    assert not upstream.requests


# -- WebSockets stay on HTTP/1.1 ----------------------------------------------------------

def test_websocket_on_the_default_listener_that_offers_h2(pki, tmp_path):
    """A WebSocket client (which offers http/1.1 by ALPN, as browsers do for WebSockets)
    upgrades through the listener that offers h2 first; an h2 connection on the same
    listener works beside it."""
    pytest.importorskip("websockets", reason="needs the websockets package")
    from ws_upstream import WebSocketEcho
    from websockets.sync.client import connect as ws_connect

    with WebSocketEcho() as ws:
        app = Service(name="ws", upstreams=(Upstream(f"http://127.0.0.1:{ws.port}", "127.0.0.1", ws.port),))
        with ProxyThread(proxy_config(pki, app, tmp_path)) as px:
            assert px.running.state.generation.config.tls.alpn == ("h2", "http/1.1")
            for offered in (["http/1.1"], None):  # ALPN http/1.1, and no ALPN at all
                context = ssl.create_default_context(cafile=str(pki.ca_pem))
                if offered:
                    context.set_alpn_protocols(offered)
                with ws_connect(f"wss://localhost:{px.port}/chat", ssl=context, open_timeout=WAIT) as client:
                    client.send("over h1")
                    assert client.recv(WAIT) == "echo:over h1"
                    assert client.socket.selected_alpn_protocol() in (offered or [None])
            with h2_client(pki) as h2:  # the same listener speaks h2 to a client that asks for it
                assert h2.get(px.url("/chat")).http_version == "HTTP/2"


def test_a_websocket_client_that_negotiates_h2_cannot_upgrade(pki, tmp_path):
    """Offered h2 first, the listener picks it: an HTTP/1.1 Upgrade sent on that
    connection is not HTTP/2, and the proxy does not forward it (no extended CONNECT)."""
    pytest.importorskip("websockets", reason="needs the websockets package")
    from ws_upstream import WebSocketEcho
    from websockets.exceptions import InvalidMessage
    from websockets.sync.client import connect as ws_connect

    with WebSocketEcho() as ws:
        app = Service(name="ws", upstreams=(Upstream(f"http://127.0.0.1:{ws.port}", "127.0.0.1", ws.port),))
        with ProxyThread(proxy_config(pki, app, tmp_path)) as px:
            context = ssl.create_default_context(cafile=str(pki.ca_pem))
            context.set_alpn_protocols(["h2", "http/1.1"])
            # the proxy reads the Upgrade as a broken HTTP/2 preface: GOAWAY, closed
            with pytest.raises(InvalidMessage, match="did not receive a valid HTTP response"):
                with ws_connect(f"wss://localhost:{px.port}/chat", ssl=context, open_timeout=WAIT):
                    pass
