"""A real browser over HTTP/2: headless Chromium loads a page with ASSETS small images
through the proxy, trusting our test CA through an NSS database under a temporary HOME
(``~/.pki/nssdb``, as Chromium on Linux reads it) — no ``--ignore-certificate-errors``.

The page counts the images that loaded and, at its load event, writes the count and
``performance.now()`` (milliseconds since the navigation started) into the DOM, which
``--dump-dom`` prints. The proxy's JSON access log then shows every asset requested
over HTTP/2. The same page through a listener with ``tls.alpn: [http/1.1]`` gives the
comparison (Chromium then opens its six connections per host); without the CA in the
NSS database the page is not loaded at all.

``TLSPROXY_BROWSER_RUNS=5 pytest tests/test_h2_browser.py -s`` loads each page that
many times and prints the median load times (bench/README.md, "A browser page").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from upstream import WAIT, ProxyThread, proxy_config
from ws_upstream import WebSocketEcho

from proxy.config.model import CertificatePair, Service, TLSSettings, Upstream

ASSETS = 200
# A 1x1 transparent GIF: the smallest image every browser decodes.
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>200 assets</title>
<script>
let loaded = 0, failed = 0;
function done(ok) { if (ok) loaded++; else failed++; }
window.addEventListener("load", () => {
  const out = document.getElementById("result");
  out.dataset.loaded = loaded;
  out.dataset.failed = failed;
  out.dataset.ms = performance.now().toFixed(1);
  out.dataset.protocol = performance.getEntriesByType("navigation")[0].nextHopProtocol;
});
</script></head>
<body><div id="result"></div>
%s
</body></html>
""" % "\n".join(f'<img src="/asset/{n}.gif" onload="done(true)" onerror="done(false)">' for n in range(ASSETS))
# A WebSocket beside the h2 page: sends "ping", answers the echo with "got:<echo>". The
# script after it is held by the page's upstream until the WebSocket server has that
# answer, so the load event (and --dump-dom) comes after the whole round trip.
WS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>websocket</title>
<script>
const ws = new WebSocket("wss://" + location.host + "/ws/chat");
ws.onopen = () => ws.send("ping");
ws.onmessage = (event) => ws.send("got:" + event.data);
window.addEventListener("load", () => {
  const out = document.getElementById("result");
  out.dataset.roundTrip = window.roundTrip;
  out.dataset.protocol = performance.getEntriesByType("navigation")[0].nextHopProtocol;
});
</script>
<script src="/after-websocket.js"></script>
</head><body><div id="result"></div></body></html>
"""
WS_RESULT = re.compile(r'<div id="result" data-round-trip="true" data-protocol="h2"')
RESULT = re.compile(r'<div id="result" data-loaded="(\d+)" data-failed="(\d+)" data-ms="([\d.]+)" '
                    r'data-protocol="([^"]*)"')


class PageHandler(BaseHTTPRequestHandler):
    """The page and its assets, over HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"

    ws_round_trip: threading.Event | None = None  # set by the WebSocket server (test_chromium_websocket...)

    def do_GET(self) -> None:  # noqa: N802 - the http.server spelling
        if self.path == "/":
            body, kind = PAGE.encode(), "text/html; charset=utf-8"
        elif self.path == "/ws-page":
            body, kind = WS_PAGE.encode(), "text/html; charset=utf-8"
        elif self.path == "/after-websocket.js":  # held until the page's WebSocket made its round trip
            done = self.ws_round_trip is not None and self.ws_round_trip.wait(WAIT)
            body, kind = f"window.roundTrip = {str(bool(done)).lower()};".encode(), "text/javascript"
        elif self.path.startswith("/asset/"):
            body, kind = PIXEL, "image/gif"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class PageServer(ThreadingHTTPServer):
    # One h2 connection carrying 100 streams becomes up to 100 upstream connections at
    # once; with http.server's listen backlog of 5 the kernel drops the overflow's final
    # ACKs and those connections wait seconds for a SYN-ACK retransmit (measured: 22 of
    # 200 assets still unanswered after 13 s). A real upstream listens with a real backlog.
    request_queue_size = 1024
    daemon_threads = True


@pytest.fixture
def page_upstream() -> Iterator[Upstream]:
    server = PageServer(("127.0.0.1", 0), PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        yield Upstream(f"http://127.0.0.1:{port}", "127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("chromium is not installed (apt-get install chromium)")


def nss_home(tmp: Path, ca: Path | None) -> Path:
    """A HOME whose ~/.pki/nssdb trusts ``ca`` to issue server certificates (empty if None)."""
    if shutil.which("certutil") is None:
        pytest.skip("certutil is not installed (apt-get install libnss3-tools)")
    home = tmp / "home"
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{db}", "-N", "--empty-password"], check=True, timeout=WAIT,
                   capture_output=True)
    if ca is not None:
        subprocess.run(["certutil", "-d", f"sql:{db}", "-A", "-t", "C,,", "-n", "tlsproxy-test", "-i", str(ca)],
                       check=True, timeout=WAIT, capture_output=True)
    return home


def load_page(url: str, home: Path, profile: Path) -> str:
    """Chromium's DOM of ``url`` after its load event, with a fresh profile (no cache)."""
    shutil.rmtree(profile, ignore_errors=True)
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)},
    )
    return result.stdout


