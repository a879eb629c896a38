"""`python -m proxy certs …` as a user runs it: files, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.pki.inspect import JSON_KEYS
from proxy.pki.store import load_certificates

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def certs(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "certs", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit CODE with a short error naming WORDS, and never a traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in message, message
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message.startswith("tlsproxy: error: ")
    return message


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a CA made by the CLI itself (module scope: one CA for these tests)."""
    folder = tmp_path_factory.mktemp("cli")
    out = ok(certs(folder, "ca", "--dir", "ca", "--name", "CLI test CA"))
    assert "wrote ca/ca.pem" in out and "wrote ca/ca.key" in out and "certs issue --ca ca" in out
    return folder


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_files_and_no_overwrite(work: Path) -> None:
    assert mode(work / "ca" / "ca.key") == 0o600
    before = (work / "ca" / "ca.pem").read_bytes()
    fails(certs(work, "ca", "--dir", "ca"), 1, "already exist", "--force")
    assert (work / "ca" / "ca.pem").read_bytes() == before


@needs_openssl
def test_issue_server_with_p12_default_password(work: Path) -> None:
    out = ok(certs(work, "issue", "--ca", "ca", "--out", "srv", "--p12", "localhost", "127.0.0.1", "::1"))
    assert "wrote srv.pem" in out and "wrote srv.key" in out and "wrote srv.p12" in out
    assert "'changeit'" in out and "--p12-password" in out and "curl --cacert ca/ca.pem" in out
    assert mode(work / "srv.key") == 0o600 and mode(work / "srv.p12") == 0o600
    assert len(load_certificates(work / "srv.pem")) == 2  # leaf then CA
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca/ca.pem", "srv.pem"], cwd=work, capture_output=True, timeout=30
    )
    assert verify.returncode == 0
    p12 = subprocess.run(
        ["openssl", "pkcs12", "-info", "-in", "srv.p12", "-passin", "pass:changeit", "-nokeys"],
        cwd=work, capture_output=True, text=True, timeout=30,
    )
    assert p12.returncode == 0 and "CN = localhost" in p12.stdout, p12.stderr


def test_issue_client_p12_with_password_and_inspect_json(work: Path) -> None:
    out = ok(certs(work, "issue", "--ca", "ca", "--out", "alice", "--client", "--ou", "eng", "--p12",
                   "--p12-password", "s3cret", "alice@example.com", "spiffe://corp/alice"))
    assert "EKU clientAuth" in out and "--cert alice.pem --key alice.key" in out
    infos = json.loads(ok(certs(work, "inspect", "--json", "--password", "s3cret", "alice.p12", "alice.pem")))
    assert len(infos) == 4  # leaf + CA from each file
    leaf = infos[0]
    assert set(leaf) == {*JSON_KEYS, "key_matches"} and set(infos[1]) == set(JSON_KEYS)
    assert leaf["subject"] == "OU=eng,CN=alice@example.com" and leaf["eku"] == ["clientAuth"]
    assert leaf["sans"] == ["email:alice@example.com", "URI:spiffe://corp/alice"]
    assert leaf["key_matches"] is True and leaf["is_ca"] is False and leaf["key_type"] == "EC P-256"
    assert infos[1]["is_ca"] is True and infos[2]["key_matches"] is True  # alice.key beside alice.pem
    assert 363 <= leaf["days_left"] <= 365 and len(leaf["fingerprint_sha256"]) == 64
    fails(certs(work, "inspect", "--password", "wrong", "alice.p12"), 1, "alice.p12", "wrong password")


