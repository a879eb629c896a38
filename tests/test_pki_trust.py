"""Trust without tools: the instructions text, entry names, the commands built for each
platform (macOS and Windows cannot run here: their argv is what is tested), parsing what
the tools print, and ``act`` over a system store in a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.errors import PKIError
from proxy.pki.build import create_ca
from proxy.pki.store import certs_pem, load_certificates
from proxy.pki.trust import ca_banner, trust_instructions
from proxy.pki.trust_stores import Machine, apply, exit_code, java, nss, system
from proxy.pki.trust_stores.model import Outcome, Status, TrustedCA, act, entry_name


def test_instructions_use_absolute_paths_and_never_disable_verification(pki) -> None:
    text = trust_instructions(pki.ca_pem, pki.ca_cert)
    path = str(pki.ca_pem.absolute())
    assert f"export SSL_CERT_FILE={path} REQUESTS_CA_BUNDLE={path} CURL_CA_BUNDLE={path} NODE_EXTRA_CA_CERTS={path}" in text
    assert f"curl --cacert {path}" in text and f"verify={path!r}" in text and "cafile=" in text
    assert pki.ca_cert.subject.rfc4514_string() in text
    assert "verify=False" not in text and "--insecure" not in text


def test_instructions_cover_browsers_java_and_a_client_certificate(pki) -> None:
    text = trust_instructions(pki.ca_pem, pki.ca_cert)
    name = entry_name(pki.ca_cert)
    assert f"certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n {name} -i {pki.ca_pem.absolute()}" in text
    assert "--install --store nss" in text and "--install --store system" in text and "Firefox" in text
    assert f"keytool -importcert -noprompt -cacerts -storepass changeit -alias {name}" in text
    assert "pk12util -d sql:$HOME/.pki/nssdb -i certs/alice.p12" in text
    assert "AutoSelectCertificateForUrls" in text and '\\"CN\\": \\"tlsproxy local CA\\"' in text


def test_entry_names_follow_subject_and_fingerprint(pki) -> None:
    name = entry_name(pki.ca_cert)
    assert name.startswith("tlsproxy-tlsproxy-local-ca-") and len(name.rsplit("-", 1)[1]) == 12
    assert entry_name(load_certificates(pki.ca_pem)[0]) == name  # the same CA: the same name
    twin, _key = create_ca()  # same subject, another key
    assert entry_name(twin) != name and entry_name(twin).startswith("tlsproxy-tlsproxy-local-ca-")


def test_banner_shows_the_ca_and_a_command_relative_to_the_working_folder(tmp_path: Path) -> None:
    ca = tmp_path / "certs" / "ca" / "ca.pem"
    assert ca_banner(ca, cwd=tmp_path) == [f"CA: {ca}", "trust it: tlsproxy certs trust --ca certs/ca/ca.pem --install"]
    elsewhere = ca_banner(ca, cwd=tmp_path / "other")
    assert elsewhere[1] == f"trust it: tlsproxy certs trust --ca {ca} --install"


# --- commands built for each platform ------------------------------------------------------------


def test_macos_commands() -> None:
    pem = Path("/tmp/ca.pem")
    assert system.macos_commands("install", pem, "AB12") == [
        ["security", "add-trusted-cert", "-d", "-r", "trustRoot", "-k", "/Library/Keychains/System.keychain", "/tmp/ca.pem"]
    ]
    assert system.macos_commands("uninstall", pem, "AB12") == [
        ["security", "remove-trusted-cert", "-d", "/tmp/ca.pem"],
        ["security", "delete-certificate", "-Z", "AB12", "/Library/Keychains/System.keychain"],
    ]
    assert system.macos_commands("check", pem, "AB12") == [["security", "verify-cert", "-c", "/tmp/ca.pem"]]


def test_windows_commands() -> None:
    pem = Path("C:/ca.pem")
    assert system.windows_commands("install", pem, "AB12") == [["certutil", "-addstore", "-f", "ROOT", "C:/ca.pem"]]
    assert system.windows_commands("uninstall", pem, "AB12") == [["certutil", "-delstore", "ROOT", "AB12"]]
    assert system.windows_commands("check", pem, "AB12") == [["certutil", "-verifystore", "ROOT", "AB12"]]


def test_debian_refreshes_fresh_after_a_removal_alpine_plainly() -> None:
    assert system.DEBIAN.refresh == ("update-ca-certificates",)
    assert system.DEBIAN.refresh_removed == ("update-ca-certificates", "--fresh")
    assert system.ALPINE.refresh_removed is None and system.LINUX_FLAVOURS.index(system.ALPINE) == 0


def test_arch_commands() -> None:
    assert system.arch_commands("install", Path("/t/ca.pem")) == [["trust", "anchor", "--store", "/t/ca.pem"]]
    assert system.arch_commands("uninstall", Path("/t/ca.pem")) == [["trust", "anchor", "--remove", "/t/ca.pem"]]


def test_nss_and_keytool_commands(tmp_path: Path) -> None:
    assert nss.add_argv(Path("/h/.pki/nssdb"), "tlsproxy-x-1", Path("/t/ca.pem")) == [
        "certutil", "-d", "sql:/h/.pki/nssdb", "-A", "-t", "C,,", "-n", "tlsproxy-x-1", "-i", "/t/ca.pem"
    ]
    assert java.keytool_argv("keytool", Path("/j/cacerts"), "-delete", "-alias", "a") == [
        "keytool", "-delete", "-alias", "a", "-keystore", "/j/cacerts", "-storepass", "changeit", "-noprompt"
    ]


def test_the_platform_picks_the_system_store(pki, tmp_path: Path) -> None:
    ca = TrustedCA(pki.ca_cert, pki.ca_pem)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("security", "certutil"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    mac = system.find(ca, Machine(tmp_path, {"PATH": str(bin_dir)}, "darwin"))
    assert isinstance(mac, system.ToolStore) and mac.where == "macOS System keychain"
    assert mac.commands("install")[0][:2] == ["security", "add-trusted-cert"]
    win = system.find(ca, Machine(tmp_path, {"PATH": str(bin_dir)}, "win32"))
    assert isinstance(win, system.ToolStore) and win.commands("install")[0][:2] == ["certutil", "-addstore"]
    bare = system.find(ca, Machine(tmp_path, {"PATH": str(tmp_path / "empty")}, "darwin", admin_dirs=()))
    assert isinstance(bare, Outcome) and bare.status is Status.SKIPPED and "security not found" in bare.detail


# --- parsing what tools and files say ------------------------------------------------------------


def test_bundle_holds_compares_certificates_not_text(pki) -> None:
    ca = TrustedCA(pki.ca_cert, pki.ca_pem)
    other = load_certificates(pki.other_ca_pem)[0]
    junk = b"-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n"
    assert system.bundle_holds(junk + certs_pem([other, pki.ca_cert]), ca.der)
    assert not system.bundle_holds(junk + certs_pem([other]), ca.der)
    assert not system.bundle_holds(b"", ca.der)


def test_certutil_listing_is_parsed_per_nickname() -> None:
    listing = (
        "\nCertificate Nickname                                         Trust Attributes\n"
        "                                                             SSL,S/MIME,JAR/XPI\n\n"
        "tlsproxy-a-0123456789ab                                      C,,  \n"
        "my old CA                                                    CT,C,C\n"
        "alice                                                        u,u,u\n"
    )
    assert nss.trust_flags(listing, "tlsproxy-a-0123456789ab") == "C,,"
    assert nss.trust_flags(listing, "my old CA") == "CT,C,C"
    assert nss.trust_flags(listing, "tlsproxy-b-0123456789ab") is None
    assert nss.trust_flags(listing, "my") is None


def test_firefox_profiles_from_profiles_ini(tmp_path: Path) -> None:
    firefox = tmp_path / ".mozilla" / "firefox"
    firefox.mkdir(parents=True)
    (firefox / "profiles.ini").write_text(
        "[Install4F96D1932A9F858E]\nDefault=abc.default-release\nLocked=1\n\n"
        "[Profile1]\nName=default\nIsRelative=1\nPath=xyz.default\n\n"
        "[Profile0]\nName=default-release\nIsRelative=1\nPath=abc.default-release\nDefault=1\n\n"
        f"[Profile2]\nName=elsewhere\nIsRelative=0\nPath={tmp_path / 'away'}\n\n"
        "[General]\nStartWithLastProfile=1\nVersion=2\n"
    )
    assert nss.firefox_profiles(firefox) == [firefox / "xyz.default", firefox / "abc.default-release", tmp_path / "away"]
    assert nss.firefox_profiles(tmp_path / "nowhere") == []


def test_java_home_from_env_or_the_real_path_of_java(tmp_path: Path) -> None:
    assert java.java_home(Machine(tmp_path, {"JAVA_HOME": "/opt/jdk"}))[0] == Path("/opt/jdk")
    jdk_bin = tmp_path / "jvm" / "jdk-21" / "bin"
    jdk_bin.mkdir(parents=True)
    (jdk_bin / "java").write_text("#!/bin/sh\n")
    (jdk_bin / "java").chmod(0o755)
    path_dir = tmp_path / "usr-bin"
    path_dir.mkdir()
    os.symlink(jdk_bin / "java", path_dir / "java")  # like /usr/bin/java -> alternatives -> the JDK
    home, how = java.java_home(Machine(tmp_path, {"PATH": str(path_dir)}))
    assert home == tmp_path / "jvm" / "jdk-21" and str(path_dir / "java") in how
    assert java.java_home(Machine(tmp_path, {"PATH": str(tmp_path / "empty")}))[0] is None


# --- acting, and the exit code --------------------------------------------------------------------


def folder_flavour(tmp_path: Path, refresh: tuple[str, ...] | None = None) -> system.Flavour:
    """A Debian-like store in TMP_PATH whose "update tool" concatenates the anchors."""
    anchors, bundle = tmp_path / "anchors", tmp_path / "bundle.crt"
    anchors.mkdir(exist_ok=True)
    rebuild = f"cat {anchors}/*.crt > {bundle} 2>/dev/null || : > {bundle}"
    return system.Flavour("test", "sh", bundle, anchors=anchors, refresh=refresh or ("sh", "-c", rebuild))


def test_the_system_store_is_found_in_sbin_when_path_lacks_it(pki, tmp_path: Path) -> None:
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "update-tool").write_text("#!/bin/sh\n")
    (sbin / "update-tool").chmod(0o755)
    flavour = system.Flavour("test", "update-tool", tmp_path / "bundle", anchors=tmp_path, refresh=("update-tool", "-x"),
                             refresh_removed=("update-tool", "--fresh"))
    ca = TrustedCA(pki.ca_cert, pki.ca_pem)
    user = Machine(tmp_path, {"PATH": str(tmp_path / "bin")}, "linux", admin_dirs=(str(sbin),))
    place = system.find(ca, user, (flavour,))
    assert isinstance(place, system.AnchorFolder) and place.refresh() == [str(sbin / "update-tool"), "-x"]
    assert place.refresh(removed=True) == [str(sbin / "update-tool"), "--fresh"]
    missing = system.find(ca, Machine(tmp_path, {"PATH": str(tmp_path / "bin")}, "linux", admin_dirs=()), (flavour,))
    assert isinstance(missing, Outcome) and missing.status is Status.SKIPPED


def test_anchor_folder_install_twice_check_uninstall(pki, tmp_path: Path) -> None:
    ca = TrustedCA(pki.ca_cert, pki.ca_pem)
    place = system.AnchorFolder(folder_flavour(tmp_path), ca, Machine(tmp_path, dict(os.environ)), "sh")
    assert act("check", "system", place).status is Status.NOT_TRUSTED
    assert act("uninstall", "system", place).status is Status.ABSENT
    assert act("install", "system", place).status is Status.INSTALLED
    assert place.file.name == f"{entry_name(pki.ca_cert)}.crt" and load_certificates(place.file) == [pki.ca_cert]
    assert act("install", "system", place).status is Status.ALREADY
    assert act("check", "system", place).status is Status.TRUSTED
    assert act("uninstall", "system", place).status is Status.REMOVED
    assert not place.file.exists() and act("check", "system", place).status is Status.NOT_TRUSTED


def test_a_failing_update_tool_is_a_failed_outcome(pki, tmp_path: Path) -> None:
    ca = TrustedCA(pki.ca_cert, pki.ca_pem)
    place = system.AnchorFolder(folder_flavour(tmp_path, ("false",)), ca, Machine(tmp_path, dict(os.environ)), "false")
    outcome = act("install", "system", place)
    assert outcome.status is Status.FAILED and "false exited 1" in outcome.detail
    assert outcome.line().startswith("system: failed: ")


def test_only_a_ca_is_installed(pki) -> None:
    with pytest.raises(PKIError, match="not a CA"):
        apply("install", pki.server[0], ["nss"])


def test_missing_tools_are_skipped_by_name(pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    machine = Machine(tmp_path, {"PATH": str(empty)}, "linux", admin_dirs=())
    outcomes = apply("install", pki.ca_pem, ["system", "nss", "java"], machine)
    assert [o.status for o in outcomes] == [Status.SKIPPED] * 3
    lines = "\n".join(o.line() for o in outcomes)
    assert "update-ca-certificates not found" in lines and "certutil not found" in lines
    assert "libnss3-tools" in lines and "no JAVA_HOME and no java on PATH" in lines
    assert exit_code("install", outcomes) == 0 and exit_code("check", outcomes) == 1
    assert not (tmp_path / ".pki").exists()  # nothing was created for a store that was skipped


@pytest.mark.parametrize(
    ("action", "statuses", "code"),
    [
        ("install", [Status.INSTALLED, Status.SKIPPED, Status.ALREADY], 0),
        ("install", [Status.INSTALLED, Status.FAILED], 1),
        ("uninstall", [Status.REMOVED, Status.ABSENT, Status.SKIPPED], 0),
        ("check", [Status.TRUSTED, Status.SKIPPED], 0),
        ("check", [Status.TRUSTED, Status.NOT_TRUSTED], 1),
        ("check", [Status.SKIPPED], 1),
        ("check", [Status.TRUSTED, Status.FAILED], 1),
    ],
)
def test_exit_codes(action: str, statuses: list[Status], code: int) -> None:
    assert exit_code(action, [Outcome("s", "w", status) for status in statuses]) == code

