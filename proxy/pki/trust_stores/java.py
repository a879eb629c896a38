"""Java's own ``cacerts``: JVM clients ignore both the system bundle and NSS.

The keystore is ``$JAVA_HOME/lib/security/cacerts`` (``jre/lib/security`` on Java 8), or
the one of the ``java`` found on PATH, its symlinks resolved (``/usr/bin/java`` is
``/etc/alternatives/java`` is ``/usr/lib/jvm/…/bin/java`` on Debian). It is changed with
that JDK's ``keytool`` under one alias (``entry_name``), store password ``changeit``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from proxy.pki.trust_stores.model import Outcome, Place, Status, TrustedCA, act
from proxy.errors import PKIError
from proxy.pki.trust_stores.tools import Machine, last_line, missing, run

STORE = "java"
TOOL = "keytool"
STORE_PASSWORD = "changeit"  # every JDK's default for cacerts
CACERTS = (Path("lib/security/cacerts"), Path("jre/lib/security/cacerts"))


def java_home(machine: Machine) -> tuple[Path | None, str]:
    """The JDK to use and how it was found: $JAVA_HOME, else the real path of ``java``."""
    if machine.env.get("JAVA_HOME"):
        return Path(machine.env["JAVA_HOME"]), "JAVA_HOME"
    java = machine.which("java")
    if java is None:
        return None, "no JAVA_HOME and no java on PATH"
    return Path(os.path.realpath(java)).parent.parent, f"java on PATH ({java})"


def keytool_argv(keytool: str, cacerts: Path, *args: str) -> list[str]:
    return [keytool, *args, "-keystore", str(cacerts), "-storepass", STORE_PASSWORD, "-noprompt"]


@dataclass
class Keystore:
    cacerts: Path
    keytool: str
    ca: TrustedCA
    machine: Machine
    how: str

    @property
    def where(self) -> str:
        real = Path(os.path.realpath(self.cacerts))
        shown = f"{self.cacerts} -> {real}" if real != self.cacerts else str(self.cacerts)
        return f"{shown} (alias {self.ca.name}; {self.how})"

    def installed(self) -> bool:
        # exit 1 with "Alias <x> does not exist" when absent; a wrong password is a failure
        result = run(keytool_argv(self.keytool, self.cacerts, "-list", "-alias", self.ca.name), self.machine,
                     allowed=(0, 1))
        if result.returncode == 0:
            return True
        if "does not exist" in (result.stdout + result.stderr):
            return False
        raise PKIError(f"keytool -list exited {result.returncode}: {last_line(result)}")

    def trusted(self) -> bool:
        return self.installed()  # every certificate entry in cacerts is a trust anchor

    def add(self) -> None:
        run(keytool_argv(self.keytool, self.cacerts, "-importcert", "-trustcacerts", "-alias", self.ca.name,
                         "-file", str(self.ca.pem_file)), self.machine)

    def remove(self) -> None:
        run(keytool_argv(self.keytool, self.cacerts, "-delete", "-alias", self.ca.name), self.machine)


def find(ca: TrustedCA, machine: Machine) -> Place | Outcome:
    home, how = java_home(machine)
    if home is None:
        return Outcome(STORE, "", Status.SKIPPED, f"{how}; set JAVA_HOME to trust the CA for a JDK")
    cacerts = next((home / rel for rel in CACERTS if (home / rel).exists()), None)
    if cacerts is None:
        return Outcome(STORE, str(home), Status.SKIPPED, f"no lib/security/cacerts under it (found by {how})")
    bundled = home / "bin" / TOOL
    keytool = str(bundled) if bundled.exists() else machine.which(TOOL)
    if keytool is None:
        return Outcome(STORE, str(cacerts), Status.SKIPPED, missing(TOOL))
    return Keystore(cacerts, keytool, ca, machine, how)


def outcomes(action: str, ca: TrustedCA, machine: Machine) -> list[Outcome]:
    place = find(ca, machine)
    return [place if isinstance(place, Outcome) else act(action, STORE, place)]
