"""A new user's first ten minutes (issue #16): each test does what the user did, as a
subprocess of the real command where the user typed one, and checks that it now works or
says how to go on."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import requests
from upstream import WAIT

from proxy.demo import ensure_demo_certificates

REPO = Path(__file__).resolve().parent.parent


def user_environ() -> dict[str, str]:
    """This environment as a new user's shell has it: no TLSPROXY_CONFIG."""
    return {k: v for k, v in os.environ.items() if k != "TLSPROXY_CONFIG"}


def tlsproxy(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd, env={**user_environ(), **(env or {})}, capture_output=True, text=True, timeout=WAIT,
    )


class Serving:
    """``python -m proxy serve ARGS`` until the test ends; ``port`` from its log line."""

    LISTENING = re.compile(r"listening on https://(\S+):(\d+) ")

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", *args], cwd=cwd, env=user_environ(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr = []
        for line in self.proc.stderr:  # bounded: pytest-timeout, and serve exits on errors
            self.stderr.append(line)
            if match := self.LISTENING.search(line):
                self.host, self.port = match.group(1), int(match.group(2))
                return
        raise AssertionError(f"serve exited ({self.proc.wait(WAIT)}): {''.join(self.stderr)}")

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(WAIT)
        self.proc.stderr.close()


# --- item 2: serve without a config says how to give one ---------------------------------


