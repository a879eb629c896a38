"""How to make clients trust a CA, instead of turning verification off.

``trust_instructions`` is pure text (tested as such); ``install_ca`` copies the CA into
the system store and runs the distribution's update tool, which is the only part that
touches the machine (its folder and command are parameters so tests use a temp folder).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy.errors import PKIError
from proxy.pki.build import is_ca
from proxy.pki.store import certs_pem, load_certificates, write_atomic


@dataclass(frozen=True)
class SystemStore:
    """Where a distribution takes extra CAs from, and the command that rebuilds its bundle."""

    name: str
    anchors: Path
    update_command: tuple[str, ...]
    bundle: Path


# Debian/Ubuntu and Alpine share the ca-certificates layout; Fedora/RHEL as a courtesy.
SYSTEM_STORES = (
    SystemStore(
        "Debian/Ubuntu/Alpine",
        Path("/usr/local/share/ca-certificates"),
        ("update-ca-certificates",),
        Path("/etc/ssl/certs/ca-certificates.crt"),
    ),
    SystemStore(
        "Fedora/RHEL",
        Path("/etc/pki/ca-trust/source/anchors"),
        ("update-ca-trust", "extract"),
        Path("/etc/pki/tls/certs/ca-bundle.crt"),
    ),
)


def trust_instructions(ca_pem: Path, ca_cert: x509.Certificate, url: str = "https://localhost:8443/") -> str:
    """Copy-paste ways to trust CA_PEM in a shell, curl, requests, httpx and node."""
    path = str(Path(ca_pem).absolute())
    quoted = shlex.quote(path)
    fingerprint = ca_cert.fingerprint(hashes.SHA256()).hex()
    return "\n".join(
        [
            f"CA {ca_cert.subject.rfc4514_string()}  (SHA-256 {fingerprint})",
            "",
            "Trust it for everything started from this shell (note: SSL_CERT_FILE replaces the",
            "system bundle for OpenSSL-based tools, so only this CA is trusted there):",
            f"  export SSL_CERT_FILE={quoted} REQUESTS_CA_BUNDLE={quoted} "
            f"CURL_CA_BUNDLE={quoted} NODE_EXTRA_CA_CERTS={quoted}",
            "",
            "Or per client:",
            f"  curl:     curl --cacert {quoted} {url}",
            f"  requests: requests.get({url!r}, verify={path!r})",
            f"  httpx:    httpx.get({url!r}, verify=ssl.create_default_context(cafile={path!r}))",
            f"  python:   ssl.create_default_context(cafile={path!r})",
            f"  node:     NODE_EXTRA_CA_CERTS={quoted} node app.js",
            f"            (or https.get(url, {{ca: fs.readFileSync({path!r})}}))",
            "",
            f"System-wide (Debian/Ubuntu/Alpine, as root): tlsproxy certs trust --ca {quoted} --install",
        ]
    )


def installed_name(ca_cert: x509.Certificate) -> str:
    """A stable file name per CA (same CA -> same file, so installing twice is harmless)."""
    cns = ca_cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    slug = re.sub(r"[^a-z0-9]+", "-", str(cns[0].value).lower()).strip("-") if cns else "ca"
    return f"tlsproxy-{slug or 'ca'}-{ca_cert.fingerprint(hashes.SHA256()).hex()[:12]}.crt"


def find_system_store() -> SystemStore:
    """The first store whose update tool is installed; PKIError if none is."""
    for store in SYSTEM_STORES:
        if shutil.which(store.update_command[0]):
            return store
    raise PKIError(
        "no system CA store tool found (install ca-certificates: apt-get install ca-certificates, "
        "or apk add ca-certificates)"
    )


def install_ca(ca_pem: Path, store: SystemStore | None = None) -> Path:
    """Copy the CA into the store's anchor folder and rebuild the system bundle."""
    certs = load_certificates(ca_pem)
    ca_cert = certs[0]
    if not is_ca(ca_cert):
        raise PKIError(f"{ca_pem} is not a CA certificate; only CAs belong in the system store")
    store = store or find_system_store()
    target = store.anchors / installed_name(ca_cert)
    try:
        write_atomic(target, certs_pem([ca_cert]), force=True)
    except PKIError as exc:
        raise PKIError(f"{exc} (installing into the system store needs root: try sudo)") from None
    try:
        result = subprocess.run(store.update_command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PKIError(f"{' '.join(store.update_command)} failed: {exc}") from None
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PKIError(f"{' '.join(store.update_command)} exited {result.returncode}: {last[0]}")
    return target
