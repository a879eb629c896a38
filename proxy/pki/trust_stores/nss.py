"""NSS databases: what Chromium, Chrome and Firefox on Linux trust (not the system store).

Chromium and Chrome read ``~/.pki/nssdb`` (created here when missing, as Chrome would);
Firefox keeps one database per profile, listed in ``profiles.ini`` under the classic,
snap and flatpak folders. Each database is changed with ``certutil`` under one nickname
(``entry_name``), with trust ``C,,`` (a CA trusted to issue server certificates).
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import PKIError
from proxy.pki.trust_stores.model import Outcome, Place, Status, TrustedCA, act
from proxy.pki.trust_stores.tools import Machine, missing, run

STORE = "nss"
TOOL = "certutil"
SHARED_DB = Path(".pki/nssdb")  # relative to HOME
FIREFOX_DIRS = (  # relative to HOME: classic, snap, flatpak
    Path(".mozilla/firefox"),
    Path("snap/firefox/common/.mozilla/firefox"),
    Path(".var/app/org.mozilla.firefox/.mozilla/firefox"),
)
CA_TRUST = "C,,"
MAX_DUPLICATES = 8  # certutil -D removes one certificate per call


# --- finding databases (pure over the file tree) --------------------------------------------


def firefox_profiles(firefox_dir: Path) -> list[Path]:
    """The profile folders ``profiles.ini`` in FIREFOX_DIR lists (relative or absolute)."""
    ini = firefox_dir / "profiles.ini"
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(ini.read_text(encoding="utf-8", errors="replace"))
    except (OSError, configparser.Error):
        return []
    profiles = []
    for section in parser.sections():
        path = parser.get(section, "Path", fallback=None)
        if not section.lower().startswith("profile") or not path:
            continue
        relative = parser.get(section, "IsRelative", fallback="1").strip() != "0"
        folder = firefox_dir / path if relative else Path(path)
        if folder not in profiles:
            profiles.append(folder)
    return profiles


def nss_argv(db: Path, *args: str) -> list[str]:
    return [TOOL, "-d", f"sql:{db}", *args]


def add_argv(db: Path, nickname: str, pem: Path) -> list[str]:
    return nss_argv(db, "-A", "-t", CA_TRUST, "-n", nickname, "-i", str(pem))


def trust_flags(listing: str, nickname: str) -> str | None:
    """The trust attributes ``certutil -L`` shows for NICKNAME (e.g. ``C,,``), or None."""
    for line in listing.splitlines():
        name, _, flags = line.rstrip().rpartition(" ")
        if name.strip() == nickname and flags.count(",") == 2:
            return flags
    return None


# --- one database -------------------------------------------------------------------------------


@dataclass
class NSSDatabase:
    folder: Path
    label: str
    ca: TrustedCA
    machine: Machine

    @property
    def where(self) -> str:
        return f"{self.folder} ({self.label})"

    def _flags(self) -> str | None:
        if not (self.folder / "cert9.db").exists():
            return None
        return trust_flags(run(nss_argv(self.folder, "-L"), self.machine).stdout, self.ca.name)

    def installed(self) -> bool:
        return self._flags() is not None

    def trusted(self) -> bool:
        flags = self._flags()
        return flags is not None and "C" in flags.split(",")[0]

    def add(self) -> None:
        if not (self.folder / "cert9.db").exists():
            try:
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise PKIError(f"cannot create {self.folder}: {exc.strerror or exc}") from None
            run(nss_argv(self.folder, "-N", "--empty-password"), self.machine)
        run(add_argv(self.folder, self.ca.name, self.ca.pem_file), self.machine)

    def remove(self) -> None:
        for _ in range(MAX_DUPLICATES):
            run(nss_argv(self.folder, "-D", "-n", self.ca.name), self.machine)
            if not self.installed():
                return


def find(action: str, ca: TrustedCA, machine: Machine) -> list[Place | Outcome]:
    """Every NSS database under HOME: the shared one, then each Firefox profile's."""
    found: list[Place | Outcome] = []
    shared = machine.home / SHARED_DB
    if (shared / "cert9.db").exists() or action == "install":
        found.append(NSSDatabase(shared, "Chromium/Chrome", ca, machine))  # add() creates it
    else:
        found.append(Outcome(STORE, f"{shared} (Chromium/Chrome)", Status.SKIPPED, "no database here yet"))
    for firefox_dir in FIREFOX_DIRS:
        for profile in firefox_profiles(machine.home / firefox_dir):
            label = f"Firefox profile {profile.name}"
            if (profile / "cert9.db").exists():
                found.append(NSSDatabase(profile, label, ca, machine))
            elif (profile / "cert8.db").exists():
                found.append(Outcome(STORE, f"{profile} ({label})", Status.SKIPPED,
                                     "old cert8.db format (Firefox before 58): import the CA in Firefox's settings"))
            else:
                found.append(Outcome(STORE, f"{profile} ({label})", Status.SKIPPED,
                                     "no cert9.db yet: start Firefox once with this profile"))
    return found


def outcomes(action: str, ca: TrustedCA, machine: Machine) -> list[Outcome]:
    places = find(action, ca, machine)
    if not machine.which(TOOL):
        return [Outcome(STORE, "", Status.SKIPPED, missing(TOOL))]
    return [p if isinstance(p, Outcome) else act(action, STORE, p) for p in places]
