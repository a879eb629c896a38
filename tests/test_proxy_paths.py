"""No spelling of a restricted path prefix reaches an open service whose upstream would
serve it as the restricted one (SPEC section 4, "The path is routed as any common
upstream could read it").

The README's layout: service ``ledger`` (``path_prefix: /ledger``) admits only the
``billing`` client certificate, service ``public`` (``/``) is open, and both go to ONE
upstream. That upstream is a real Flask app (werkzeug decodes ``%2f``, drops ``#…``)
or a real Express app (routes case-insensitively). Each bypass spelling, sent without
a certificate on a raw TLS socket (HTTP clients would tidy the path first), must get
400 or 403 and never the ledger handler's body; the accepted twins (``/ledger/balance``
with the billing certificate, ``/public/x`` without one) must still get 200.

Express needs ``node`` and ``npm install --prefix tests/node`` (``.ci/run`` does it);
without them the Express half skips, saying what is missing.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from upstream import WAIT, ProxyThread, proxy_config, service

from proxy.config.model import AllowEntry, ClientAuthSettings, ServiceClientAuth, Upstream

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools

NODE_DIR = Path(__file__).resolve().parent / "node"
SECRET = b"LEDGER-BALANCE-SECRET"  # only the upstream's ledger handler sends this
BILLING_ONLY = ServiceClientAuth(require=True, allow=(AllowEntry("cn", "billing"),))

BYPASS_SPELLINGS = [
    "/%6cedger/balance",  # encoded unreserved letter
    "/%6Cedger/balance",
    "/l%65dger/balance",
    "//ledger/balance",  # repeated slashes
    "///ledger/balance",
    "/ledger%2fbalance",  # encoded slash: werkzeug decodes it
    "/ledger%2Fbalance",
    "/ledger%5cbalance",
    "/ledger\\balance",
    "/ledger/balance#x",  # werkzeug and express drop the fragment
    "/ledger#x",
    "/LEDGER/balance",  # express routes case-insensitively
    "/Ledger/Balance",
    "/ledger;x/balance",  # path parameters
    "/ledger;/balance",
    "/pub/..%2fledger/balance",
    "/pub/..%2Fledger/balance",
    "/ledger/./balance",
    "/./ledger/balance",
    "/pub/../ledger/balance",
    "/pub/%2e%2e/ledger/balance",  # encoded dot segments
    "/pub/%2E%2E/ledger/balance",
    "/pub/.%2e/ledger/balance",
    "/pub/%2e./ledger/balance",
    "/pub/..;/ledger/balance",  # "..;" is a dot segment to Tomcat, Spring, Jetty
    "/pub/..;x=1/ledger/balance",
    "/pub/..%3b/ledger/balance",  # the same for servers that decode before cutting parameters
    "/ledger%3Bx/balance",
    "/%2e/ledger/balance",
    "/ledger/balance%00",  # NUL and other control characters
    "/ledger/balance%00.css",
    "/ledger%01/balance",
    "/ledger/balance%7f",
    "/ledger/balance%1F",
    "/ledger%",  # malformed escapes
    "/ledger%g0/balance",
    "/ledger/balance%2",
]


def upstream_model(port: int) -> Upstream:
    return Upstream(f"http://127.0.0.1:{port}", "127.0.0.1", port)


@pytest.fixture(scope="module")
def flask_upstream() -> Iterator[int]:
    """A Flask app on werkzeug's threaded dev server, in a thread; yields its port."""
    flask = pytest.importorskip("flask", reason="flask is not installed (pip install -e '.[test]')")
    from werkzeug.serving import make_server

    app = flask.Flask("ledger-upstream")

    @app.get("/ledger")
    @app.get("/ledger/balance")
    def balance():
        return SECRET + b" flask " + flask.request.full_path.encode()

    @app.get("/public/<path:rest>")
    def public(rest):
        return b"public flask " + rest.encode()

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(WAIT)
        server.server_close()


