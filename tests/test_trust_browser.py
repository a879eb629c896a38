"""A real browser: headless Chromium (HOME in a temp folder, so its ~/.pki/nssdb is ours)
refuses the proxy's certificate until `certs trust --install --store nss`, then loads the
page; and it renders the admin's /trust page with the CA's fingerprint on it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from test_admin import AdminThread, Knobs
from trust_helpers import TrustUser, chromium, needs_certutil, needs_chromium

from proxy.server.trust_page import colon_hex


@pytest.fixture
def user(tmp_path: Path) -> TrustUser:
    return TrustUser.make(tmp_path)


@needs_chromium
@needs_certutil
def test_chromium_loads_the_proxy_after_install_store_nss_and_not_before(pki, proxy, user: TrustUser) -> None:
    url = proxy.url("/echo")
    refused = chromium(user, url, "--dump-dom")
    assert '"target": "/echo"' not in refused.stdout
    assert "ERR_CERT_AUTHORITY_INVALID" in refused.stderr, refused.stderr[-2000:]

    install = user.trust(pki.ca_pem, "--install", "--store", "nss")
    assert install.returncode == 0, install.stdout + install.stderr
    loaded = chromium(user, url, "--dump-dom")
    assert '"target": "/echo"' in loaded.stdout, loaded.stderr[-2000:]
    assert "ERR_CERT" not in loaded.stderr

    assert user.trust(pki.ca_pem, "--uninstall", "--store", "nss").returncode == 0
    assert "ERR_CERT_AUTHORITY_INVALID" in chromium(user, url, "--dump-dom").stderr


@needs_chromium
def test_chromium_renders_the_trust_page(pki, user: TrustUser) -> None:
    admin = AdminThread(Knobs(ca=pki.ca_pem.read_bytes()))
    try:
        dom = chromium(user, f"{admin.url}/trust", "--dump-dom")
    finally:
        admin.close()
        admin.stop_loop()
    assert colon_hex(pki.ca_cert.fingerprint(hashes.SHA256())) in dom.stdout
    for heading in ("Linux", "macOS", "Windows", "Firefox", "Android", "iOS"):
        assert f"<h2>{heading}" in dom.stdout
