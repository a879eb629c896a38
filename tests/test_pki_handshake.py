"""Real TLS handshakes on 127.0.0.1 with certificates from the toolkit.

A tiny threaded HTTPS responder (stdlib ``ssl``) stands in for a server; clients are
Python ``ssl`` (hostname checking on), curl, requests, httpx and node, each trusting only
the CA file. Every case has its refused twin.
"""

from __future__ import annotations

import queue
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import requests

from proxy.pki.build import self_signed
from proxy.pki.store import write_leaf

TIMEOUT = 10.0
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class TLSResponder:
    """Accepts connections on 127.0.0.1:0, answers ``ok``; ``outcomes`` gets "ok" or the
    server-side handshake error for each connection, so tests wait on events, not time."""

    def __init__(self, cert: Path, key: Path, *, client_ca: Path | None = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.outcomes: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TLSResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.listener.close()

    def outcome(self) -> str:
        return self.outcomes.get(timeout=TIMEOUT)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(TIMEOUT)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    tls.sendall(RESPONSE)
                self.outcomes.put("ok")
            except (ssl.SSLError, OSError) as exc:
                self.outcomes.put(str(exc))
                conn.close()


def python_get(port: int, ca: Path, host: str = "localhost", cert: tuple[Path, Path] | None = None) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    assert context.check_hostname
    if cert:
        context.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return tls.recv(4096)


def test_python_client_trusting_only_the_ca(pki) -> None:
    with TLSResponder(*pki.server) as server:
        for host in ("localhost", "127.0.0.1", "::1"):
            assert python_get(server.port, pki.ca_pem, host).endswith(b"ok")
            assert server.outcome() == "ok"


def test_python_client_refuses_other_ca_and_wrong_host(pki) -> None:
    with TLSResponder(*pki.server) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            python_get(server.port, pki.other_ca_pem)
        server.outcome()
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            python_get(server.port, pki.ca_pem, "example.com")
        server.outcome()
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            python_get(server.port, pki.ca_pem, "api.localhost")  # OpenSSL ignores *.localhost
        server.outcome()


def test_python_client_refuses_expired_server(pki) -> None:
    with TLSResponder(*pki.leaf("expired-server", "localhost", expired=True)) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            python_get(server.port, pki.ca_pem)
        server.outcome()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_with_cacert(pki) -> None:
    with TLSResponder(*pki.server) as server:
        url = f"https://localhost:{server.port}/"
        base = ["curl", "-sS", "--max-time", "10", "--resolve", f"localhost:{server.port}:127.0.0.1"]
        ok = subprocess.run([*base, "--cacert", pki.ca_pem, url], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and ok.stdout == "ok", ok.stderr
        assert server.outcome() == "ok"
        bad = subprocess.run([*base, "--cacert", pki.other_ca_pem, url], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 60  # peer certificate cannot be authenticated with known CA certificates
        server.outcome()


def test_requests_and_httpx_with_the_ca(pki) -> None:
    with TLSResponder(*pki.server) as server:
        url = f"https://127.0.0.1:{server.port}/"
        assert requests.get(url, verify=str(pki.ca_pem), timeout=TIMEOUT).text == "ok"
        server.outcome()
        context = ssl.create_default_context(cafile=str(pki.ca_pem))
        assert httpx.get(url, verify=context, timeout=TIMEOUT).text == "ok"
        server.outcome()
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url, verify=str(pki.other_ca_pem), timeout=TIMEOUT)
        server.outcome()


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_node_with_extra_ca_certs(pki) -> None:
    script = (
        "require('https').get(process.argv[1], r => { let b=''; r.on('data', d => b += d);"
        " r.on('end', () => { console.log(b); }); }).on('error', e => { console.error(e.code); process.exit(3); });"
    )
    with TLSResponder(*pki.server) as server:
        url = f"https://127.0.0.1:{server.port}/"
        for ca, expected in ((pki.ca_pem, 0), (pki.other_ca_pem, 3)):
            env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "NODE_EXTRA_CA_CERTS": str(ca)}
            run = subprocess.run(["node", "-e", script, url], env=env, capture_output=True, text=True, timeout=30)
            assert run.returncode == expected, run.stderr
            server.outcome()


def test_client_cert_accepted_by_server_requiring_one(pki) -> None:
    client = pki.leaf("alice", "alice@example.com", "spiffe://corp/alice", client=True)
    with TLSResponder(*pki.server, client_ca=pki.ca_pem) as server:
        assert python_get(server.port, pki.ca_pem, cert=client).endswith(b"ok")
        assert server.outcome() == "ok"


@pytest.mark.parametrize(
    ("which", "server_error"),
    [
        ("server cert as client cert", "unsuitable certificate purpose"),
        ("client cert from another CA", "certificate verify failed"),
        ("expired client cert", "certificate has expired"),
        ("no client cert", "certificate"),
    ],
)
def test_client_cert_refused(pki, which: str, server_error: str) -> None:
    client = {
        "server cert as client cert": pki.server,
        "client cert from another CA": pki.leaf("mallory", "mallory@example.com", client=True, ca="other"),
        "expired client cert": pki.leaf("old", "old@example.com", client=True, expired=True),
        "no client cert": None,
    }[which]
    with TLSResponder(*pki.server, client_ca=pki.ca_pem) as server:
        try:
            reply = python_get(server.port, pki.ca_pem, cert=client)
        except (ssl.SSLError, ConnectionError):
            reply = b""
        assert not reply.endswith(b"ok")
        assert server_error in server.outcome()


def test_self_signed_server_trusted_directly(tmp_path: Path) -> None:
    cert, key = self_signed(["localhost", "127.0.0.1"])
    pem, key_path = write_leaf(tmp_path / "ss", cert, key, [])
    other, other_key = self_signed(["localhost"])
    other_pem, _ = write_leaf(tmp_path / "other", other, other_key, [])
    with TLSResponder(pem, key_path) as server:
        assert python_get(server.port, pem).endswith(b"ok")
        server.outcome()
        with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate"):
            python_get(server.port, other_pem)
        server.outcome()
