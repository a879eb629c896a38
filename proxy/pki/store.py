"""Certificate files: atomic writes, 0600 keys, no overwrite without ``force``, and loading
PEM / DER / PKCS#12 with every failure turned into a one-line PKIError.

Writes go to a temporary file in the target's folder (created 0600 by mkstemp, so a key
is never readable by others, not even for a moment) and are then renamed into place, so
a crash or a concurrent reader never sees half a file. Without ``force`` the rename is a
hard link, which fails atomically when the target exists.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from proxy.errors import PKIError, os_error_reason
from proxy.pki.build import DEFAULT_CA_NAME, PrivateKey, create_ca, is_ca, keys_match

T = TypeVar("T")

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
KEY_MODE = 0o600
CERT_MODE = 0o644
DEFAULT_P12_PASSWORD = "changeit"


# --- writing -------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, *, mode: int = CERT_MODE, force: bool = False) -> Path:
    """Write DATA to PATH atomically with MODE; PKIError if PATH exists and not ``force``."""
    path = Path(path)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _place(tmp, path, force)
    except OSError as exc:
        raise PKIError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def ensure_free(paths: list[Path], *, force: bool) -> None:
    """Refuse (before anything is written) when any target exists and ``force`` is off."""
    if force:
        return
    taken = [str(p) for p in paths if os.path.lexists(p)]
    if taken:
        verb = "exists" if len(taken) == 1 else "exist"
        raise PKIError(f"{', '.join(taken)} already {verb} (use --force to overwrite)")


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (like mkcert: the file mode protects it, servers need no passphrase)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certs_pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def suffixed(prefix: Path, suffix: str) -> Path:
    """PREFIX + suffix, keeping dots already in the prefix (``api.localhost`` -> ``api.localhost.pem``)."""
    return Path(f"{prefix}{suffix}")


def write_key(path: Path, key: PrivateKey, *, force: bool = False) -> Path:
    return write_atomic(path, key_pem(key), mode=KEY_MODE, force=force)


def write_ca(ca_dir: Path, cert: x509.Certificate, key: PrivateKey, *, force: bool = False) -> tuple[Path, Path]:
    """DIR/ca.pem and DIR/ca.key (0600); the folder itself is made 0700."""
    ca_dir = Path(ca_dir)
    pem_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    ensure_free([pem_path, key_path], force=force)
    _make_dir(ca_dir, 0o700)
    write_key(key_path, key, force=force)
    write_atomic(pem_path, certs_pem([cert]), force=force)
    return pem_path, key_path


def ensure_ca(ca_dir: Path, name: str = DEFAULT_CA_NAME) -> tuple[x509.Certificate, PrivateKey]:
    """Load the CA in DIR, creating it first when neither file exists.

    A lock file serialises creation, so several workers starting together share one CA.
    Half a CA (one file missing) is an error rather than silently replaced: certificates
    already issued from it would stop verifying.
    """
    ca_dir = Path(ca_dir)
    _make_dir(ca_dir, 0o700)
    with locked(ca_dir / ".ca.lock"):
        pem_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
        if not pem_path.exists() and not key_path.exists():
            cert, key = create_ca(name)
            write_ca(ca_dir, cert, key)
            return cert, key
    return load_ca(ca_dir)


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, PrivateKey]:
    """The CA certificate and key from DIR; PKIError naming what is missing or wrong."""
    ca_dir = Path(ca_dir)
    if not ca_dir.is_dir():
        raise PKIError(f"CA directory {ca_dir} does not exist (create it with: tlsproxy certs ca --dir {ca_dir})")
    pem_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    for path in (pem_path, key_path):
        if not path.exists():
            raise PKIError(f"{path} is missing: {ca_dir} is not a complete CA directory")
    certs = load_certificates(pem_path)
    cert = certs[0]
    key = load_private_key(key_path)
    if not keys_match(cert, key):
        raise PKIError(f"{key_path} does not belong to {pem_path}")
    if not is_ca(cert):
        raise PKIError(f"{pem_path} is not a CA certificate (BasicConstraints CA:TRUE missing)")
    return cert, key


def write_leaf(
    prefix: Path, cert: x509.Certificate, key: PrivateKey, chain: list[x509.Certificate], *, force: bool = False
) -> tuple[Path, Path]:
    """PREFIX.pem (leaf then chain) and PREFIX.key (0600), both or neither."""
    pem_path, key_path = suffixed(prefix, ".pem"), suffixed(prefix, ".key")
    ensure_free([pem_path, key_path], force=force)
    write_key(key_path, key, force=force)
    write_atomic(pem_path, certs_pem([cert, *chain]), force=force)
    return pem_path, key_path


def p12_bytes(cert: x509.Certificate, key: PrivateKey, chain: list[x509.Certificate], password: str) -> bytes:
    """PKCS#12 with AES-256/PBKDF2-SHA256 (PBES2) and a SHA-256 MAC: OpenSSL 3 and modern
    Java/macOS/Windows open it, unlike the legacy RC2/3DES default of older tools."""
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(50000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode())
    )
    name = _friendly_name(cert)
    return pkcs12.serialize_key_and_certificates(name, key, cert, chain or None, encryption)


def write_p12(
    path: Path,
    cert: x509.Certificate,
    key: PrivateKey,
    chain: list[x509.Certificate],
    password: str,
    *,
    force: bool = False,
) -> Path:
    return write_atomic(path, p12_bytes(cert, key, chain, password), mode=KEY_MODE, force=force)


def write_csr(prefix: Path, csr: x509.CertificateSigningRequest, key: PrivateKey, *, force: bool = False) -> tuple[Path, Path]:
    """PREFIX.csr and PREFIX.key (0600)."""
    csr_path, key_path = suffixed(prefix, ".csr"), suffixed(prefix, ".key")
    ensure_free([csr_path, key_path], force=force)
    write_key(key_path, key, force=force)
    write_atomic(csr_path, csr.public_bytes(serialization.Encoding.PEM), force=force)
    return csr_path, key_path


def write_crl(path: Path, crl: x509.CertificateRevocationList, *, force: bool = False) -> Path:
    return write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), force=force)


# --- reading -------------------------------------------------------------------------


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PKIError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise PKIError(f"{path}: cannot read: {os_error_reason(exc)}") from None


def load_certificates(path: Path, *, password: str | None = None) -> list[x509.Certificate]:
    """Every certificate in a PEM, DER or PKCS#12 file (a P12's own cert first)."""
    return load_bundle(path, password=password)[0]