def test_inspect_text_der_and_mismatched_key(work: Path) -> None:
    ok(certs(work, "issue", "--ca", "ca", "--out", "d", "--key-type", "rsa2048", "d.localhost"))
    cert = load_certificates(work / "d.pem")[0]
    (work / "d.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    text = ok(certs(work, "inspect", "d.der"))
    assert "RSA 2048" in text and "DNS:d.localhost" in text and "days left" in text and "EKU serverAuth" in text
    shutil.copy(work / "ca" / "ca.key", work / "d.key")  # the wrong key beside d.der
    text = ok(certs(work, "inspect", "d.der"))
    assert "does NOT match" in text


def test_verify_accepts_and_names_each_fault(work: Path) -> None:
    ok(certs(work, "issue", "--ca", "ca", "--out", "v", "localhost", "127.0.0.1"))
    out = ok(certs(work, "verify", "v.pem", "--ca", "ca/ca.pem", "--host", "127.0.0.1"))
    assert out.startswith("OK: v.pem")
    ok(certs(work, "issue", "--ca", "ca", "--out", "old", "--expired", "localhost"))
    ok(certs(work, "issue", "--ca", "ca", "--out", "new", "--not-yet-valid", "localhost"))
    ok(certs(work, "issue", "--ca", "ca", "--out", "bob", "--client", "localhost"))
    ok(certs(work, "self-signed", "--out", "ss", "localhost"))
    ok(certs(work, "ca", "--dir", "ca2", "--name", "stranger"))
    ok(certs(work, "issue", "--ca", "ca2", "--out", "foreign", "localhost"))
    fails(certs(work, "verify", "old.pem", "--ca", "ca/ca.pem"), 1, "expired")
    fails(certs(work, "verify", "new.pem", "--ca", "ca/ca.pem"), 1, "not yet valid")
    fails(certs(work, "verify", "v.pem", "--ca", "ca/ca.pem", "--host", "example.com"), 1, "hostname mismatch")
    fails(certs(work, "verify", "v.pem", "--ca", "ca", "--purpose", "client"), 1, "wrong EKU")
    fails(certs(work, "verify", "bob.pem", "--ca", "ca", "--host", "localhost"), 1, "wrong EKU")
    fails(certs(work, "verify", "foreign.pem", "--ca", "ca/ca.pem"), 1, "unknown issuer", "stranger")
    fails(certs(work, "verify", "ss.pem", "--ca", "ca/ca.pem"), 1, "self-signed")
    ok(certs(work, "verify", "ss.pem", "--ca", "ss.pem", "--host", "localhost"))


def test_csr_sign_and_crl(work: Path) -> None:
    out = ok(certs(work, "csr", "--out", "req", "--cn", "my service", "svc.internal", "10.0.0.7"))
    assert "wrote req.csr" in out and mode(work / "req.key") == 0o600
    out = ok(certs(work, "sign", "req.csr", "--ca", "ca", "--out", "req.pem", "--days", "30"))
    assert "wrote req.pem" in out and "req.key" in out
    info = json.loads(ok(certs(work, "inspect", "--json", "req.pem")))[0]
    assert info["subject"] == "CN=my service" and info["sans"] == ["DNS:svc.internal", "IP:10.0.0.7"]
    assert info["key_matches"] is True and 28 <= info["days_left"] <= 30
    out = ok(certs(work, "crl", "--ca", "ca", "--out", "revoked.crl", "req.pem"))
    assert "1 revoked" in out and "CN=my service" in out
    fails(certs(work, "verify", "req.pem", "--ca", "ca", "--crl", "revoked.crl"), 1, "revoked")
    ok(certs(work, "issue", "--ca", "ca", "--out", "fresh", "svc.internal"))
    ok(certs(work, "verify", "fresh.pem", "--ca", "ca", "--crl", "revoked.crl"))


def test_trust_prints_env_and_snippets(work: Path) -> None:
    out = ok(certs(work, "trust", "--ca", "ca/ca.pem"))
    ca = str(work / "ca" / "ca.pem")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert f"{var}={ca}" in out
    for client in ("curl --cacert", "requests.get(", "httpx.get(", "NODE_EXTRA_CA_CERTS", "--install",
                   "--store nss", "keytool -importcert", "pk12util"):
        assert client in out
    assert "verify=False" not in out and "-k " not in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("issue", "--ca", "ca", "--out", "x", "bad name!"), ("bad name!",)),
        (("issue", "--ca", "missing", "--out", "x", "x.test"), ("missing", "does not exist")),
        (("inspect", "ca/ca.key"), ("ca/ca.key", "no PEM certificate")),
        (("inspect", "nothing.pem"), ("nothing.pem", "no such file")),
        (("verify", "ca/ca.key", "--ca", "ca/ca.pem"), ("ca/ca.key",)),
        (("sign", "ca/ca.pem", "--ca", "ca", "--out", "x.pem"), ("not a certificate signing request",)),
        (("crl", "--ca", "ca", "--out", "x.crl", "foreign.pem"), ("not issued by this CA",)),
    ],
)
def test_operation_failures_exit_1(work: Path, args: tuple, words: tuple) -> None:
    if "foreign.pem" in args and not (work / "foreign.pem").exists():
        ok(certs(work, "ca", "--dir", "ca3", "--name", "third"))
        ok(certs(work, "issue", "--ca", "ca3", "--out", "foreign", "localhost"))
    fails(certs(work, *args), 1, *words)