def access_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def page_proxy(pki, upstream: Upstream, tmp: Path, alpn: tuple[str, ...]) -> ProxyThread:
    cert, key = pki.server
    tls = TLSSettings(certificates=(CertificatePair(Path(cert), Path(key)),), alpn=alpn)
    return ProxyThread(proxy_config(pki, Service(name="page", upstreams=(upstream,)), tmp, tls=tls))


def measure(pki, page_upstream: Upstream, tmp: Path, alpn: tuple[str, ...], runs: int) -> tuple[list[float], list]:
    """Load the page ``runs`` times through a proxy offering ``alpn``: the load times
    (ms) and the access log records."""
    tmp.mkdir()
    home = nss_home(tmp, pki.ca_pem)
    times = []
    with page_proxy(pki, page_upstream, tmp, alpn) as px:
        for _ in range(runs):
            dom = load_page(px.url("/"), home, tmp / "profile")
            match = RESULT.search(dom)
            assert match, dom[-2000:]
            loaded, failed, ms, protocol = match.groups()
            assert (int(loaded), int(failed)) == (ASSETS, 0)
            assert protocol == ("h2" if alpn[0] == "h2" else "http/1.1")
            times.append(float(ms))
    return times, access_records(tmp / "access.log")


@pytest.mark.timeout(300)
def test_chromium_loads_200_assets_over_h2_and_http1(pki, page_upstream, tmp_path):
    runs = int(os.environ.get("TLSPROXY_BROWSER_RUNS", "1"))
    h2_times, h2_log = measure(pki, page_upstream, tmp_path / "h2", ("h2", "http/1.1"), runs)
    assets = [r for r in h2_log if r["path"].startswith("/asset/")]
    assert len(assets) == ASSETS * runs
    assert {(r["protocol"], r["status"]) for r in assets} == {("HTTP/2", 200)}
    assert len({r["client"] for r in h2_log if r["path"] != "/favicon.ico"}) == runs  # one connection a load

    h1_times, h1_log = measure(pki, page_upstream, tmp_path / "h1", ("http/1.1",), runs)
    assets = [r for r in h1_log if r["path"].startswith("/asset/")]
    assert len(assets) == ASSETS * runs
    assert {(r["protocol"], r["status"]) for r in assets} == {("HTTP/1.1", 200)}
    print(f"\nChromium, {ASSETS} assets, {runs} load(s) each: h2 median {statistics.median(h2_times):.0f} ms "
          f"{sorted(h2_times)}; http/1.1 median {statistics.median(h1_times):.0f} ms {sorted(h1_times)}")


def test_chromium_websocket_works_beside_an_h2_page(pki, page_upstream, tmp_path, monkeypatch):
    """The page comes over h2; its WebSocket (no extended CONNECT) goes over HTTP/1.1 on
    the same listener, and makes a round trip through the proxy."""
    pytest.importorskip("websockets", reason="needs the websockets package")
    home = nss_home(tmp_path, pki.ca_pem)
    cert, key = pki.server
    tls = TLSSettings(certificates=(CertificatePair(Path(cert), Path(key)),))
    with WebSocketEcho() as ws:
        monkeypatch.setattr(PageHandler, "ws_round_trip", ws.round_trip)
        services = [Service(name="page", upstreams=(page_upstream,)),
                    Service(name="ws", upstreams=(Upstream(f"http://127.0.0.1:{ws.port}", "127.0.0.1", ws.port),),
                            path_prefix="/ws")]
        with ProxyThread(proxy_config(pki, services, tmp_path, tls=tls)) as px:
            dom = load_page(px.url("/ws-page"), home, tmp_path / "profile")
        assert WS_RESULT.search(dom), dom[-2000:]
        assert ws.received == ["ping", "got:echo:ping"]
    protocols = {r["path"]: (r["protocol"], r["status"]) for r in access_records(tmp_path / "access.log")}
    assert protocols["/ws-page"] == ("HTTP/2", 200)
    assert protocols["/ws/chat"] == ("HTTP/1.1", 101)


def test_chromium_refuses_the_proxy_without_the_ca_in_its_nss_database(pki, page_upstream, tmp_path):
    home = nss_home(tmp_path, None)
    with page_proxy(pki, page_upstream, tmp_path, ("h2", "http/1.1")) as px:
        dom = load_page(px.url("/"), home, tmp_path / "profile")
    assert not RESULT.search(dom)
    assert not [r for r in access_records(tmp_path / "access.log") if r["path"] != "-"], "nothing was requested"