@pytest.fixture(scope="module")
def express_upstream() -> Iterator[int]:
    """tests/node/paths_upstream.js under node; yields its port."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the Express upstream needs it)")
    if not (NODE_DIR / "node_modules" / "express" / "package.json").is_file():
        pytest.skip("express is not installed: run npm install --prefix tests/node --no-audit --no-fund")
    proc = subprocess.Popen(
        [node, str(NODE_DIR / "paths_upstream.js")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=NODE_DIR
    )
    try:
        line = _read_line(proc, WAIT)
        yield json.loads(line)["port"]
    finally:
        proc.stdin.close()  # the script exits when its stdin ends
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
        proc.stdout.close()


def _read_line(proc: subprocess.Popen, timeout: float) -> bytes:
    """The process's first stdout line, or a failure after ``timeout`` seconds."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        pytest.fail("the Express upstream did not report its port")
    return result[0]


@pytest.fixture(params=["flask", "express"])
def app_port(request: pytest.FixtureRequest) -> int:
    return request.getfixturevalue(f"{request.param}_upstream")


@pytest.fixture
def ledger_proxy(pki, app_port: int, tmp_path: Path) -> Iterator[ProxyThread]:
    upstream = upstream_model(app_port)
    services = [
        service("ledger", upstream, path_prefix="/ledger", client_auth=BILLING_ONLY),
        service("public", upstream),
    ]
    client_auth = ClientAuthSettings(mode="optional", ca=pki.ca_pem)
    with ProxyThread(proxy_config(pki, services, tmp_path, client_auth=client_auth)) as px:
        yield px


@pytest.fixture
def billing(pki):
    return pki.leaf("billing", "spiffe://test.local/billing", client=True, cn="billing")


def raw_get(pki, port: int, target: str, cert=None) -> tuple[int, bytes]:
    """Send ``GET target`` exactly as spelled; (status, whole response) after the close."""
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(request)
            chunks = []
            try:
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
            except ConnectionResetError:  # a refused request may be cut short; what came counts
                pass
    response = b"".join(chunks)
    return int(response.split(b" ", 2)[1]), response


def test_no_spelling_of_the_restricted_prefix_reaches_it_without_a_certificate(pki, ledger_proxy):
    leaks = []
    for target in BYPASS_SPELLINGS:
        status, response = raw_get(pki, ledger_proxy.port, target)
        if status not in (400, 403) or SECRET in response:
            leaks.append(f"{target} -> {status}{' with the ledger body' if SECRET in response else ''}")
    assert not leaks, "reached past the ledger policy:\n" + "\n".join(leaks)


def test_the_restricted_path_with_the_allowed_certificate_reaches_the_ledger_handler(pki, ledger_proxy, billing):
    status, response = raw_get(pki, ledger_proxy.port, "/ledger/balance?x=%2F%00", cert=billing)
    assert status == 200 and SECRET in response
    assert response.rstrip().endswith(b"/ledger/balance?x=%2F%00")  # the query went up byte for byte


def test_the_open_service_still_answers_without_a_certificate(pki, ledger_proxy):
    for target in ("/public/x", "/public//x", "/public/%78", "/public/./x"):
        status, response = raw_get(pki, ledger_proxy.port, target)
        assert status == 200 and b"public " in response and SECRET not in response, target


def test_what_goes_upstream_is_the_normalised_path_with_params_and_the_query_as_sent(pki, upstream, tmp_path, billing):
    services = [
        service("ledger", upstream, path_prefix="/ledger", client_auth=BILLING_ONLY),
        service("public", upstream),
    ]
    client_auth = ClientAuthSettings(mode="optional", ca=pki.ca_pem)
    with ProxyThread(proxy_config(pki, services, tmp_path, client_auth=client_auth)) as px:
        sent = {
            "/public//%78;v=1/./y/%2e%2e/z?q=%2F//../%00": "/public/x;v=1/z?q=%2F//../%00",
            "/LEDGER/%62alance;jsessionid=1?a": "/LEDGER/balance;jsessionid=1?a",
            "/pub/%7euser/%c3%a9/": "/pub/~user/%C3%A9/",
        }
        for target in sent:
            status, _ = raw_get(pki, px.port, target, cert=billing)
            assert status == 200, target
    assert [r["target"] for r in upstream.requests] == list(sent.values())
