"""`tlsproxy serve` as a user runs it: a real process, real signals, real clients."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from upstream import WAIT, pattern_sha256

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools

LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+) \(services: (.*)\)")
REDIRECTING = re.compile(r"redirecting http://127\.0\.0\.1:(\d+) to https://")


class Served:
    """``python -m proxy serve ARGS`` with its stderr read line by line in a thread."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", *args],
            cwd=cwd, env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: re.Pattern) -> re.Match:
        while True:
            line = self.lines.get(timeout=WAIT)
            if line is None:
                raise AssertionError(f"serve exited ({self.proc.wait(WAIT)}): {''.join(self.stderr)}")
            match = pattern.search(line)
            if match:
                return match

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self._reader.join(WAIT)
        self.proc.stderr.close()


def curl(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(["curl", "-sS", "--max-time", str(WAIT), *args], capture_output=True, timeout=WAIT + 5)


def test_zero_config_with_cert_and_sigterm(pki, upstream, tmp_path):
    cert, key = pki.server
    args = ["--listen", "127.0.0.1:0", "--upstream", upstream.url, "--cert", str(cert), "--key", str(key)]
    with Served(args, tmp_path) as served:
        port, services = served.wait_for(LISTENING).groups()
        assert services == f"default -> {upstream.url}"
        result = curl("--cacert", str(pki.ca_pem), f"https://localhost:{port}/echo")
        assert result.returncode == 0 and b'"target": "/echo"' in result.stdout
        assert served.stop() == 0
        served.wait_for(re.compile(r"tlsproxy: stopping"))  # every start-up line was read by now
        assert not any("trust it:" in line for line in served.stderr)  # no local CA in use: no hint


def test_zero_config_issues_a_certificate_from_the_local_ca(upstream, tmp_path):
    with Served(["--listen", "127.0.0.1:0", "--upstream", upstream.url], tmp_path) as served:
        port = served.wait_for(LISTENING).group(1)
        ca = tmp_path / "certs" / "ca" / "ca.pem"
        assert served.wait_for(re.compile(r"tlsproxy: CA: (.*)")).group(1) == str(ca)
        trust_it = served.wait_for(re.compile(r"tlsproxy: trust it: (.*)")).group(1)
        assert trust_it == "tlsproxy certs trust --ca certs/ca/ca.pem --install"
        assert curl("--cacert", str(ca), f"https://localhost:{port}/echo").returncode == 0
        untrusted = curl(f"https://localhost:{port}/echo")  # system trust store only
        assert untrusted.returncode == 60  # CURLE_PEER_FAILED_VERIFICATION
        assert served.stop() == 0


def write_config(tmp_path: Path, pki, upstream_url: str, extra: str = "") -> Path:
    cert, key = pki.server
    path = tmp_path / "proxy.yaml"
    path.write_text(
        'listen: ["127.0.0.1:0"]\n'
        'redirect_http: "127.0.0.1:0"\n'
        "tls:\n"
        f"  certificates: [{{cert: {cert}, key: {key}}}]\n"
        "access_log: {path: access.log}\n"
        f"{extra}"
        "services:\n"
        "  - name: app\n"
        f"    upstream: {upstream_url}\n"
    )
    return path


def test_config_file_from_environment_with_redirect_http(pki, upstream, tmp_path):
    config = write_config(tmp_path, pki, upstream.url)
    with Served([], tmp_path, env={"TLSPROXY_CONFIG": str(config)}) as served:
        tls_port = served.wait_for(LISTENING).group(1)
        http_port = served.wait_for(REDIRECTING).group(1)
        redirect = curl("-i", f"http://127.0.0.1:{http_port}/a/b?c=1")
        assert redirect.stdout.startswith(b"HTTP/1.1 308 ")
        assert f"location: https://127.0.0.1:{tls_port}/a/b?c=1".encode() in redirect.stdout.lower()
        followed = curl("-L", "--cacert", str(pki.ca_pem), f"http://localhost:{http_port}/echo")
        assert b'"target": "/echo"' in followed.stdout
        with socket.create_connection(("127.0.0.1", int(http_port)), timeout=WAIT) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no Host: nowhere to redirect to
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
        assert served.stop() == 0
    assert '"status":200' in (tmp_path / "access.log").read_text()


def test_bad_config_exits_1_naming_file_and_line(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text('listen: ["127.0.0.1:0"]\nservices:\n  - name: app\n    upstream: htp://x\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "-c", str(path)],
                            capture_output=True, text=True, timeout=WAIT, cwd=tmp_path)
    assert result.returncode == 1
    assert "proxy.yaml:4" in result.stderr and "upstream" in result.stderr


def test_bad_certificate_exits_1(tmp_path, upstream):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--listen", "127.0.0.1:0", "--upstream", upstream.url,
         "--cert", str(bogus), "--key", str(bogus)],
        capture_output=True, text=True, timeout=WAIT, cwd=tmp_path,
    )
    assert result.returncode == 1 and "bogus.pem" in result.stderr


def test_usage_errors_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--listen", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=WAIT, cwd=tmp_path)
    assert result.returncode == 2 and "--upstream" in result.stderr


def test_port_in_use_exits_1(pki, upstream, tmp_path):
    cert, key = pki.server
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{port}", "--upstream", upstream.url,
             "--cert", str(cert), "--key", str(key)],
            capture_output=True, text=True, timeout=WAIT, cwd=tmp_path,
        )
    assert result.returncode == 1 and "cannot listen" in result.stderr


def test_sigterm_lets_the_request_in_flight_finish(pki, upstream, tmp_path):
    cert, key = pki.server
    args = ["--listen", "127.0.0.1:0", "--upstream", upstream.url, "--cert", str(cert), "--key", str(key)]
    size = 32 << 20
    with Served(args, tmp_path) as served:
        port = served.wait_for(LISTENING).group(1)
        with requests.get(f"https://localhost:{port}/download?size={size}", stream=True,
                          verify=str(pki.ca_pem), timeout=WAIT) as response:
            pieces = response.iter_content(1 << 16)
            digest = hashlib.sha256(next(pieces))
            served.proc.send_signal(signal.SIGTERM)
            served.wait_for(re.compile("stopping"))
            for piece in pieces:
                digest.update(piece)
        assert digest.hexdigest() == pattern_sha256(size)
        assert served.proc.wait(WAIT) == 0


def test_zero_config_with_client_ca_requires_a_client_certificate(pki, upstream, tmp_path):
    cert, key = pki.server
    alice_cert, alice_key = pki.leaf("alice-cli", client=True, cn="alice")
    args = ["--listen", "127.0.0.1:0", "--upstream", upstream.url, "--cert", str(cert), "--key", str(key),
            "--client-ca", str(pki.ca_pem), "--client-auth", "require"]
    with Served(args, tmp_path) as served:
        port = served.wait_for(LISTENING).group(1)
        url = f"https://localhost:{port}/echo"
        refused = curl("--cacert", str(pki.ca_pem), url)
        assert refused.returncode != 0 and b"alert certificate required" in refused.stderr
        admitted = curl("--cacert", str(pki.ca_pem), "--cert", str(alice_cert), "--key", str(alice_key), url)
        assert admitted.returncode == 0
        assert 'Subject="CN=alice"' in dict(json.loads(admitted.stdout)["headers"])["x-forwarded-client-cert"]
        assert served.stop() == 0
