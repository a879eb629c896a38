"""The operating system's store: what curl, Python ``ssl``, Go and most CLI tools trust.

Linux distributions keep a folder of extra CAs and rebuild one bundle from it: Debian,
Ubuntu and Alpine (``update-ca-certificates``), Fedora and RHEL (``update-ca-trust``),
Arch (``trust anchor``, p11-kit). macOS and Windows have their own tools; the commands for
them are built by pure functions (``macos_commands``, ``windows_commands``) and run only
there. ``--check`` on Linux reads the rebuilt bundle, so it says what clients will see.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import PKIError
from proxy.pki.store import certs_pem, write_atomic
from proxy.pki.trust_stores.java import keytool_argv
from proxy.pki.trust_stores.model import Outcome, Place, Status, TrustedCA, act
from proxy.pki.trust_stores.tools import Machine, missing, run

STORE = "system"
MACOS_KEYCHAIN = "/Library/Keychains/System.keychain"
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class Flavour:
    """A Linux family's layout. ``anchors`` set: copy the CA there and run ``refresh``;
    unset: ``refresh`` is the add command itself (``trust anchor``)."""

    name: str
    tool: str
    bundle: Path
    anchors: Path | None = None
    refresh: tuple[str, ...] = ()
    marker: Path | None = None  # a path only this family has (tells Alpine from Debian, Fedora from Arch)
    refresh_removed: tuple[str, ...] | None = None  # after a removal, when not ``refresh``
    java_hook: Path | None = None  # a keystore the update tool's hook copies anchors into


ALPINE = Flavour(
    "Alpine", "update-ca-certificates", Path("/etc/ssl/certs/ca-certificates.crt"),
    anchors=Path("/usr/local/share/ca-certificates"), refresh=("update-ca-certificates",),
    marker=Path("/etc/alpine-release"),
)
# Debian's tool, run plainly after a removal, rebuilds the bundle but keeps the removed CA's
# links in /etc/ssl/certs (it cleans orphans only when a CA listed in /etc/ca-certificates.conf
# changed): --fresh rebuilds them. Its ca-certificates-java hook copies each anchor into Java's
# shared cacerts as ``debian:NAME.pem`` and is never told of the removal: that alias goes too.
DEBIAN = Flavour(
    "Debian/Ubuntu", "update-ca-certificates", Path("/etc/ssl/certs/ca-certificates.crt"),
    anchors=Path("/usr/local/share/ca-certificates"), refresh=("update-ca-certificates",),
    refresh_removed=("update-ca-certificates", "--fresh"), java_hook=Path("/etc/ssl/certs/java/cacerts"),
)
FEDORA = Flavour(
    "Fedora/RHEL", "update-ca-trust", Path("/etc/pki/tls/certs/ca-bundle.crt"),
    anchors=Path("/etc/pki/ca-trust/source/anchors"), refresh=("update-ca-trust", "extract"),
    marker=Path("/etc/pki/ca-trust/source"),
)
ARCH = Flavour(
    "Arch", "trust", Path("/etc/ssl/certs/ca-certificates.crt"), marker=Path("/etc/ca-certificates/trust-source"),
)
LINUX_FLAVOURS = (ALPINE, DEBIAN, FEDORA, ARCH)


# --- commands (pure) ----------------------------------------------------------------------


def arch_commands(action: str, ca_pem: Path) -> list[list[str]]:
    """p11-kit copies the anchor into /etc/ca-certificates/trust-source and re-extracts."""
    flag = "--store" if action == "install" else "--remove"
    return [["trust", "anchor", flag, str(ca_pem)]]


def macos_commands(action: str, ca_pem: Path, sha1_hex: str) -> list[list[str]]:
    """``security``: trusted as a root for every policy in the System keychain (admin)."""
    if action == "install":
        return [["security", "add-trusted-cert", "-d", "-r", "trustRoot", "-k", MACOS_KEYCHAIN, str(ca_pem)]]
    if action == "uninstall":
        return [
            ["security", "remove-trusted-cert", "-d", str(ca_pem)],
            ["security", "delete-certificate", "-Z", sha1_hex, MACOS_KEYCHAIN],
        ]
    return [["security", "verify-cert", "-c", str(ca_pem)]]


def windows_commands(action: str, ca_pem: Path, sha1_hex: str) -> list[list[str]]:
    """``certutil`` on the machine's Trusted Root store (an elevated prompt); the
    certificate is selected by its SHA-1 thumbprint, so only this CA is touched."""
    if action == "install":
        return [["certutil", "-addstore", "-f", "ROOT", str(ca_pem)]]
    if action == "uninstall":
        return [["certutil", "-delstore", "ROOT", sha1_hex]]
    return [["certutil", "-verifystore", "ROOT", sha1_hex]]


def bundle_holds(bundle_pem: bytes, der: bytes) -> bool:
    """Is the certificate DER one of the PEM blocks of a bundle? (Compared as bytes: one
    odd certificate in a distribution bundle must not make the whole check fail.)"""
    for block in _PEM_BLOCK.findall(bundle_pem):
        try:
            if base64.b64decode(b"".join(block.split()), validate=True) == der:
                return True
        except ValueError:
            continue
    return False


# --- places ---------------------------------------------------------------------------------


@dataclass
class AnchorFolder:
    """Debian/Alpine, Fedora/RHEL: our file in the anchors folder; trusted = in the bundle."""

    flavour: Flavour
    ca: TrustedCA
    machine: Machine
    tool_path: str  # the refresh tool, found on PATH or in an sbin folder

    def refresh(self, *, removed: bool = False) -> list[str]:
        argv = (removed and self.flavour.refresh_removed) or self.flavour.refresh
        return [self.tool_path, *argv[1:]]

    @property
    def file(self) -> Path:
        return self.flavour.anchors / f"{self.ca.name}.crt"

    @property
    def where(self) -> str:
        return f"{self.file} ({self.flavour.name})"

    def installed(self) -> bool:
        return self.file.exists()

    def trusted(self) -> bool:
        return _bundle_holds(self.flavour.bundle, self.ca)

    def add(self) -> None:
        try:
            write_atomic(self.file, certs_pem([self.ca.cert]), force=True)
        except PKIError as exc:
            raise PKIError(_root_hint(str(exc))) from None
        run(self.refresh(), self.machine)

    def remove(self) -> None:
        try:
            self.file.unlink()
        except OSError as exc:
            raise PKIError(_root_hint(f"cannot remove {self.file}: {exc.strerror or exc}")) from None
        run(self.refresh(removed=True), self.machine)
        keytool = self.machine.which("keytool")
        if self.flavour.java_hook is not None and self.flavour.java_hook.exists() and keytool:
            # exit 1 when the hook never added it (no Java then, or another keystore layout)
            argv = keytool_argv(keytool, self.flavour.java_hook, "-delete", "-alias", f"debian:{self.file.stem}.pem")
            run(argv, self.machine, allowed=(0, 1))


@dataclass
class ToolStore:
    """Arch, macOS, Windows: the platform's tool adds and removes; ``check`` asks it (or,
    on Arch, reads the bundle it extracts)."""

    label: str
    ca: TrustedCA
    machine: Machine
    commands: Callable[[str], list[list[str]]]  # action -> the argv lists to run
    bundle: Path | None = None

    @property
    def where(self) -> str:
        return self.label

    def installed(self) -> bool:
        return self.trusted()

    def trusted(self) -> bool:
        if self.bundle is not None:
            return _bundle_holds(self.bundle, self.ca)
        (argv,) = self.commands("check")
        return run(argv, self.machine, allowed=(0, 1, 2)).returncode == 0

    def add(self) -> None:
        for argv in self.commands("install"):
            run(argv, self.machine)

    def remove(self) -> None:
        for argv in self.commands("uninstall"):
            run(argv, self.machine)


def find(ca: TrustedCA, machine: Machine, flavours: tuple[Flavour, ...] = LINUX_FLAVOURS) -> Place | Outcome:
    """The system store of this machine, or why there is none to act on."""
    if machine.platform == "darwin":
        return _tool_store("macOS System keychain", "security", ca, machine,
                           lambda action: macos_commands(action, ca.pem_file, ca.sha1_hex))
    if machine.platform == "win32":
        return _tool_store("Windows ROOT store", "certutil", ca, machine,
                           lambda action: windows_commands(action, ca.pem_file, ca.sha1_hex))
    for flavour in flavours:
        tool_path = machine.which_admin(flavour.tool)
        if tool_path and (flavour.marker is None or flavour.marker.exists()):
            if flavour.anchors is not None:
                return AnchorFolder(flavour, ca, machine, tool_path)
            return ToolStore(f"trust anchor ({flavour.name})", ca, machine,
                             lambda action: arch_commands(action, ca.pem_file), bundle=flavour.bundle)
    return Outcome(STORE, "", Status.SKIPPED, missing("update-ca-certificates") + ", or update-ca-trust / trust")


def outcomes(action: str, ca: TrustedCA, machine: Machine) -> list[Outcome]:
    place = find(ca, machine)
    return [place if isinstance(place, Outcome) else act(action, STORE, place)]


def _tool_store(label: str, tool: str, ca: TrustedCA, machine: Machine, commands) -> Place | Outcome:
    if not machine.which(tool):
        return Outcome(STORE, label, Status.SKIPPED, missing(tool))
    return ToolStore(label, ca, machine, commands)


def _bundle_holds(bundle: Path, ca: TrustedCA) -> bool:
    try:
        return bundle_holds(bundle.read_bytes(), ca.der)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PKIError(f"cannot read {bundle}: {exc.strerror or exc}") from None


def _root_hint(message: str) -> str:
    return f"{message} (the system store needs root: try sudo)" if "ermission denied" in message else message
