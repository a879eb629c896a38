"""Key exchange groups (SPEC section 3, TLS defaults): Mozilla's "intermediate" profile
allows X25519, P-256 and P-384 only, so a client offering nothing but X448, P-521 or a
finite-field group gets a handshake failure, and a client offering one of the three
gets it.

Real handshakes: ``openssl s_client`` against a proxy listener on 127.0.0.1, with the
session PKI's certificate (an ECDSA P-256 key, so TLS 1.2 clients must list P-256 among
their groups to accept the certificate itself; the 1.2 cases therefore offer a refused
group first and P-256 second, and check which one the server chose).
"""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess

import pytest
from upstream import WAIT

from proxy.tls import openssl_ctl
from proxy.tls.context import GROUPS, ServerTLS

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command line tool is not installed")


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """One handshake with ``openssl s_client``; stdin is empty so it closes right after."""
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


def handshake_succeeded(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "Cipher is (NONE)" not in result.stdout and "Server Temp Key" in result.stdout


def temp_key(result: subprocess.CompletedProcess[str]) -> str:
    """The group the server chose, as s_client prints it: ``X25519``, ``prime256v1``
    (from ``ECDH, prime256v1, 256 bits``), ``DH`` for a finite-field group."""
    line = next(line for line in result.stdout.splitlines() if line.startswith("Server Temp Key:"))
    parts = [part.strip() for part in line.partition(":")[2].split(",")]
    return parts[1] if parts[0] == "ECDH" else parts[0]


@needs_openssl
@pytest.mark.parametrize("group", ["X448", "secp521r1", "ffdhe2048", "ffdhe3072"])
def test_tls13_client_with_only_a_refused_group_fails(proxy, group):
    result = s_client(proxy.port, "-tls1_3", "-groups", group)
    assert not handshake_succeeded(result), result.stdout
    assert "handshake failure" in result.stderr or "alert" in result.stderr


@needs_openssl
@pytest.mark.parametrize(("group", "shown"), [("X25519", "X25519"), ("P-256", "prime256v1"), ("P-384", "secp384r1")])
def test_tls13_client_with_an_allowed_group_succeeds(proxy, group, shown):
    result = s_client(proxy.port, "-tls1_3", "-groups", group)
    assert handshake_succeeded(result), result.stderr
    assert temp_key(result) == shown


@needs_openssl
@pytest.mark.parametrize("refused", ["X448", "secp521r1"])
def test_tls12_server_never_picks_a_refused_group(proxy, refused):
    # Without server preference the client's first shared group wins: it is P-256 only
    # because the refused one is not shared.
    result = s_client(proxy.port, "-tls1_2", "-groups", f"{refused}:P-256")
    assert handshake_succeeded(result), result.stderr
    assert temp_key(result) == "prime256v1"


@needs_openssl
def test_tls13_client_preferring_x448_is_moved_to_x25519(proxy):
    # The client's key share is for X448; the server asks again (HelloRetryRequest).
    result = s_client(proxy.port, "-tls1_3", "-groups", "X448:X25519")
    assert handshake_succeeded(result), result.stderr
    assert temp_key(result) == "X25519"


def test_the_profile_is_the_three_groups():
    assert GROUPS == ("X25519", "P-256", "P-384")


def test_without_libssl_the_context_falls_back_to_p256_and_says_so(pki, tmp_path, monkeypatch, caplog):
    from upstream import proxy_config, service
    from proxy.config.model import Upstream

    def no_libssl():
        raise OSError("libssl not found")

    monkeypatch.setattr(openssl_ctl, "_libssl", None)
    monkeypatch.setattr(openssl_ctl, "_load_libssl", no_libssl)
    config = proxy_config(pki, service("app", Upstream("http://127.0.0.1:9", "127.0.0.1", 9)), tmp_path)
    with caplog.at_level(logging.WARNING, logger="tlsproxy"):
        server_tls = ServerTLS.from_config(config)
    assert any("P-256" in record.getMessage() for record in caplog.records)
    assert isinstance(server_tls.context, ssl.SSLContext)


def test_openssl_takes_the_groups_list_and_refuses_an_unknown_group():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert openssl_ctl.set_groups(context, GROUPS) is True
    assert openssl_ctl.set_groups(context, ["no-such-group"]) is False
