"""What a certificate says, as a plain dict (the ``--json`` contract) and as text.

``describe`` is pure: it takes a certificate and the time, so days-left is testable.
Reading files and finding the ``.key`` beside a certificate happen in ``inspect_file``.
A certificate signing request (what ``certs csr`` writes) is described too, by
``describe_csr``: what the CA will be asked to sign (subject, SANs, key).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from proxy.errors import PKIError
from proxy.pki.build import is_ca, keys_match
from proxy.pki.names import name_text
from proxy.pki.store import load_bundle, load_csr, load_private_key
from proxy.pki.verify import eku_names

CSR_JSON_KEYS = ("file", "kind", "subject", "sans", "key_type", "signature_valid")  # plus "key_matches"
JSON_KEYS = (
    "file", "subject", "issuer", "sans", "serial", "not_before", "not_after", "days_left",
    "fingerprint_sha256", "is_ca", "key_type", "eku",
)  # plus "key_matches" when a key was found


def describe(cert: x509.Certificate, *, file: str = "", now: dt.datetime | None = None) -> dict:
    """The SPEC's inspect fields for one certificate."""
    moment = now or dt.datetime.now(dt.timezone.utc)
    return {
        "file": file,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": [name_text(name) for name in sans_of(cert)],
        "serial": format(cert.serial_number, "x"),
        "not_before": rfc3339(cert.not_valid_before_utc),
        "not_after": rfc3339(cert.not_valid_after_utc),
        "days_left": days_left(cert, moment),
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "is_ca": is_ca(cert),
        "key_type": key_type(cert.public_key()),
        "eku": eku_names(cert),
    }


def describe_csr(csr: x509.CertificateSigningRequest, *, file: str = "") -> dict:
    """What a CSR asks a CA to sign."""
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    return {
        "file": file,
        "kind": "csr",
        "subject": csr.subject.rfc4514_string(),
        "sans": [name_text(name) for name in sans],
        "key_type": key_type(csr.public_key()),
        "signature_valid": csr.is_signature_valid,
    }


def inspect_file(path: Path, *, password: str | None = None, now: dt.datetime | None = None) -> list[dict]:
    """describe() every certificate in PATH (or describe_csr() its CSR); the first (the
    leaf) gets ``key_matches`` when a key was found: inside a PKCS#12, or as ``NAME.key``
    beside ``NAME.pem``."""
    path = Path(path)
    try:
        certs, bundled_key = load_bundle(path, password=password)
    except PKIError as not_a_certificate:
        try:
            csr = load_csr(path)
        except PKIError:
            raise not_a_certificate from None
        described = [describe_csr(csr, file=str(path))]
        _match_key_beside(path, csr, described[0])
        return described
    described = [describe(cert, file=str(path), now=now) for cert in certs]
    if bundled_key is not None:
        described[0]["key_matches"] = keys_match(certs[0], bundled_key)
    else:
        _match_key_beside(path, certs[0], described[0])
    return described


def _match_key_beside(path: Path, signed, info: dict) -> None:
    """``key_matches`` (and ``key_file``) in ``info`` when a key lies beside ``path``."""
    key_path = key_beside(path)
    if key_path is None:
        return
    info["key_file"] = str(key_path)
    try:
        info["key_matches"] = keys_match(signed, load_private_key(key_path))
    except PKIError as exc:
        info["key_matches"] = False
        info["key_error"] = str(exc)


def key_beside(path: Path) -> Path | None:
    """``x.key`` for ``x.pem`` / ``x.crt`` / ``x.der`` / ``x.cer``, if it exists."""
    candidate = path.with_suffix(".key")
    return candidate if candidate != path and candidate.is_file() else None


def render_text(info: dict, *, index: int, total: int, now: dt.datetime | None = None) -> str:
    """Human-readable block for one certificate or CSR (what ``certs inspect`` prints)."""
    subject = ("subject", info["subject"] or "(empty)")
    sans = ("SANs", ", ".join(info["sans"]) or "(none)")
    if info.get("kind") == "csr":
        signature = "valid" if info["signature_valid"] else "INVALID (the CSR was altered or is corrupt)"
        title = f"{info['file']}  (certificate signing request: what a CA is asked to sign)"
        return _block(title, [subject, sans, ("key", info["key_type"]), ("signature", signature)], info)
    moment = rfc3339(now or dt.datetime.now(dt.timezone.utc))
    position = f" [{index}/{total}]" if total > 1 else ""
    kind = "CA" if info["is_ca"] else "leaf"
    return _block(f"{info['file']}{position}", [
        subject,
        ("issuer", info["issuer"] or "(empty)"),
        sans,
        ("serial", info["serial"]),
        ("valid", f"{info['not_before']} .. {info['not_after']} ({validity_note(info, moment)})"),
        ("key", info["key_type"]),
        ("SHA-256", info["fingerprint_sha256"]),
        ("kind", kind + (f", EKU {', '.join(info['eku'])}" if info["eku"] else "")),
    ], info)


def _block(title: str, rows: list[tuple[str, str]], info: dict) -> str:
    """TITLE, then one aligned ``label: value`` line a row, then the key verdict if any."""
    if "key_matches" in info:
        where = info.get("key_file", "inside the PKCS#12")
        error = f": {info['key_error']}" if "key_error" in info else ""
        rows = [*rows, ("private key", f"{where} {'matches' if info['key_matches'] else 'does NOT match' + error}")]
    return "\n".join([title, *(f"  {label + ':':<14}{value}" for label, value in rows)])


def validity_note(info: dict, moment: str) -> str:
    """"N days left", "EXPIRED N days ago" or "NOT YET VALID" (RFC 3339 strings sort by time)."""
    left = info["days_left"]
    if info["not_after"] < moment:
        return f"EXPIRED {-left} day{'s' if left != -1 else ''} ago" if left else "EXPIRED less than a day ago"
    if info["not_before"] > moment:
        return "NOT YET VALID"
    return f"{left} day{'s' if left != 1 else ''} left"


def sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def days_left(cert: x509.Certificate, moment: dt.datetime) -> int:
    """Whole days until notAfter, truncated toward zero (-3: expired three days ago)."""
    return int((cert.not_valid_after_utc - moment) / dt.timedelta(days=1))


def key_type(public_key) -> str:
    """``EC P-256``, ``RSA 2048``, ``Ed25519`` ..."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"EC {curves.get(public_key.curve.name, public_key.curve.name)}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(public_key, dsa.DSAPublicKey):
        return f"DSA {public_key.key_size}"
    return type(public_key).__name__


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
