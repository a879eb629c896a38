"""`tlsproxy certs trust --install / --uninstall / --check` with the real tools, run as a user
whose HOME is a temp folder: NSS databases (certutil), Java's cacerts (keytool, and a Java
client through the proxy), the Debian system store (root only; restored byte for byte), and a
missing certutil reported and skipped. The tests install nothing on the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from trust_helpers import TOOL_WAIT, TrustUser, certutil_listing, needs_certutil, needs_java

from proxy.pki.trust_stores.model import entry_name

JAVA_CLIENT = Path(__file__).parent / "clients" / "TrustClient.java"


@pytest.fixture
def user(tmp_path: Path) -> TrustUser:
    return TrustUser.make(tmp_path)


def firefox_profile(user: TrustUser, base: str, folder: str, *, relative: bool = True, db: bool = True) -> Path:
    """A Firefox-style profile: listed in BASE/profiles.ini, with an empty NSS database."""
    firefox = user.home / base
    profile = firefox / folder if relative else user.home / "elsewhere" / folder
    profile.mkdir(parents=True)
    firefox.mkdir(parents=True, exist_ok=True)
    if db:
        subprocess.run(["certutil", "-N", "-d", f"sql:{profile}", "--empty-password"], check=True, timeout=TOOL_WAIT)
    ini = firefox / "profiles.ini"
    count = ini.read_text().count("[Profile") if ini.exists() else 0
    with ini.open("a") as handle:
        handle.write(f"[Profile{count}]\nName={folder}\nIsRelative={int(relative)}\n"
                     f"Path={folder if relative else profile}\n\n")
    return profile


@needs_certutil
def test_nss_install_check_twice_uninstall(pki, user: TrustUser) -> None:
    name = entry_name(pki.ca_cert)
    shared = user.home / ".pki" / "nssdb"
    profiles = [
        firefox_profile(user, ".mozilla/firefox", "abc.default-release"),
        firefox_profile(user, "snap/firefox/common/.mozilla/firefox", "snp.default"),
        firefox_profile(user, ".var/app/org.mozilla.firefox/.mozilla/firefox", "flat.default", relative=False),
    ]
    unstarted = firefox_profile(user, ".mozilla/firefox", "new.profile", db=False)

    check = user.trust(pki.ca_pem, "--check", "--store", "nss")
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"nss: skipped: {shared} (Chromium/Chrome); no database here yet" in check.stdout
    assert f"nss: skipped: {unstarted} (Firefox profile new.profile); no cert9.db yet" in check.stdout
    assert [line.split(":")[1].strip() for line in user.lines(check, "nss")].count("not trusted") == 3

    install = user.trust(pki.ca_pem, "--install", "--store", "nss")
    assert install.returncode == 0, install.stdout + install.stderr
    for db in (shared, *profiles):
        assert f"nss: installed: {db} " in install.stdout
        assert any(line.split() == [name, "C,,"] for line in certutil_listing(db).splitlines())
    assert (shared / "cert9.db").exists() and not (unstarted / "cert9.db").exists()

    again = user.trust(pki.ca_pem, "--install", "--store", "nss")
    assert again.returncode == 0 and again.stdout.count("nss: already installed: ") == 4, again.stdout
    check = user.trust(pki.ca_pem, "--check", "--store", "nss")
    assert check.returncode == 0 and check.stdout.count("nss: trusted: ") == 4, check.stdout

    removed = user.trust(pki.ca_pem, "--uninstall", "--store", "nss")
    assert removed.returncode == 0 and removed.stdout.count("nss: removed: ") == 4, removed.stdout
    for db in (shared, *profiles):
        assert name not in certutil_listing(db)
    nothing = user.trust(pki.ca_pem, "--uninstall", "--store", "nss")
    assert nothing.returncode == 0 and nothing.stdout.count("nss: not installed, nothing to remove: ") == 4
    check = user.trust(pki.ca_pem, "--check", "--store", "nss")
    assert check.returncode == 1 and "not every store found trusts this CA" in check.stderr


@needs_certutil
def test_uninstall_leaves_other_cas_alone(pki, user: TrustUser) -> None:
    shared = user.home / ".pki" / "nssdb"
    assert user.trust(pki.ca_pem, "--install", "--store", "nss").returncode == 0
    assert user.trust(pki.other_ca_pem, "--install", "--store", "nss").returncode == 0
    assert user.trust(pki.other_ca_pem, "--uninstall", "--store", "nss").returncode == 0
    listing = certutil_listing(shared)
    assert entry_name(pki.ca_cert) in listing and "untrusted-ca" not in listing
    assert user.trust(pki.ca_pem, "--check", "--store", "nss").returncode == 0


def java_get(cacerts: Path, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["java", f"-Djavax.net.ssl.trustStore={cacerts}", "-Djavax.net.ssl.trustStorePassword=changeit",
         str(JAVA_CLIENT), url],
        capture_output=True, text=True, timeout=TOOL_WAIT,
    )


@needs_java
def test_java_store_lets_a_java_client_in(pki, proxy, user: TrustUser, tmp_path: Path) -> None:
    cacerts = user.copy_java(tmp_path)
    url = proxy.url("/echo", host="127.0.0.1")
    refused = java_get(cacerts, url)
    # "PKIX path building failed", or "validation failed" when the copied cacerts holds another CA of the same name
    assert refused.returncode != 0 and "SSLHandshakeException: PKIX path" in refused.stderr, refused.stderr[-2000:]

    install = user.trust(pki.ca_pem, "--install", "--store", "java")
    assert install.returncode == 0, install.stdout + install.stderr
    assert f"java: installed: {cacerts} (alias {entry_name(pki.ca_cert)}; JAVA_HOME)" in install.stdout
    admitted = java_get(cacerts, url)
    assert admitted.returncode == 0 and admitted.stdout.strip() == "200", admitted.stderr[-2000:]

    assert "java: already installed: " in user.trust(pki.ca_pem, "--install", "--store", "java").stdout
    assert user.trust(pki.ca_pem, "--check", "--store", "java").returncode == 0
    assert "java: removed: " in user.trust(pki.ca_pem, "--uninstall", "--store", "java").stdout
    assert user.trust(pki.ca_pem, "--check", "--store", "java").returncode == 1
    assert java_get(cacerts, url).returncode != 0


@needs_java
def test_a_missing_certutil_is_reported_and_skipped(pki, user: TrustUser, tmp_path: Path) -> None:
    cacerts = user.copy_java(tmp_path)
    no_tools = tmp_path / "bin-without-certutil"
    no_tools.mkdir()
    user.env["PATH"] = str(no_tools)  # no certutil
    result = user.trust(pki.ca_pem, "--install", "--store", "nss,java")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nss: skipped; certutil not found; install it: apt install libnss3-tools" in result.stdout
    assert f"java: installed: {cacerts}" in result.stdout  # the other store still ran
    assert not (user.home / ".pki").exists()


def _debian_store_here() -> bool:
    return (
        hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("update-ca-certificates") is not None
        and Path("/etc/ssl/certs/ca-certificates.crt").is_file() and Path("/usr/local/share/ca-certificates").is_dir()
    )


def curl_status(url: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "--noproxy", "*", url],
                          capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.skipif(not _debian_store_here(), reason="needs root and update-ca-certificates (apt install ca-certificates)")
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed (apt install curl)")
def test_debian_system_store_installed_then_restored_byte_for_byte(pki, proxy, user: TrustUser) -> None:
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    anchor = Path("/usr/local/share/ca-certificates") / f"{entry_name(pki.ca_cert)}.crt"
    before = bundle.read_bytes()
    links_before = sorted(os.listdir("/etc/ssl/certs"))
    url = proxy.url("/echo")
    assert curl_status(url, user.env).returncode == 60  # the system store does not know the CA yet
    try:
        install = user.trust(pki.ca_pem, "--install", "--store", "system")
        assert install.returncode == 0, install.stdout + install.stderr
        assert f"system: installed: {anchor} (Debian/Ubuntu)" in install.stdout
        admitted = curl_status(url, user.env)  # plain curl, no --cacert
        assert admitted.returncode == 0 and '"target": "/echo"' in admitted.stdout, admitted.stderr
        assert user.trust(pki.ca_pem, "--check", "--store", "system").returncode == 0
        removed = user.trust(pki.ca_pem, "--uninstall", "--store", "system")
        assert removed.returncode == 0 and f"system: removed: {anchor}" in removed.stdout, removed.stdout
        assert not anchor.exists()
        assert bundle.read_bytes() == before
        assert sorted(os.listdir("/etc/ssl/certs")) == links_before  # no orphan hash links left
        assert f"debian:{anchor.stem}.pem" not in _system_java_aliases()  # ca-certificates-java's hook undone
        assert curl_status(url, user.env).returncode == 60
    finally:
        if anchor.exists():
            anchor.unlink()
            subprocess.run(["update-ca-certificates", "--fresh"], capture_output=True, timeout=TOOL_WAIT, check=False)
        if f"debian:{anchor.stem}.pem" in _system_java_aliases():
            subprocess.run(["keytool", "-delete", "-keystore", "/etc/ssl/certs/java/cacerts", "-storepass", "changeit",
                            "-alias", f"debian:{anchor.stem}.pem"], capture_output=True, timeout=TOOL_WAIT, check=False)


def _system_java_aliases() -> str:
    """The aliases in Debian's shared Java keystore (empty when ca-certificates-java is absent)."""
    keystore = Path("/etc/ssl/certs/java/cacerts")
    if not keystore.exists() or shutil.which("keytool") is None:
        return ""
    return subprocess.run(["keytool", "-list", "-keystore", str(keystore), "-storepass", "changeit"],
                          capture_output=True, text=True, timeout=TOOL_WAIT).stdout


@needs_certutil
def test_a_broken_database_fails_alone_and_exits_1(pki, user: TrustUser) -> None:
    shared = user.home / ".pki" / "nssdb"
    shared.mkdir(parents=True)
    (shared / "cert9.db").write_bytes(b"not a database")
    (shared / "key4.db").write_bytes(b"not a database")
    profile = firefox_profile(user, ".mozilla/firefox", "abc.default-release")
    result = user.trust(pki.ca_pem, "--install", "--store", "nss")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"nss: failed: {shared} (Chromium/Chrome); certutil -d sql:{shared} exited" in result.stdout
    assert f"nss: installed: {profile} " in result.stdout  # the next database still got it
    assert result.stderr.strip() == "tlsproxy: error: trust --install: nss could not be changed (see above)"