@pytest.mark.parametrize("command", ["serve", "check"])
def test_no_config_says_how_to_go_on(tmp_path: Path, command: str) -> None:
    result = tlsproxy(command, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("tlsproxy: error: config/proxy.yaml: no such file (the default config file)\n")
    for way in ("-c FILE", "TLSPROXY_CONFIG", "--listen 127.0.0.1:8443 --upstream http://"):
        assert way in result.stderr


def test_a_missing_tlsproxy_config_file_is_named_as_such(tmp_path: Path) -> None:
    result = tlsproxy("serve", cwd=tmp_path, env={"TLSPROXY_CONFIG": "/nowhere/proxy.yaml"})
    assert result.returncode == 1
    assert "/nowhere/proxy.yaml: no such file ($TLSPROXY_CONFIG)" in result.stderr


def test_an_explicit_missing_config_is_just_missing(tmp_path: Path) -> None:
    result = tlsproxy("serve", "-c", "typo.yaml", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == "tlsproxy: error: typo.yaml: no such file\n"


# --- item 4: every error in one run, with its line; flags named as flags ------------------

MANY_ERRORS = """\
    workers: x
    tls:
      certificates:
        - {cert: missing.pem, key: missing.key}
      min_version: "1.1"
    client_auth:
      mode: requir
      forwrd: xfcc
    timeouts: {handshake: 10x, idle: 5s}
    services:
      - name: api
        upstream: htp://x
      - name: web
        hosts: ["bad host"]
        upstream: http://127.0.0.1:9001
"""


def test_check_reports_every_independent_error_in_one_run(tmp_path: Path) -> None:
    (tmp_path / "proxy.yaml").write_text(textwrap.dedent(MANY_ERRORS))
    result = tlsproxy("check", "-c", "proxy.yaml", cwd=tmp_path)
    assert result.returncode == 1
    errors = [line.removeprefix("tlsproxy: error: ") for line in result.stderr.splitlines()]
    assert errors == [
        "proxy.yaml:1: workers: 'x' is neither a number of processes nor 'auto'",
        "proxy.yaml:5: tls.min_version: '1.1' is not one of 1.2, 1.3",
        "proxy.yaml:7: client_auth.mode: 'requir' is not one of none, optional, require (did you mean 'require'?)",
        "proxy.yaml:8: client_auth.forwrd: unknown key (did you mean 'forward'?)",
        "proxy.yaml:9: timeouts.handshake: '10x' is not a duration (e.g. 250ms, 10s, 2m, or seconds)",
        "proxy.yaml:12: services[0].upstream: 'htp://x' is not an http:// URL",
        "proxy.yaml:14: services[1].hosts[0]: 'bad host' does not name a valid host",
        # the keys that were right still name files, and those are opened too
        f"proxy.yaml:4: tls.certificates[0].cert: {tmp_path / 'missing.pem'}: no such file",
    ]


def test_serve_reports_the_same_errors(tmp_path: Path) -> None:
    (tmp_path / "proxy.yaml").write_text(textwrap.dedent(MANY_ERRORS))
    result = tlsproxy("serve", "-c", "proxy.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("tlsproxy: error: proxy.yaml:") == 7


def test_serve_names_the_line_of_an_access_log_it_cannot_open(tmp_path: Path, pki) -> None:
    cert, key = pki.server
    (tmp_path / "proxy.yaml").write_text(textwrap.dedent(f"""\
        listen: ["127.0.0.1:0"]
        tls:
          certificates: [{{cert: {cert}, key: {key}}}]
        access_log:
          path: no-such-dir/access.log
        services: [{{name: app, upstream: "http://127.0.0.1:9"}}]
        """))
    result = tlsproxy("serve", "-c", "proxy.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert re.search(r"proxy\.yaml:5: access_log\.path: cannot open .*no-such-dir/access\.log", result.stderr)


def test_zero_config_file_errors_name_the_flag(tmp_path: Path, pki) -> None:
    result = tlsproxy("serve", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9",
                      "--cert", "nope.pem", "--key", str(pki.server[1]), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"tlsproxy: error: --cert: {tmp_path / 'nope.pem'}: no such file\n"


# --- item 5: sizes with units ---------------------------------------------------------------


def test_sizes_with_units_limit_the_body(tmp_path: Path, pki, upstream) -> None:
    cert, key = pki.server
    (tmp_path / "proxy.yaml").write_text(textwrap.dedent(f"""\
        listen: ["127.0.0.1:0"]
        tls:
          certificates: [{{cert: {cert}, key: {key}}}]
        limits: {{max_header_bytes: 64KiB, max_body_bytes: 1KB}}
        access_log: {{path: access.log}}
        services: [{{name: app, upstream: "{upstream.url}"}}]
        """))
    with Serving(["-c", "proxy.yaml"], tmp_path) as served:
        url = f"https://localhost:{served.port}/echo"
        assert requests.post(url, data=b"x" * 1000, verify=str(pki.ca_pem), timeout=WAIT).status_code == 200
        assert requests.post(url, data=b"x" * 1001, verify=str(pki.ca_pem), timeout=WAIT).status_code == 413


# --- item 12: [::]:PORT and :PORT take IPv4 clients too --------------------------------------


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("listen", [":0", "0", "[::]:0"])
def test_every_interface_takes_ipv4_and_ipv6_clients(tmp_path: Path, pki, upstream, listen: str) -> None:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    args = ["--listen", listen, "--upstream", upstream.url, "--cert", str(pki.server[0]), "--key", str(pki.server[1])]
    with Serving(args, tmp_path) as served:
        assert served.host == "[::]"
        for host in ("127.0.0.1", "[::1]"):
            response = requests.get(f"https://{host}:{served.port}/echo", verify=str(pki.ca_pem), timeout=WAIT)
            assert response.status_code == 200, host


# --- item 10: a key the proxy's user cannot read says which user that is ------------------


def test_unreadable_key_names_the_uid_the_proxy_runs_as(tmp_path: Path, pki) -> None:
    """As in the container: a root-owned 0600 key, and tlsproxy running as uid 10001."""
    setpriv = shutil.which("setpriv")
    if os.getuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to run tlsproxy as uid 10001")
    with tempfile.TemporaryDirectory() as folder:  # under /tmp, 0755 (pytest's tmp_path is 0700)
        mounted = Path(folder)
        mounted.chmod(0o755)
        cert, key = mounted / "server.pem", mounted / "server.key"
        shutil.copyfile(pki.server[0], cert)
        shutil.copyfile(pki.server[1], key)
        cert.chmod(0o644)
        key.chmod(0o600)  # root's, as `certs issue` writes it
        command = [setpriv, "--reuid", "10001", "--regid", "10001", "--clear-groups",
                   sys.executable, "-m", "proxy", "serve", "--listen", "127.0.0.1:0", "--upstream",
                   "http://127.0.0.1:9", "--cert", str(cert), "--key", str(key)]
        environ = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run(command, cwd="/", env=environ, capture_output=True, text=True, timeout=WAIT)
    if "Permission denied" in result.stderr and "tlsproxy" not in result.stderr:
        pytest.skip(f"uid 10001 cannot run this Python here: {result.stderr.strip()[:200]}")
    assert result.returncode == 1
    assert f"--key: {key}: cannot read: permission denied for uid 10001 (gid 10001)" in result.stderr
    assert "chown 10001" in result.stderr


# --- item 11: the README's test command installs nothing, and says what it skipped ----------


def test_the_suite_installs_nothing_and_lists_what_it_skipped(tmp_path: Path) -> None:
    """The container tests on a machine without podman, as the README's test command runs
    them: an ``apt-get`` (or ``sudo``) call is recorded and fails, and must never happen."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "cat", "mkdir", "sed", "head"):
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    calls = tmp_path / "installer-calls"
    for installer in ("apt-get", "apt", "sudo", "dpkg"):
        (bin_dir / installer).write_text(f'#!/bin/sh\necho "{installer} $*" >> {calls}\nexit 1\n')
        (bin_dir / installer).chmod(0o755)
    environ = {**os.environ, "PATH": str(bin_dir), "PODMAN_HOME": str(tmp_path / "podman-home")}
    environ.pop("PODMAN_HERE_INSTALL", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_container.py",
         "-k", "not hadolint and not shellcheck"],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert not calls.exists(), calls.read_text()
    summary = result.stdout.split("skipped groups (install what the reason names to run them)", 1)[1]
    assert re.search(r"\d+ skipped in tests/test_container\.py: podman is not set up: podman, runc or "
                     r"mmdebstrap not installed \(provision with: sudo bash deploy/podman-here\.sh\)", summary)
    assert not (tmp_path / "podman-home" / "base-rootfs.tar").exists()


# --- items 1 and 9: the README's toolkit lines, after the demo, then its config example -------


def readme_block(heading: str, index: int = 0) -> str:
    """The INDEX-th ```bash block of the README section starting at HEADING."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[index]


def test_readme_toolkit_lines_after_the_demo_then_check_the_example_config(tmp_path: Path) -> None:
    tlsproxy_bin = Path(sys.executable).parent / "tlsproxy"
    if not tlsproxy_bin.exists():
        pytest.skip(f"no tlsproxy script beside {sys.executable} (install with pip install -e .)")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "proxy.yaml").write_bytes((REPO / "config" / "proxy.yaml").read_bytes())
    ensure_demo_certificates(tmp_path / "certs")  # Quick start: the demo ran first, and made certs/ca
    environ = user_environ()
    environ["PATH"] = f"{tlsproxy_bin.parent}{os.pathsep}{environ.get('PATH', '')}"  # the README's export
    toolkit = readme_block("## The certificate toolkit: `tlsproxy certs`")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", toolkit], cwd=tmp_path, env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config_lines = readme_block("## Serving: `tlsproxy serve`", 1).splitlines()
    check = next(line.split("#")[0].strip() for line in config_lines if line.startswith("tlsproxy check"))
    result = subprocess.run(["bash", "-c", check], cwd=tmp_path, env=environ, capture_output=True, text=True,
                            timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("config OK\n") and "certs/api.pem: api.localhost" in result.stdout
