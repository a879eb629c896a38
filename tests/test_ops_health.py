"""`tlsproxy health`: asks what the config says to ask, as a container HEALTHCHECK does
(a real `python -m proxy health` process against a real proxy)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from upstream import WAIT, ProxyThread, proxy_config, service

from proxy.config.model import AdminSettings, ClientAuthSettings, ListenAddress


def health(config: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "health", "-c", str(config)],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout + result.stderr  # one line saying what was checked
    return result.returncode, lines[0]


def write_config(tmp_path: Path, tls_port: int, admin: str | None) -> Path:
    path = tmp_path / "proxy.yaml"
    text = f'listen: ["127.0.0.1:{tls_port}"]\nservices: [{{name: app, upstream: "http://127.0.0.1:9"}}]\n'
    if admin is not None:
        text += f'admin: {{listen: "{admin}"}}\n'
    path.write_text(text)
    return path


def test_admin_listener_on_any_port_is_asked_and_a_stopped_proxy_is_unhealthy(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path, admin=AdminSettings(ListenAddress("127.0.0.1", 0)))
    px = ProxyThread(config)
    try:
        admin_port = px.running.admin_address[1]
        path = write_config(tmp_path, px.port, f"0.0.0.0:{admin_port}")  # a wildcard: asked on loopback
        code, line = health(path)
        assert code == 0, line
        assert line == f"healthy: http://127.0.0.1:{admin_port}/healthz (admin.listen) answered 200"
    finally:
        px.close()
    code, line = health(path)
    assert code == 1
    assert line.startswith(f"unhealthy: http://127.0.0.1:{admin_port}/healthz (admin.listen): connection refused")


def test_without_admin_a_tls_handshake_is_the_check(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        path = write_config(tmp_path, px.port, None)
        code, line = health(path)
        assert code == 0, line
        assert line.startswith(f"healthy: 127.0.0.1:{px.port} (listen; no admin listener configured) completed")
    code, line = health(path)
    assert code == 1 and "connection refused" in line, line


def test_a_listener_requiring_client_certificates_is_still_seen_up(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path)
    config = dataclasses.replace(config, client_auth=ClientAuthSettings(mode="require", ca=pki.ca_pem))
    with ProxyThread(config) as px:
        code, line = health(write_config(tmp_path, px.port, None))
    assert code == 0, line
    assert line.startswith("healthy: ") and "TLS handshake" in line


def test_a_port_that_does_not_speak_tls_is_unhealthy(upstream, tmp_path):
    """Something listens, but not a TLS server (a plain-HTTP upstream)."""
    code, line = health(write_config(tmp_path, int(upstream.url.rsplit(":", 1)[1]), None))
    assert code == 1
    assert line.startswith(f"unhealthy: 127.0.0.1:{upstream.url.rsplit(':', 1)[1]} (listen;")
