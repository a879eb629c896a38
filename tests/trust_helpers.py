"""Helpers for the trust-store tests: a user whose HOME is a temp folder, the CLI run as that
user, the tools' skip markers (naming tool and package), headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOL_WAIT = 120  # update-ca-certificates and its Java hook take seconds; keytool starts a JVM


def needs(tool: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed (apt install {package})")


needs_certutil = needs("certutil", "libnss3-tools")
needs_chromium = needs("chromium", "chromium")
needs_java = pytest.mark.skipif(
    shutil.which("java") is None or shutil.which("keytool") is None,
    reason="java/keytool not installed (apt install default-jre-headless)",
)


@dataclass
class TrustUser:
    """A user of this machine whose HOME (and JAVA_HOME) are temp folders: nothing of the
    real user's browsers or JDK is read or changed."""

    home: Path
    env: dict[str, str]

    @classmethod
    def make(cls, tmp_path: Path) -> TrustUser:
        home = tmp_path / "home"
        home.mkdir()
        env = {key: value for key, value in os.environ.items()
               if key not in ("SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "JAVA_HOME")}
        env.update(HOME=str(home), JAVA_HOME=str(tmp_path / "no-java-here"), NO_PROXY="*", no_proxy="*")
        return cls(home, env)

    def trust(self, ca: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "certs", "trust", "--ca", str(ca), *args],
            env=self.env, capture_output=True, text=True, timeout=TOOL_WAIT,
        )

    def lines(self, result: subprocess.CompletedProcess, store: str) -> list[str]:
        return [line for line in result.stdout.splitlines() if line.startswith(f"{store}: ")]

    def copy_java(self, tmp_path: Path) -> Path:
        """A JAVA_HOME whose lib/security/cacerts is a copy of the real JDK's; returns it."""
        real = Path(os.path.realpath(shutil.which("java"))).parent.parent
        jdk = tmp_path / "jdk"
        (jdk / "lib" / "security").mkdir(parents=True)
        (jdk / "bin").mkdir()
        shutil.copyfile(real / "lib" / "security" / "cacerts", jdk / "lib" / "security" / "cacerts")
        os.symlink(real / "bin" / "keytool", jdk / "bin" / "keytool")
        self.env["JAVA_HOME"] = str(jdk)
        return jdk / "lib" / "security" / "cacerts"


def certutil_listing(db: Path) -> str:
    return subprocess.run(["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, text=True,
                          timeout=TOOL_WAIT, check=True).stdout


def chromium(user: TrustUser, url: str, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium as USER (its HOME, so its ~/.pki/nssdb), no proxy, a fresh profile."""
    profile = user.home / "chromium-profile"
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--no-first-run",
         f"--user-data-dir={profile}", *extra, url],
        env=user.env, capture_output=True, text=True, timeout=TOOL_WAIT,
    )
