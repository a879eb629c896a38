"""`check --client-cert F --url URL`: routing, handshake verification and authorization."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.check.dry_run import explain_access, split_url
from proxy.config.load import load_config
from proxy.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


def write_config(folder: Path, pki, *, mode: str = "optional", crl: Path | None = None) -> Path:
    path = folder / "proxy.yaml"
    crl_line = f"\n{' ' * 14}crl: {crl}" if crl else ""  # indented like the f-string below
    path.write_text(
        textwrap.dedent(
            f"""\
            client_auth:
              mode: {mode}
              ca: {pki.ca_pem}{crl_line}
            services:
              - name: api
                hosts: [api.localhost]
                path_prefix: /api
                upstream: http://127.0.0.1:9000
                client_auth: {{require: true, allow: [{{cn: alice}}]}}
              - name: public
                hosts: [www.localhost]
                upstream: http://127.0.0.1:9001
            """
        ),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def config(pki, tmp_path: Path):
    return load_config(write_config(tmp_path, pki), {})


def alice(pki, **kwargs) -> Path:
    return pki.leaf("alice", "alice.example", client=True, cn="alice", **kwargs)[0]


def test_listed_certificate_is_admitted(pki, config) -> None:
    verdict = explain_access(config, alice(pki), "https://api.localhost:8443/api/v1?x=1")
    assert verdict.admitted
    assert verdict.lines[0] == "https://api.localhost:8443/api/v1?x=1 -> service 'api' (http://127.0.0.1:9000)"
    assert verdict.lines[1] == "handshake: CN=alice verifies against client_auth.ca"
    assert verdict.lines[-1].startswith("admitted: certificate CN=alice is allowed for service 'api'")


def test_unlisted_certificate_is_refused(pki, config) -> None:
    bob = pki.leaf("bob", "bob.example", client=True, cn="bob")[0]
    verdict = explain_access(config, bob, "https://api.localhost/api")
    assert not verdict.admitted
    assert verdict.lines[-1] == "refused: certificate CN=bob is not allowed for service 'api'"


def test_any_verified_certificate_reaches_a_service_without_policy(pki, config) -> None:
    bob = pki.leaf("bob", "bob.example", client=True, cn="bob")[0]
    assert explain_access(config, bob, "https://www.localhost/").admitted


@pytest.mark.parametrize(
    ("make_cert", "reason"),
    [
        (lambda pki: pki.leaf("stranger", "s.example", client=True, ca="other")[0], "unknown issuer"),
        (lambda pki: alice(pki, expired=True), "expired"),
        (lambda pki: pki.server[0], "wrong EKU"),
    ],
)
def test_certificate_refused_at_the_handshake(pki, config, make_cert, reason: str) -> None:
    verdict = explain_access(config, make_cert(pki), "https://www.localhost/")
    assert not verdict.admitted
    assert verdict.lines[-1].startswith(f"refused: the TLS handshake fails: {reason}")


def test_revoked_certificate(pki, tmp_path: Path) -> None:
    revoked = pki.leaf("revoked-alice", "alice.example", client=True, cn="alice")[0]
    config = load_config(write_config(tmp_path, pki, crl=pki.crl([revoked])), {})
    verdict = explain_access(config, revoked, "https://api.localhost/api")
    assert verdict.lines[-1].startswith("refused: the TLS handshake fails: revoked")


def test_no_service_matches(pki, config) -> None:
    verdict = explain_access(config, alice(pki), "https://nowhere.localhost/x")
    assert verdict == type(verdict)(False, ("refused: no service matches host 'nowhere.localhost' and path '/x' (404)",))


def test_certificate_not_asked_for(pki, tmp_path: Path) -> None:
    (tmp_path / "proxy.yaml").write_text("services:\n  - {name: web, upstream: http://127.0.0.1:9000}\n")
    config = load_config(tmp_path / "proxy.yaml", {})
    stranger = pki.leaf("stranger", "s.example", client=True, ca="other")[0]
    verdict = explain_access(config, stranger, "https://anything/")
    assert verdict.admitted
    assert verdict.lines[1] == "handshake: no client certificate is asked for, so none is sent"


@pytest.mark.parametrize(
    ("url", "expected"),
    [("https://api.localhost/v1", ("api.localhost", "/v1")), ("https://u@h:1", ("h:1", "/")), ("HTTPS://h/?q", ("h", "/?q"))],
)
def test_split_url(url: str, expected: tuple[str, str]) -> None:
    assert split_url(url) == expected


@pytest.mark.parametrize("url", ["http://api.localhost/", "api.localhost/v1", "https:///x"])
def test_split_url_refused(url: str) -> None:
    with pytest.raises(UsageError, match="is not an https:// URL"):
        split_url(url)


@pytest.mark.parametrize(("who", "code"), [("alice", 0), ("bob", 1)])
def test_dry_run_command_exit_codes(pki, tmp_path: Path, who: str, code: int) -> None:
    write_config(tmp_path, pki)
    cert = pki.leaf(who, f"{who}.example", client=True, cn=who)[0]
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", "proxy.yaml", "--client-cert", str(cert),
         "--url", "https://api.localhost/api/v1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == code, result.stderr
    assert "config OK" in result.stdout
    assert ("admitted: " if code == 0 else "refused: ") in result.stdout