@pytest.mark.parametrize(
    "args",
    [
        ("issue", "--ca", "ca", "x.test"),  # no --out
        ("issue", "--ca", "ca", "--out", "x", "--days", "0", "x.test"),
        ("issue", "--ca", "ca", "--out", "x", "--expired", "--not-yet-valid", "x.test"),
        ("issue", "--ca", "ca", "--out", "x", "--p12-password", "pw", "x.test"),
        ("issue", "--ca", "ca", "--out", "x", "--key-type", "dsa", "x.test"),
        ("verify", "ca/ca.pem", "--ca", "ca/ca.pem", "--purpose", "client", "--host", "x.test"),
        ("trust", "--ca", "ca/ca.pem", "--install", "--store", "nss,firefox"),
        ("trust", "--ca", "ca/ca.pem", "--install", "--store", ","),
        ("trust", "--ca", "ca/ca.pem", "--install", "--check"),
        ("trust", "--ca", "ca/ca.pem", "--store", "nss"),  # a store without an action
        ("frobnicate",),
    ],
)
def test_usage_errors_exit_2(work: Path, args: tuple) -> None:
    fails(certs(work, *args), 2)
    assert not (work / "x.pem").exists()


# --- the hints a new user follows (issue #16, item 8) -------------------------------------


def test_csr_help_names_the_files_it_writes(work: Path) -> None:
    help_text = " ".join(ok(certs(work, "csr", "--help")).split())
    assert "writes PREFIX.csr and PREFIX.key" in help_text and "PREFIX.pem" not in help_text


def test_inspect_reads_a_csr(work: Path) -> None:
    ok(certs(work, "csr", "--out", "asked", "--cn", "asked", "asked.example.org", "10.0.0.9"))
    text = ok(certs(work, "inspect", "asked.csr"))
    assert "certificate signing request" in text and "subject:      CN=asked" in text
    assert "SANs:         DNS:asked.example.org, IP:10.0.0.9" in text and "key:          EC P-256" in text
    assert "private key:  asked.key matches" in text
    (info,) = json.loads(ok(certs(work, "inspect", "--json", "asked.csr")))
    assert info == {"file": "asked.csr", "kind": "csr", "subject": "CN=asked",
                    "sans": ["DNS:asked.example.org", "IP:10.0.0.9"], "key_type": "EC P-256",
                    "signature_valid": True, "key_matches": True}


def test_client_certificate_hint_points_at_a_server(work: Path) -> None:
    out = ok(certs(work, "issue", "--ca", "ca", "--client", "--out", "carol", "--cn", "carol", "carol"))
    assert "https://carol:8443" not in out
    assert "--cert carol.pem --key carol.key https://localhost:8443/" in out


def test_wildcard_note_is_not_followed_by_a_url_it_will_not_match(work: Path) -> None:
    out = ok(certs(work, "issue", "--ca", "ca", "--out", "wild", "*.localhost"))
    assert "*.localhost will not match" in out
    assert ".localhost:8443" not in out  # no curl line to app.localhost, which would fail
    out = ok(certs(work, "issue", "--ca", "ca", "--out", "wild2", "*.localhost", "api.localhost"))
    assert "curl --cacert ca/ca.pem https://api.localhost:8443/" in out


def test_out_into_a_missing_folder_says_it_created_it(work: Path) -> None:
    out = ok(certs(work, "issue", "--ca", "ca", "--out", "new/dir/leaf", "leaf.localhost"))
    assert out.startswith("created folder new/dir/ (it did not exist)\n")
    assert (work / "new" / "dir" / "leaf.pem").is_file()
    out = ok(certs(work, "issue", "--ca", "ca", "--out", "new/dir/leaf2", "leaf.localhost"))
    assert "created folder" not in out


def test_a_reader_that_stops_early_ends_the_command_quietly(pki):
    """``tlsproxy certs inspect … | head -1``: no BrokenPipeError traceback, exit 141 (as a
    command killed by SIGPIPE reports), whatever was left unwritten."""
    files = [str(pki.server[0])] * 300  # far more output than a pipe buffer holds
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "certs", "inspect", *files],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdout.readline()  # the reader takes one line...
    process.stdout.close()  # ...and goes away
    _out, errors = process.communicate(timeout=60)
    assert process.returncode == 141
    assert b"Traceback" not in errors and b"BrokenPipeError" not in errors


def test_the_hints_after_certs_ca_work_as_printed_wherever_the_ca_is(tmp_path):
    out = ok(certs(tmp_path, "ca", "--dir", "pki/myca"))
    hints = [line.strip() for line in out.splitlines() if line.strip().startswith("tlsproxy certs ")]
    assert hints[0] == "tlsproxy certs issue --ca pki/myca --out pki/localhost localhost 127.0.0.1 ::1"
    for hint in hints:  # pasted as printed, from the same folder
        ok(certs(tmp_path, *hint.split()[2:]))
    assert (tmp_path / "pki" / "localhost.pem").exists()
