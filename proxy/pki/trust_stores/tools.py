"""Running the stores' command-line tools: where they are, which package has them, and
their failures as one-line PKIErrors (the only module here that starts processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.errors import PKIError

TOOL_TIMEOUT = 120.0  # update-ca-certificates rebuilds every hash link: seconds on a slow disk

# What to install when a tool is missing, per packaging system.
PACKAGES = {
    "certutil": "apt install libnss3-tools (Debian/Ubuntu), dnf install nss-tools (Fedora/RHEL), "
    "pacman -S nss (Arch), brew install nss (macOS)",
    "keytool": "a Java runtime: apt install default-jre-headless (Debian/Ubuntu), "
    "dnf install java-latest-openjdk-headless (Fedora/RHEL), or set JAVA_HOME",
    "update-ca-certificates": "apt install ca-certificates (Debian/Ubuntu), apk add ca-certificates (Alpine)",
}


# Where administration tools live; a normal user's PATH on Debian lacks them, yet --check and
# the hint to use sudo should still find the system store.
ADMIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Machine:
    """The home folder, environment and platform the stores are looked for on (a test
    passes a temporary HOME; nothing else reads ``os.environ``)."""

    home: Path
    env: Mapping[str, str] = field(default_factory=dict)
    platform: str = sys.platform
    admin_dirs: tuple[str, ...] = ADMIN_DIRS

    @classmethod
    def current(cls) -> Machine:
        return cls(Path(os.environ.get("HOME") or Path.home()), dict(os.environ), sys.platform)

    def which(self, tool: str) -> str | None:
        return shutil.which(tool, path=self.env.get("PATH", os.defpath))

    def which_admin(self, tool: str) -> str | None:
        """TOOL on PATH, else in the sbin folders."""
        return self.which(tool) or shutil.which(tool, path=os.pathsep.join(self.admin_dirs))


def missing(tool: str) -> str:
    """Why a store was skipped when TOOL is not installed, and how to get it."""
    where = PACKAGES.get(tool)
    return f"{tool} not found" + (f"; install it: {where}" if where else "")


def run(argv: list[str], machine: Machine, *, allowed: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run ARGV; PKIError naming the command and its last output line when it cannot start,
    times out or exits with a code outside ALLOWED."""
    shown = " ".join(argv[:3])
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False,
            env=dict(machine.env) or None, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PKIError(f"{shown}: {exc}") from None
    if result.returncode not in allowed:
        raise PKIError(f"{shown} exited {result.returncode}: {last_line(result)}")
    return result


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1].strip() if lines else "no output"
