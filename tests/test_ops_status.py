"""The admin status page of one process: a refused client shows up with its reason
right after it was refused, in the HTML (stdlib parser) and as a browser renders it
(headless Chromium, JavaScript off)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile

import pytest
import requests
from test_ops_workers import get, refused_handshake, status_rows
from upstream import WAIT, ProxyThread, proxy_config, service

from proxy.config.model import (
    AdminSettings,
    AllowEntry,
    ClientAuthSettings,
    ListenAddress,
    Service,
    ServiceClientAuth,
    UpstreamTLSSettings,
)
from proxy.config.values import parse_upstream


@pytest.fixture
def guarded(pki, upstream, tmp_path):
    private = service("private", upstream, path_prefix="/private",
                      client_auth=ServiceClientAuth(require=True, allow=(AllowEntry("cn", "alice"),)))
    client_cert, client_key = pki.leaf("status-egress", "egress", client=True, cn="egress")
    egress = Service(name="egress", upstreams=(parse_upstream("https://127.0.0.1:9"),), path_prefix="/out",
                     upstream_tls=UpstreamTLSSettings(ca=pki.ca_pem, cert=client_cert, key=client_key))
    config = proxy_config(pki, [private, service("app", upstream), egress], tmp_path,
                          admin=AdminSettings(ListenAddress("127.0.0.1", 0)))
    config = dataclasses.replace(config, client_auth=ClientAuthSettings(mode="optional", ca=pki.ca_pem))
    with ProxyThread(config) as px:
        yield px


def test_a_refused_client_is_on_the_page_with_its_reason(pki, guarded):
    admin = "http://127.0.0.1:%d" % guarded.running.admin_address[1]
    assert status_rows(admin)["Refused handshakes and requests"] == [["no client refused since start"]]
    bob = pki.leaf("status-bob", client=True, cn="bob")
    response = requests.get(f"https://localhost:{guarded.port}/private/x", verify=str(pki.ca_pem),
                            cert=(str(bob[0]), str(bob[1])), timeout=WAIT)
    assert response.status_code == 403
    refused_handshake(guarded.port, pki.leaf("status-stranger", client=True, ca="other"), pki.ca_pem)

    handshake, request = status_rows(admin)["Refused handshakes and requests"]  # newest first
    assert handshake[2:5] == ["not read (see the reason)", "—", "handshake"] and "untrusted" in handshake[5]
    assert request[2:5] == ["CN=bob", "private", "request (403)"]
    assert request[5] == response.text.strip()  # the reason the client was given, in words
    services = status_rows(admin)["Services"]
    assert [row[0] for row in services] == ["private", "app", "egress"]
    assert "allow cn=alice" in services[0][3]
    roles = {row[0]: row for row in status_rows(admin)["Certificates"]}
    assert set(roles) == {"server", "client CA", "client, to egress's upstream"}
    assert roles["client, to egress's upstream"][2] == "CN=egress"
    assert roles["client CA"][1] == str(pki.ca_pem)
    listeners = status_rows(admin)["Listeners"]
    assert listeners[0][0] == f"127.0.0.1:{guarded.port}" and "HTTPS" in listeners[0][1]


def test_chromium_shows_the_refusal_without_javascript(pki, guarded):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no headless Chromium installed")
    admin = "http://127.0.0.1:%d/" % guarded.running.admin_address[1]
    refused_handshake(guarded.port, pki.leaf("status-stranger", client=True, ca="other"), pki.ca_pem)
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-javascript",
             f"--user-data-dir={profile}", "--dump-dom", admin],
            capture_output=True, text=True, timeout=90, check=False,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert "Refused handshakes and requests" in dom
    assert "untrusted self-signed CA" in dom
    assert get(admin)[0] == 200
