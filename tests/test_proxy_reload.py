"""Reload: new certificates and services without dropping anything; a broken new config
keeps the old one serving. In process (RunningProxy.reload, the file watch) and as
`tlsproxy serve` with SIGHUP."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import requests
from test_proxy_serve import LISTENING, Served
from upstream import WAIT, ProxyThread, TestUpstream, proxy_config, proxy_log_waiter, service

from proxy.config.model import CertificatePair, TLSSettings

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools


def publish(pair: tuple[Path, Path], live: Path) -> CertificatePair:
    """Put a cert/key pair at ``live``.pem/.key, each file replaced atomically."""
    for source, suffix in ((pair[0], ".pem"), (pair[1], ".key")):
        staged = live.with_suffix(suffix + ".new")
        shutil.copyfile(source, staged)
        os.replace(staged, live.with_suffix(suffix))
    return CertificatePair(live.with_suffix(".pem"), live.with_suffix(".key"))


def served_der(pki, port: int) -> bytes:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def der(cert_path: Path) -> bytes:
    """DER of the first (leaf) certificate in a PEM file."""
    end = "-----END CERTIFICATE-----"
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text().split(end)[0] + end + "\n")


async def _reload(px: ProxyThread) -> bool:
    return px.running.reload()


@pytest.fixture
def certs(pki):
    return pki.leaf("first", "localhost", "127.0.0.1"), pki.leaf("second", "localhost", "127.0.0.1")


def test_reload_swaps_certificates_and_keeps_open_connections(pki, upstream, tmp_path, certs):
    first, second = certs
    pair = publish(first, tmp_path / "live")
    config = proxy_config(pki, service("app", upstream), tmp_path, tls=TLSSettings(certificates=(pair,)))
    with ProxyThread(config, config_source=lambda: config) as px, requests.Session() as session:
        session.trust_env = False
        assert session.get(px.url("/echo"), verify=str(pki.ca_pem), timeout=WAIT).status_code == 200
        assert served_der(pki, px.port) == der(first[0])
        publish(second, tmp_path / "live")
        assert px.call(_reload(px)) is True
        assert served_der(pki, px.port) == der(second[0])
        # the keep-alive connection made before the reload is still served
        assert session.get(px.url("/echo"), verify=str(pki.ca_pem), timeout=WAIT).status_code == 200
    assert upstream.accepts == 1


def test_failed_reload_keeps_the_old_config(pki, upstream, tmp_path, certs):
    first, second = certs
    pair = publish(first, tmp_path / "live")
    config = proxy_config(pki, service("app", upstream), tmp_path, tls=TLSSettings(certificates=(pair,)))
    with ProxyThread(config, config_source=lambda: config) as px:
        with proxy_log_waiter("reload failed") as waiter:
            shutil.copyfile(second[0], pair.cert)  # the key no longer matches the certificate
            assert px.call(_reload(px)) is False
        assert waiter.seen.is_set() and "still serving the previous configuration" in waiter.messages[-1]
        assert served_der(pki, px.port) == der(first[0])
        assert requests.get(px.url("/echo"), verify=str(pki.ca_pem), timeout=WAIT).status_code == 200


def test_the_first_generation_frozen_with_start_up_is_collectable_after_a_reload(pki, upstream, tmp_path, certs):
    # `serve` freezes what start-up made (gc.freeze: out of every full collection); frozen
    # objects are never collected, so a reload that replaces the first generation unfreezes
    # them. A failed reload, which keeps that generation serving, leaves them frozen.
    first, second = certs
    pair = publish(first, tmp_path / "live")
    config = proxy_config(pki, service("app", upstream), tmp_path, tls=TLSSettings(certificates=(pair,)))
    with ProxyThread(config, config_source=lambda: config) as px:
        gc.freeze()  # (as _serve_until_signal does once the proxy has started)
        try:
            shutil.copyfile(second[0], pair.cert)  # the key no longer matches the certificate
            assert px.call(_reload(px)) is False
            assert gc.get_freeze_count() > 0
            publish(second, tmp_path / "live")
            assert px.call(_reload(px)) is True
            assert gc.get_freeze_count() == 0
            assert served_der(pki, px.port) == der(second[0])
        finally:
            gc.unfreeze()


def test_changed_certificate_files_reload_without_a_signal(pki, upstream, tmp_path, certs):
    first, second = certs
    pair = publish(first, tmp_path / "live")
    config = proxy_config(pki, service("app", upstream), tmp_path, tls=TLSSettings(certificates=(pair,)))
    with ProxyThread(config, config_source=lambda: config, watch_interval=0.05) as px:
        with proxy_log_waiter("reloaded the configuration") as waiter:
            publish(second, tmp_path / "live")
            assert waiter.seen.wait(WAIT), waiter.messages
        assert served_der(pki, px.port) == der(second[0])


def yaml_config(path: Path, pki, upstream: TestUpstream, version: str) -> Path:
    cert, key = pki.server
    path.write_text(
        'listen: ["127.0.0.1:0"]\n'
        f"tls: {{certificates: [{{cert: {cert}, key: {key}}}]}}\n"
        "access_log: {path: access.log}\n"
        "services:\n"
        "  - name: app\n"
        f"    upstream: {upstream.url}\n"
        f"    set_headers: {{X-Config-Version: '{version}'}}\n"
    )
    return path


def config_version(pki, port: str) -> str:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(WAIT), "--cacert", str(pki.ca_pem), f"https://localhost:{port}/echo"],
        capture_output=True, timeout=WAIT + 5, check=True,
    )
    return dict(json.loads(result.stdout)["headers"])["x-config-version"]


def test_sighup_reloads_the_yaml_and_a_broken_one_is_refused(pki, upstream, tmp_path):
    path = yaml_config(tmp_path / "proxy.yaml", pki, upstream, "1")
    with Served(["-c", str(path)], tmp_path) as served:
        port = served.wait_for(LISTENING).group(1)
        assert config_version(pki, port) == "1"
        yaml_config(path, pki, upstream, "2")
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for(re.compile("reloaded the configuration"))
        assert config_version(pki, port) == "2"
        path.write_text(path.read_text().replace("upstream: http://", "upstream: htp://"))
        served.proc.send_signal(signal.SIGHUP)
        failure = served.wait_for(re.compile("reload failed.*proxy.yaml:"))
        assert "upstream" in failure.string
        assert config_version(pki, port) == "2"
        assert served.stop() == 0


def test_tunnel_survives_a_reload(pki, upstream, tmp_path, certs):
    first, second = certs
    pair = publish(first, tmp_path / "live")
    config = proxy_config(pki, service("app", upstream), tmp_path, tls=TLSSettings(certificates=(pair,)))
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    with ProxyThread(config, config_source=lambda: config) as px:
        with socket.create_connection(("127.0.0.1", px.port), timeout=WAIT) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
                assert tls.recv(65536).startswith(b"HTTP/1.1 101 ")
                publish(second, tmp_path / "live")
                assert px.call(_reload(px)) is True
                tls.sendall(b"after reload")
                assert tls.recv(65536) == b"echo:after reload"