def load_bundle(path: Path, *, password: str | None = None) -> tuple[list[x509.Certificate], PrivateKey | None]:
    """Certificates and, for PKCS#12, the key inside. PKIError when none is found.

    For a P12 without an explicit password, the empty password and mkcert's "changeit"
    (our default too) are tried before giving up.
    """
    data = read_bytes(path)
    if b"-----BEGIN" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise PKIError(f"{path}: contains no PEM certificate (BEGIN CERTIFICATE block)") from None
        return certs, None
    if _looks_like_pfx(data):
        return _load_p12(path, data, password)
    try:
        return [x509.load_der_x509_certificate(data)], None
    except ValueError:
        raise PKIError(f"{path}: not a certificate (neither PEM, DER nor PKCS#12)") from None


def load_private_key(path: Path) -> PrivateKey:
    data = read_bytes(path)
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise PKIError(f"{path}: the private key is encrypted (give an unencrypted key)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{path}: not a private key (PEM or DER)") from None


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    return _load_pem_or_der(path, x509.load_pem_x509_csr, x509.load_der_x509_csr, "a certificate signing request")


def load_crl(path: Path) -> x509.CertificateRevocationList:
    return _load_pem_or_der(path, x509.load_pem_x509_crl, x509.load_der_x509_crl, "a certificate revocation list")


def _load_pem_or_der(path: Path, from_pem: Callable[[bytes], T], from_der: Callable[[bytes], T], what: str) -> T:
    """One object from a PEM or DER file (PEM when it has a BEGIN line); PKIError naming
    ``what`` the file should have held when it is neither."""
    data = read_bytes(path)
    try:
        return from_pem(data) if b"-----BEGIN" in data else from_der(data)
    except ValueError:
        raise PKIError(f"{path}: not {what} (PEM or DER)") from None


# --- helpers -------------------------------------------------------------------------


def _load_p12(path: Path, data: bytes, password: str | None) -> tuple[list[x509.Certificate], PrivateKey | None]:
    candidates = [password] if password is not None else ["", DEFAULT_P12_PASSWORD]
    for candidate in candidates:
        try:
            bundle = pkcs12.load_pkcs12(data, candidate.encode())
        except ValueError:
            continue
        certs = ([bundle.cert.certificate] if bundle.cert else []) + [c.certificate for c in bundle.additional_certs]
        if not certs:
            raise PKIError(f"{path}: the PKCS#12 file holds no certificate")
        return certs, bundle.key
    hint = "wrong password" if password is not None else "password needed (--password)"
    raise PKIError(f"{path}: cannot open PKCS#12: {hint}")


def _looks_like_pfx(data: bytes) -> bool:
    """A PFX is SEQUENCE { INTEGER 3, ... }; a certificate is SEQUENCE { SEQUENCE ... }."""
    if len(data) < 5 or data[0] != 0x30:
        return False
    first_len = data[1]
    offset = 2 + (first_len & 0x7F if first_len & 0x80 else 0)
    return data[offset : offset + 3] == b"\x02\x01\x03"


def _friendly_name(cert: x509.Certificate) -> bytes | None:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value).encode() if cns else None


def _place(tmp: str, path: Path, force: bool) -> None:
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise PKIError(f"{path} already exists (use --force to overwrite)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # File systems without hard links: best effort check, then rename.
        ensure_free([path], force=False)
        os.replace(tmp, path)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create folder {path.parent}: {exc.strerror or exc}") from None


def _make_dir(path: Path, mode: int) -> None:
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create folder {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise PKIError(f"{path} exists and is not a folder")


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on ``lock_path``: processes starting together (workers) issue
    one CA / one certificate instead of mixing each other's keys and certificates."""
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise PKIError(f"cannot create {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
