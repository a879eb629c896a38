"""`tlsproxy check`: the file checks (in-process) and the command (a few subprocess runs)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.check.checks import CheckReport, check_files
from proxy.config.load import load_config_with_lines
from proxy.pki.build import create_ca, issue_leaf, make_crl
from proxy.pki.store import certs_pem, load_certificates, write_crl, write_leaf

REPO = Path(__file__).resolve().parent.parent


def write_config(folder: Path, cert: Path, key: Path, client_ca: Path | None = None, crl: Path | None = None) -> Path:
    """A config whose certificate pair sits on line 3 (cert and key on one line)."""
    client_auth = ""
    if client_ca is not None:
        client_auth = f"client_auth:\n  mode: require\n  ca: {client_ca}\n"
        if crl is not None:
            client_auth += f"  crl: {crl}\n"
    path = folder / "proxy.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            tls:
              certificates:
                - {{cert: {cert}, key: {key}}}
            """
        )
        + client_auth
        + "services:\n  - {name: api, hosts: [localhost], upstream: http://127.0.0.1:9000}\n",
        encoding="utf-8",
    )
    return path


def check(path: Path, now: dt.datetime | None = None) -> CheckReport:
    config, lines = load_config_with_lines(path, {})
    return check_files(config, lines, "proxy.yaml", now=now)


def messages(report: CheckReport, severity: str = "error") -> list[str]:
    return [f.message for f in report.findings if f.severity == severity]


def run_check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


# --- in-process file checks -----------------------------------------------------------


