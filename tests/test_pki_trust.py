"""Trust instructions (pure text) and installing into a system store (a temp folder here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import PKIError
from proxy.pki import trust
from proxy.pki.store import load_certificates


def temp_store(tmp_path: Path, command: tuple[str, ...]) -> trust.SystemStore:
    return trust.SystemStore("test", tmp_path / "anchors", command, tmp_path / "bundle.crt")


def test_instructions_use_absolute_paths_and_never_disable_verification(pki) -> None:
    text = trust.trust_instructions(pki.ca_pem, pki.ca_cert)
    path = str(pki.ca_pem.absolute())
    assert f"export SSL_CERT_FILE={path} REQUESTS_CA_BUNDLE={path} CURL_CA_BUNDLE={path} NODE_EXTRA_CA_CERTS={path}" in text
    assert f"curl --cacert {path}" in text and f"verify={path!r}" in text and "cafile=" in text
    assert pki.ca_cert.subject.rfc4514_string() in text
    assert "verify=False" not in text and "--insecure" not in text


def test_install_copies_the_ca_and_runs_the_update_tool(pki, tmp_path: Path) -> None:
    store = temp_store(tmp_path, ("true",))
    target = trust.install_ca(pki.ca_pem, store)
    assert target.parent == store.anchors and target.suffix == ".crt"
    assert target.name.startswith("tlsproxy-tlsproxy-local-ca-")
    assert load_certificates(target) == [pki.ca_cert]
    assert trust.install_ca(pki.ca_pem, store) == target  # idempotent: same CA, same file


def test_install_reports_a_failing_update_tool(pki, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="exited 1"):
        trust.install_ca(pki.ca_pem, temp_store(tmp_path, ("false",)))


def test_install_refuses_a_leaf(pki, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="not a CA"):
        trust.install_ca(pki.server[0], temp_store(tmp_path, ("true",)))


def test_no_store_tool_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust.shutil, "which", lambda name: None)
    with pytest.raises(PKIError, match="ca-certificates"):
        trust.find_system_store()


def test_debian_store_is_found_here_when_tool_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust.shutil, "which", lambda name: f"/usr/sbin/{name}")
    store = trust.find_system_store()
    assert store.anchors == Path("/usr/local/share/ca-certificates")
    assert store.update_command == ("update-ca-certificates",)
