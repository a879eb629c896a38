"""What every trust store shares: the CA being trusted, one outcome per place, the exit code.

A store is a list of *places* (the system bundle, one NSS database, one Java ``cacerts``).
Each place answers four questions (``Place``), and ``act`` turns an action into one
``Outcome`` from those answers, the same way for every store: installing checks first (so a
second install changes nothing), uninstalling removes only the entry named after this CA,
and both look again afterwards instead of trusting the tool's exit code.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from proxy.errors import PKIError

ACTIONS = ("install", "uninstall", "check")


class Status(enum.Enum):
    INSTALLED = "installed"
    ALREADY = "already installed"
    REMOVED = "removed"
    ABSENT = "not installed, nothing to remove"
    TRUSTED = "trusted"
    NOT_TRUSTED = "not trusted"
    SKIPPED = "skipped"
    FAILED = "failed"


def entry_name(cert: x509.Certificate) -> str:
    """``tlsproxy-<CN slug>-<first 12 hex of SHA-256>``: the same CA gets the same name in
    every store (file, NSS nickname, keytool alias), another CA never does."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    slug = re.sub(r"[^a-z0-9]+", "-", str(cns[0].value).lower()).strip("-") if cns else ""
    return f"tlsproxy-{slug or 'ca'}-{cert.fingerprint(hashes.SHA256()).hex()[:12]}"


@dataclass(frozen=True)
class TrustedCA:
    """The CA to trust, and a file holding only it in PEM (what the tools read)."""

    cert: x509.Certificate
    pem_file: Path

    @property
    def name(self) -> str:
        return entry_name(self.cert)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def sha1_hex(self) -> str:
        """The thumbprint macOS and Windows tools select a certificate by."""
        return self.cert.fingerprint(hashes.SHA1()).hex().upper()  # an identifier, not a signature


@dataclass(frozen=True)
class Outcome:
    store: str
    where: str
    status: Status
    detail: str = ""

    def line(self) -> str:
        text = f"{self.store}: {self.status.value}"
        if self.where:
            text += f": {self.where}"
        return f"{text}; {self.detail}" if self.detail else text


class Place(Protocol):
    """One place a store keeps trusted CAs in (a bundle, an NSS database, a keystore)."""

    where: str

    def installed(self) -> bool:
        """Is the entry named after this CA there?"""

    def trusted(self) -> bool:
        """Would clients reading this place trust the CA?"""

    def add(self) -> None: ...

    def remove(self) -> None: ...


def act(action: str, store: str, place: Place) -> Outcome:
    """Carry ACTION out on PLACE and say what happened; a PKIError becomes ``failed``."""
    try:
        if action == "check":
            return Outcome(store, place.where, Status.TRUSTED if place.trusted() else Status.NOT_TRUSTED)
        if action == "install":
            if place.installed() and place.trusted():
                return Outcome(store, place.where, Status.ALREADY)
            place.add()
            if not place.trusted():
                return Outcome(store, place.where, Status.FAILED, "added, but the store still does not trust it")
            return Outcome(store, place.where, Status.INSTALLED)
        if not place.installed():
            return Outcome(store, place.where, Status.ABSENT)
        place.remove()
        if place.installed():
            return Outcome(store, place.where, Status.FAILED, "removed, but the entry is still there")
        return Outcome(store, place.where, Status.REMOVED)
    except PKIError as exc:
        return Outcome(store, place.where, Status.FAILED, str(exc))


def exit_code(action: str, outcomes: Iterable[Outcome]) -> int:
    """1 when a place that exists could not be changed (or, for ``check``, does not trust the
    CA, or no place could be checked at all); 0 otherwise. Skipped places never count."""
    outcomes = list(outcomes)
    if any(o.status is Status.FAILED for o in outcomes):
        return 1
    if action == "check":
        checked = [o for o in outcomes if o.status in (Status.TRUSTED, Status.NOT_TRUSTED)]
        return 0 if checked and all(o.status is Status.TRUSTED for o in checked) else 1
    return 0
