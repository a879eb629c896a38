"""The shared fixtures: a session PKI made with our own toolkit (no committed keys), a
test upstream, and a proxy in front of it.

``pki.ca_dir`` / ``pki.ca_pem``  the trusted CA (``ca.pem`` + ``ca.key``)
``pki.other_ca_dir`` / ``pki.other_ca_pem``  a second CA nothing trusts
``pki.server``                   (cert, key) for localhost, 127.0.0.1, ::1, *.localhost
                                 (OpenSSL clients never match *.localhost: for api.localhost
                                 and friends issue ``pki.leaf("api", "api.localhost")``)
``pki.leaf(stem, *names, ...)``  issue more certificates on demand (cached by arguments)
``pki.crl([cert paths])``        a PEM CRL from the main CA revoking those certificates

``upstream``                     a TestUpstream (tests/upstream.py) on 127.0.0.1 for one test
``proxy``                        a ProxyThread with one service, ``app``, in front of it

A test module or test marked ``@pytest.mark.both_engines`` (``pytestmark = …`` in a
module) runs once per HTTP engine (ids ``[h11]`` / ``[httptools]``): the autouse
``http_engine`` fixture makes ``http_engine: auto`` resolve to the engine under test, in
process and in ``tlsproxy serve`` subprocesses (through ``TLSPROXY_HTTP_ENGINE``, which
only tests set).

The suite installs nothing. A test whose tool (curl, openssl, node, podman…) is missing skips
saying which, and the end of the run lists the skipped tests grouped by reason
(``pytest_terminal_summary``), so a green run that skipped the container tests says so.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from upstream import ProxyThread, TestUpstream, proxy_config, service

from proxy.http import engines as http_engine_module
from proxy.pki.build import issue_leaf, make_crl, validity_window
from proxy.pki.store import ensure_ca, load_certificates, write_crl, write_leaf

SERVER_NAMES = ("localhost", "127.0.0.1", "::1", "*.localhost")


@dataclass
class SessionPKI:
    tmp: Path
    ca_dir: Path
    other_ca_dir: Path
    _cas: dict = field(default_factory=dict)
    _leaves: dict = field(default_factory=dict)
    server: tuple[Path, Path] = field(init=False)
    _crls: int = 0

    def __post_init__(self) -> None:
        self._cas = {"main": ensure_ca(self.ca_dir), "other": ensure_ca(self.other_ca_dir, "tlsproxy untrusted CA")}
        self.server = self.leaf("server", *SERVER_NAMES)

    @property
    def ca_pem(self) -> Path:
        return self.ca_dir / "ca.pem"

    @property
    def other_ca_pem(self) -> Path:
        return self.other_ca_dir / "ca.pem"

    @property
    def ca_cert(self) -> x509.Certificate:
        return self._cas["main"][0]

    @property
    def ca_key(self):
        return self._cas["main"][1]

    def leaf(
        self,
        stem: str,
        *names: str,
        client: bool = False,
        cn: str | None = None,
        ou: str | None = None,
        ca: str = "main",
        expired: bool = False,
        not_yet_valid: bool = False,
    ) -> tuple[Path, Path]:
        """(cert_path, key_path) of a leaf from CA ``main`` or ``other``; same arguments, same files."""
        args = (stem, names, client, cn, ou, ca, expired, not_yet_valid)
        if args not in self._leaves:
            ca_cert, ca_key = self._cas[ca]
            not_before, not_after = validity_window(365, expired=expired, not_yet_valid=not_yet_valid)
            cert, key = issue_leaf(
                ca_cert, ca_key, list(names or (stem,)), client=client, cn=cn, ou=ou,
                not_before=not_before, not_after=not_after,
            )
            prefix = self.tmp / "leaves" / f"{stem}-{len(self._leaves)}"
            self._leaves[args] = write_leaf(prefix, cert, key, [ca_cert])
        return self._leaves[args]

    def crl(self, revoked_cert_paths: list[Path]) -> Path:
        """A fresh PEM CRL from the main CA revoking the leaf in each file."""
        serials = [load_certificates(path)[0].serial_number for path in revoked_cert_paths]
        self._crls += 1
        path = self.tmp / "crls" / f"crl-{self._crls}.pem"
        write_crl(path, make_crl(self.ca_cert, self.ca_key, serials))
        return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SessionPKI:
    tmp = tmp_path_factory.mktemp("pki")
    return SessionPKI(tmp=tmp, ca_dir=tmp / "ca", other_ca_dir=tmp / "other-ca")


HTTP_ENGINES = ("h11", "httptools")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_engines: run this test once per HTTP engine (h11, httptools)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_engines") is not None:
        metafunc.parametrize("http_engine", HTTP_ENGINES, indirect=True)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Skipped tests by file and reason: which groups did not run, and what they need."""
    groups: Counter[tuple[str, str]] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        groups[(report.nodeid.split("::")[0], reason.removeprefix("Skipped: "))] += 1
    if not groups:
        return
    terminalreporter.section("skipped groups (install what the reason names to run them)")
    for (module, reason), count in sorted(groups.items()):
        terminalreporter.write_line(f"{count:4d} skipped in {module}: {reason}")


@pytest.fixture(autouse=True)
def http_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The engine behind ``auto`` for this test (proxy tests only; None elsewhere)."""
    name = getattr(request, "param", None)
    if name is not None:
        monkeypatch.setattr(http_engine_module, "forced_engine", name)
        monkeypatch.setenv(http_engine_module.FORCED_ENGINE_ENV, name)
    return name


@pytest.fixture
def shutdown_begun(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once the proxy's ServerState.begin_shutdown has run (SIGTERM's first step)."""
    from proxy.server.state import ServerState

    begun = threading.Event()
    original = ServerState.begin_shutdown

    def begin_shutdown(self: ServerState) -> None:
        original(self)
        begun.set()

    monkeypatch.setattr(ServerState, "begin_shutdown", begin_shutdown)
    return begun


@pytest.fixture
def upstream() -> Iterator[TestUpstream]:
    with TestUpstream() as up:
        yield up


@pytest.fixture
def proxy(pki: SessionPKI, upstream: TestUpstream, tmp_path: Path) -> Iterator[ProxyThread]:
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        yield px