def test_good_pair_with_client_ca_and_crl(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    report = check(write_config(tmp_path, cert, key, pki.ca_pem, pki.crl([])))
    assert report.ok, report.findings
    assert report.findings == []
    (info,) = report.certificates
    assert "localhost" in info.names
    assert 360 <= info.days_left <= 366


def test_key_of_another_certificate(pki, tmp_path: Path) -> None:
    cert, _ = pki.server
    _, other_key = pki.leaf("other", "other.test")
    report = check(write_config(tmp_path, cert, other_key))
    assert messages(report) == [f"proxy.yaml:3: tls.certificates[0].key: {other_key} is not the private key of {cert}"]


def test_chain_in_wrong_order(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    leaf, ca = load_certificates(cert)
    reversed_pem = tmp_path / "reversed.pem"
    reversed_pem.write_bytes(certs_pem([ca, leaf]))
    report = check(write_config(tmp_path, reversed_pem, key))
    errors = messages(report)
    assert any(
        m.startswith("proxy.yaml:3: tls.certificates[0].cert: ") and "certificate 1 (O=tlsproxy,CN=tlsproxy local CA)" in m
        and "is not issued by certificate 2 (CN=localhost" in m
        for m in errors
    ), errors


def test_chain_signed_by_a_different_key(pki, tmp_path: Path) -> None:
    """Same issuer name, different CA key: names alone would pass, the signature does not."""
    cert, key = pki.server
    impostor_ca, _ = create_ca()  # the default CA name, as the session CA
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(certs_pem([load_certificates(cert)[0], impostor_ca]))
    errors = messages(check(write_config(tmp_path, mixed, key)))
    assert any("does not verify with the key of certificate 2" in m for m in errors), errors


def test_expired_certificate_is_an_error(pki, tmp_path: Path) -> None:
    cert, key = pki.leaf("expired", "localhost", expired=True)
    errors = messages(check(write_config(tmp_path, cert, key)))
    assert len(errors) == 1 and "certificate 1 (CN=localhost) expired on" in errors[0], errors


def test_not_yet_valid_certificate_is_an_error(pki, tmp_path: Path) -> None:
    cert, key = pki.leaf("future", "localhost", not_yet_valid=True)
    errors = messages(check(write_config(tmp_path, cert, key)))
    assert len(errors) == 1 and "is not valid before" in errors[0], errors


def test_certificate_expiring_soon_is_a_warning(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    soon = load_certificates(cert)[0].not_valid_after_utc - dt.timedelta(days=5)
    report = check(write_config(tmp_path, cert, key), now=soon)
    assert report.ok
    (warning,) = messages(report, "warning")
    assert warning.startswith("proxy.yaml:3: tls.certificates[0].cert: ") and "expires in 5 days" in warning


@pytest.mark.parametrize("broken", ["cert", "key"])
def test_missing_files(pki, tmp_path: Path, broken: str) -> None:
    cert, key = pki.server
    files = {"cert": cert, "key": key, broken: tmp_path / "missing.pem"}
    errors = messages(check(write_config(tmp_path, files["cert"], files["key"])))
    assert errors == [f"proxy.yaml:3: tls.certificates[0].{broken}: {tmp_path / 'missing.pem'}: no such file"]


def test_garbage_certificate_and_key(pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, _ = pki.server
    errors = messages(check(write_config(tmp_path, garbage, garbage)))
    assert errors == [f"proxy.yaml:3: tls.certificates[0].cert: {garbage}: holds no PEM certificate (BEGIN CERTIFICATE block)"]
    errors = messages(check(write_config(tmp_path, cert, garbage)))
    assert errors == [f"proxy.yaml:3: tls.certificates[0].key: {garbage}: holds no PEM private key"]


def test_encrypted_key(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    errors = messages(check(write_config(tmp_path, cert, encrypted)))
    assert errors == [
        f"proxy.yaml:3: tls.certificates[0].key: {encrypted}: the private key is encrypted (give an unencrypted key)"
    ]


def test_client_ca_unreadable(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    errors = messages(check(write_config(tmp_path, cert, key, bad_ca)))
    assert errors == [f"proxy.yaml:6: client_auth.ca: {bad_ca}: holds no PEM certificate (BEGIN CERTIFICATE block)"]


def test_crl_from_another_ca(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    other_cert, other_key = create_ca("someone else")
    crl = write_crl(tmp_path / "other.crl", make_crl(other_cert, other_key, []))
    errors = messages(check(write_config(tmp_path, cert, key, pki.ca_pem, crl)))
    assert errors == [
        f"proxy.yaml:7: client_auth.crl: {crl} is not signed by a CA in client_auth.ca "
        "(issuer O=tlsproxy,CN=someone else): OpenSSL would find no CRL for the clients' issuer "
        "and refuse every client certificate"
    ]


def test_crl_garbage(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    crl = tmp_path / "bad.crl"
    crl.write_text("garbage")
    errors = messages(check(write_config(tmp_path, cert, key, pki.ca_pem, crl)))
    assert errors == [f"proxy.yaml:7: client_auth.crl: {crl}: holds no PEM CRL (BEGIN X509 CRL block; TLS needs PEM)"]


def test_out_of_date_crl_is_an_error(pki, tmp_path: Path) -> None:
    # serve refuses it (OpenSSL would refuse every client), so check does too
    cert, key = pki.server
    crl = pki.crl([])
    report = check(write_config(tmp_path, cert, key, pki.ca_pem, crl), now=dt.datetime.now(dt.UTC) + dt.timedelta(days=60))
    assert any("client_auth.crl" in e and f"{crl} expired on" in e for e in messages(report))


def test_names_fall_back_to_cn(tmp_path: Path) -> None:
    ca_cert, ca_key = create_ca()
    cert, key = issue_leaf(ca_cert, ca_key, ["a.test", "10.0.0.1"])
    cert_path, key_path = write_leaf(tmp_path / "a", cert, key, [ca_cert])
    (info,) = check(write_config(tmp_path, cert_path, key_path)).certificates
    assert info.names == ("a.test", "10.0.0.1")


# --- the command ------------------------------------------------------------------------


def test_check_command_ok(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    write_config(tmp_path, cert, key, pki.ca_pem)
    result = run_check("-c", "proxy.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("config OK")
    assert "api: localhost/ -> http://127.0.0.1:9000" in result.stdout
    assert f"{cert}: localhost, " in result.stdout and "days left" in result.stdout
    assert result.stderr == ""


def test_check_command_reports_each_error_on_one_line(pki, tmp_path: Path) -> None:
    cert, _ = pki.server
    _, other_key = pki.leaf("other", "other.test")
    write_config(tmp_path, cert, other_key, tmp_path / "no-ca.pem")
    result = run_check("-c", "proxy.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "config OK" not in result.stdout
    assert result.stderr.splitlines() == [
        f"tlsproxy: error: proxy.yaml:3: tls.certificates[0].key: {other_key} is not the private key of {cert}",
        f"tlsproxy: error: proxy.yaml:6: client_auth.ca: {tmp_path / 'no-ca.pem'}: no such file",
    ]


def test_check_command_config_error(tmp_path: Path) -> None:
    (tmp_path / "proxy.yaml").write_text("services:\n  - name: api\n    upstream: htp://x\n")
    result = run_check("-c", "proxy.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        1,
        "tlsproxy: error: proxy.yaml:3: services[0].upstream: 'htp://x' is not an http:// URL\n",
    )


def test_check_command_dry_run_options(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    write_config(tmp_path, cert, key)
    alone = run_check("-c", "proxy.yaml", "--url", "https://localhost/", cwd=tmp_path)
    assert (alone.returncode, alone.stderr) == (2, "tlsproxy: error: --client-cert and --url go together\n")
    both = run_check("-c", "proxy.yaml", "--client-cert", str(cert), "--url", "https://localhost/", cwd=tmp_path)
    assert both.returncode in (0, 1)  # admitted or refused (or "not built yet"), never a usage error
    assert "usage:" not in both.stderr


def test_service_host_without_a_certificate_is_a_warning(pki, tmp_path: Path) -> None:
    cert, key = pki.server  # localhost, 127.0.0.1, ::1, *.localhost
    path = write_config(tmp_path, cert, key)
    text = path.read_text().replace("hosts: [localhost]", "hosts: [localhost, api.localhost, api.example]")
    path.write_text(text)
    report = check(path)
    assert report.ok
    assert messages(report, "warning") == [
        "proxy.yaml:5: services[0].hosts[2]: no certificate in tls.certificates names 'api.example'; "
        "clients would get the default certificate and a name mismatch"
    ]


def test_check_command_listen_plain_public_address(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    write_config(tmp_path, cert, key)
    config = tmp_path / "proxy.yaml"
    base = config.read_text()
    config.write_text("listen_plain: ['0.0.0.0:8080']\n" + base)
    refused = run_check("-c", "proxy.yaml", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "tlsproxy: error: proxy.yaml:1: listen_plain[0]: '0.0.0.0:8080' is not a loopback address"
    )
    assert "listen_plain_public: true" in refused.stderr
    config.write_text("listen_plain: ['0.0.0.0:8080']\nlisten_plain_public: true\n" + base)
    accepted = run_check("-c", "proxy.yaml", cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert "listen_plain: 0.0.0.0:8080 (plain HTTP)" in accepted.stdout


def test_upstream_tls_files_are_checked(pki, tmp_path: Path) -> None:
    cert, key = pki.server
    egress_cert, _ = pki.leaf("egress", "egress", client=True)
    write_config(tmp_path, cert, key)
    config = tmp_path / "proxy.yaml"
    config.write_text(
        config.read_text()
        + f"  - name: remote\n    path_prefix: /remote\n    upstream: https://127.0.0.1:9443\n"
        f"    upstream_tls:\n      ca: {tmp_path / 'missing.pem'}\n      cert: {egress_cert}\n      key: {key}\n"
    )
    assert messages(check(config)) == [
        f"proxy.yaml:10: services[1].upstream_tls.ca: {tmp_path / 'missing.pem'}: no such file",
        f"proxy.yaml:12: services[1].upstream_tls.key: {key} is not the private key of {egress_cert}",
    ]
