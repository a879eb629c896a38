"""One verdict on ``client_auth.crl`` for ``tlsproxy check`` and ``tlsproxy serve``.

Every CRL file that would make OpenSSL refuse every client (or trust a stray
certificate) fails ``check`` with exit 1 and a ``FILE:LINE: client_auth.crl: reason``
line, and makes ``serve`` exit 1 at start with the same reason; a good CRL (one, or one
per CA of a two-CA bundle) passes both, and serve then listens.

Real processes (``python -m proxy check`` / ``serve``), certificates and CRLs from our
own toolkit; serve listens on 127.0.0.1 port 0 when it starts at all.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from upstream import WAIT

from proxy.pki.build import make_crl
from proxy.pki.store import certs_pem, ensure_ca, write_crl

LISTENING = re.compile(r"listening on https://127\.0\.0\.1:\d+")
CRL_LINE = 6  # where write_config puts ``crl:``


def write_config(folder: Path, pki, crl: Path, ca: Path | None = None) -> Path:
    cert, key = pki.server
    path = folder / "proxy.yaml"
    path.write_text(
        'listen: ["127.0.0.1:0"]\n'
        f"tls: {{certificates: [{{cert: {cert}, key: {key}}}]}}\n"
        "client_auth:\n"
        "  mode: require\n"
        f"  ca: {ca or pki.ca_pem}\n"
        f"  crl: {crl}\n"
        f"access_log: {{path: {folder / 'access.log'}}}\n"
        "services:\n"
        "  - {name: app, upstream: 'http://127.0.0.1:9'}\n"
    )
    return path


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(config)],
        capture_output=True, text=True, timeout=WAIT, cwd=config.parent,
    )


def run_serve(config: Path) -> tuple[int | None, str]:
    """(exit code, stderr) when serve exits by itself; (None, stderr) once it listens
    (then it is stopped). Bounded by WAIT either way."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "-c", str(config)],
        cwd=config.parent, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while (line := lines.get(timeout=WAIT)) is not None:
            seen.append(line)
            if LISTENING.search(line):
                return None, "".join(seen)
        return proc.wait(WAIT), "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        reader.join(WAIT)
        assert proc.stderr is not None
        proc.stderr.close()


# --- the CRL files -------------------------------------------------------------------


def _crl(pki, *, this_update: dt.datetime, next_update: dt.datetime) -> x509.CertificateRevocationList:
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .sign(pki.ca_key, hashes.SHA256())
    )


def foreign(pki, folder: Path) -> Path:
    other_cert, other_key = ensure_ca(pki.other_ca_dir)
    return write_crl(folder / "foreign.pem", make_crl(other_cert, other_key, []))


def expired(pki, folder: Path) -> Path:
    now = dt.datetime.now(dt.timezone.utc)
    return write_crl(folder / "expired.pem", _crl(pki, this_update=now - dt.timedelta(days=10), next_update=now - dt.timedelta(days=1)))


def not_yet_valid(pki, folder: Path) -> Path:
    now = dt.datetime.now(dt.timezone.utc)
    return write_crl(folder / "future.pem", _crl(pki, this_update=now + dt.timedelta(days=2), next_update=now + dt.timedelta(days=30)))


def not_a_crl(pki, folder: Path) -> Path:
    path = folder / "garbage.pem"
    path.write_text("this is not a CRL\n")
    return path


def a_certificate(pki, folder: Path) -> Path:
    path = folder / "cert-not-crl.pem"
    path.write_bytes(pki.ca_pem.read_bytes())
    return path


def der(pki, folder: Path) -> Path:
    path = folder / "crl.der"
    path.write_bytes(make_crl(pki.ca_cert, pki.ca_key, []).public_bytes(Encoding.DER))
    return path


def crl_with_a_certificate(pki, folder: Path) -> Path:
    # OpenSSL's cafile loader takes every block: the other CA would become trusted.
    path = folder / "crl-plus-cert.pem"
    path.write_bytes(pki.crl([]).read_bytes() + pki.other_ca_pem.read_bytes())
    return path


def second_crl_expired(pki, folder: Path) -> Path:
    path = folder / "two-crls.pem"
    path.write_bytes(pki.crl([]).read_bytes() + expired(pki, folder).read_bytes())
    return path


BAD = {
    "foreign": (foreign, "not signed by a CA in client_auth.ca"),
    "expired": (expired, "expired on"),
    "not_yet_valid": (not_yet_valid, "is not valid before"),
    "not_a_crl": (not_a_crl, "holds no PEM CRL"),
    "a_certificate": (a_certificate, "CERTIFICATE"),
    "der": (der, "DER"),
    "crl_with_a_certificate": (crl_with_a_certificate, "CERTIFICATE"),
    "second_crl_expired": (second_crl_expired, "expired on"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_crl_check_refuses_serve_refuses_too_for_the_same_reason(pki, tmp_path, case):
    make, words = BAD[case]
    crl = make(pki, tmp_path)
    config = write_config(tmp_path, pki, crl)

    checked = run_check(config)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    prefix = f"tlsproxy: error: {config}:{CRL_LINE}: client_auth.crl: "
    found = [line[len(prefix):] for line in checked.stderr.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, checked.stderr
    reason = found[0]
    assert str(crl) in reason and words in reason

    code, stderr = run_serve(config)
    assert code == 1, f"serve started with a CRL check refuses: {stderr}"
    assert f"client_auth.crl: {reason}" in stderr


def test_a_good_crl_passes_check_and_serve(pki, tmp_path):
    config = write_config(tmp_path, pki, pki.crl([pki.leaf("gone", "gone", client=True)[0]]))
    checked = run_check(config)
    assert checked.returncode == 0 and "config OK" in checked.stdout, checked.stderr
    code, stderr = run_serve(config)
    assert code is None, stderr  # listening


def test_one_crl_per_ca_of_a_two_ca_bundle_passes_both(pki, tmp_path):
    other_cert, other_key = ensure_ca(pki.other_ca_dir)
    bundle = tmp_path / "two-cas.pem"
    bundle.write_bytes(certs_pem([pki.ca_cert, other_cert]))
    crls = tmp_path / "two-crls.pem"
    crls.write_bytes(pki.crl([]).read_bytes() + make_crl(other_cert, other_key, []).public_bytes(Encoding.PEM))
    config = write_config(tmp_path, pki, crls, ca=bundle)
    checked = run_check(config)
    assert checked.returncode == 0, checked.stderr
    code, stderr = run_serve(config)
    assert code is None, stderr
