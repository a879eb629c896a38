"""Files: 0600 keys, no overwrite without force, CA folder handling, PEM/DER/P12 loading."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.errors import PKIError
from proxy.pki.build import create_ca, issue_leaf, keys_match
from proxy.pki.store import (
    ensure_ca,
    load_bundle,
    load_ca,
    load_certificates,
    load_private_key,
    write_atomic,
    write_ca,
    write_leaf,
    write_p12,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ensure_ca_creates_once_then_loads(tmp_path: Path) -> None:
    ca_dir = tmp_path / "nested" / "ca"
    cert, key = ensure_ca(ca_dir, name="test CA")
    assert mode(ca_dir / "ca.key") == 0o600 and mode(ca_dir) == 0o700
    again, again_key = ensure_ca(ca_dir, name="ignored")
    assert again == cert and keys_match(again, key) and keys_match(cert, again_key)
    assert sorted(p.name for p in ca_dir.iterdir() if not p.name.startswith(".")) == ["ca.key", "ca.pem"]


def test_load_ca_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="does not exist"):
        load_ca(tmp_path / "nope")
    ca_dir = tmp_path / "half"
    ensure_ca(ca_dir)
    (ca_dir / "ca.key").unlink()
    with pytest.raises(PKIError, match=r"ca\.key is missing"):
        load_ca(ca_dir)
    with pytest.raises(PKIError, match=r"ca\.key is missing"):
        ensure_ca(ca_dir)  # half a CA is never silently replaced


def test_load_ca_refuses_mismatched_key(tmp_path: Path) -> None:
    cert, _ = create_ca()
    _, other_key = create_ca()
    write_ca(tmp_path, cert, other_key)
    with pytest.raises(PKIError, match="does not belong"):
        load_ca(tmp_path)


def test_write_leaf_modes_order_and_force(pki, tmp_path: Path) -> None:
    cert, key = issue_leaf(pki.ca_cert, pki.ca_key, ["api.localhost"])
    pem, key_path = write_leaf(tmp_path / "api.localhost", cert, key, [pki.ca_cert])
    assert pem.name == "api.localhost.pem" and key_path.name == "api.localhost.key"
    assert mode(key_path) == 0o600 and mode(pem) == 0o644
    assert load_certificates(pem) == [cert, pki.ca_cert]
    assert keys_match(cert, load_private_key(key_path))
    new_cert, new_key = issue_leaf(pki.ca_cert, pki.ca_key, ["api.localhost"])
    with pytest.raises(PKIError, match="already exist.*--force"):
        write_leaf(tmp_path / "api.localhost", new_cert, new_key, [])
    assert load_certificates(pem)[0] == cert  # untouched
    write_leaf(tmp_path / "api.localhost", new_cert, new_key, [], force=True)
    assert load_certificates(pem) == [new_cert] and mode(key_path) == 0o600


def test_write_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    write_atomic(target, b"one")
    with pytest.raises(PKIError):
        write_atomic(target, b"two")
    write_atomic(target, b"three", force=True, mode=0o600)
    assert target.read_bytes() == b"three" and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_load_der_and_p12(pki, tmp_path: Path) -> None:
    cert, key = issue_leaf(pki.ca_cert, pki.ca_key, ["p12.localhost"])
    der = tmp_path / "leaf.der"
    der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    assert load_certificates(der) == [cert]
    p12 = write_p12(tmp_path / "leaf.p12", cert, key, [pki.ca_cert], "s3cret")
    assert mode(p12) == 0o600
    certs, p12_key = load_bundle(p12, password="s3cret")
    assert certs == [cert, pki.ca_cert] and keys_match(cert, p12_key)
    with pytest.raises(PKIError, match="wrong password"):
        load_bundle(p12, password="nope")
    with pytest.raises(PKIError, match="password needed"):
        load_bundle(p12)
    default = write_p12(tmp_path / "default.p12", cert, key, [], "changeit")
    assert load_certificates(default) == [cert]  # mkcert's default is tried


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello", "not a certificate"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no PEM certificate"),
        (b"", "not a certificate"),
    ],
)
def test_non_certificates_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.pem"
    path.write_bytes(content)
    with pytest.raises(PKIError, match=message):
        load_certificates(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="no such file"):
        load_certificates(tmp_path / "missing.pem")
    with pytest.raises(PKIError, match="is a directory"):
        load_certificates(tmp_path)
    with pytest.raises(PKIError, match="not a private key"):
        load_private_key(Path(__file__))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_opens_the_p12(pki, tmp_path: Path) -> None:
    cert, key = issue_leaf(pki.ca_cert, pki.ca_key, ["p12.localhost"], key_type="rsa2048")
    p12 = write_p12(tmp_path / "leaf.p12", cert, key, [pki.ca_cert], "pw-123")
    ok = subprocess.run(
        ["openssl", "pkcs12", "-info", "-in", p12, "-passin", "pass:pw-123", "-nodes"],
        capture_output=True, text=True, timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert "AES-256-CBC" in ok.stderr and "BEGIN PRIVATE KEY" in ok.stdout and "p12.localhost" in ok.stdout
    bad = subprocess.run(
        ["openssl", "pkcs12", "-info", "-in", p12, "-passin", "pass:wrong", "-nodes"],
        capture_output=True, text=True, timeout=30,
    )
    assert bad.returncode != 0


def test_key_file_never_world_readable_even_with_lax_umask(pki, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        cert, key = issue_leaf(pki.ca_cert, pki.ca_key, ["u.localhost"])
        _, key_path = write_leaf(tmp_path / "u", cert, key, [])
    finally:
        os.umask(old)
    assert mode(key_path) == 0o600


def test_concurrent_ensure_ca_makes_one_ca(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ensure_ca(tmp_path / "shared")[0], range(4)))
    assert all(cert == results[0] for cert in results)
