"""``certs trust --install | --uninstall | --check``: the CA in every trust store clients read.

::

    model.py   TrustedCA, entry_name, Outcome, the Place protocol, act(), exit_code() (pure)
    tools.py   Machine (HOME, env, platform), running tools, which package has a missing one
    system.py  the OS store: Debian/Ubuntu/Alpine, Fedora/RHEL, Arch; macOS, Windows commands
    nss.py     NSS databases: ~/.pki/nssdb (Chromium/Chrome), Firefox profiles
    java.py    the JDK's cacerts, via keytool

Each store is tried on its own: a missing tool or store gives a ``skipped`` outcome, a
failure a ``failed`` one, and neither stops the next store.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from proxy.errors import PKIError
from proxy.pki.build import is_ca
from proxy.pki.store import certs_pem, load_certificates
from proxy.pki.trust_stores import java, nss, system
from proxy.pki.trust_stores.model import ACTIONS, Outcome, Status, TrustedCA, entry_name, exit_code
from proxy.pki.trust_stores.tools import Machine

__all__ = ["ACTIONS", "STORES", "Machine", "Outcome", "Status", "apply", "entry_name", "exit_code", "load_ca"]

STORES: dict[str, Callable[[str, TrustedCA, Machine], list[Outcome]]] = {
    "system": system.outcomes,
    "nss": nss.outcomes,
    "java": java.outcomes,
}


def load_ca(ca_file: Path) -> x509.Certificate:
    """The first certificate of CA_FILE, refused unless it is a CA (a leaf is no anchor)."""
    cert = load_certificates(ca_file)[0]
    if not is_ca(cert):
        raise PKIError(f"{ca_file} is not a CA certificate; only a CA belongs in a trust store")
    return cert


def apply(action: str, ca_file: Path, stores: Sequence[str] = tuple(STORES), machine: Machine | None = None) -> list[Outcome]:
    """Carry ACTION out on each of STORES in turn; one Outcome per place found."""
    cert = load_ca(ca_file)
    machine = machine or Machine.current()
    results: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="tlsproxy-trust-") as tmp:
        pem_file = Path(tmp) / f"{entry_name(cert)}.pem"
        pem_file.write_bytes(certs_pem([cert]))
        ca = TrustedCA(cert, pem_file)
        for name in stores:
            try:
                results += STORES[name](action, ca, machine)
            except PKIError as exc:  # a store that broke while looking: that store only
                results.append(Outcome(name, "", Status.FAILED, str(exc)))
    return results
