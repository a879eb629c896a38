"""describe(): the inspect fields, computed at a given time (no files needed)."""

from __future__ import annotations

import datetime as dt

from proxy.pki.build import issue_leaf, validity_window
from proxy.pki.inspect import JSON_KEYS, describe, inspect_file, render_text


def test_describe_has_exactly_the_spec_keys(pki) -> None:
    cert, _ = issue_leaf(pki.ca_cert, pki.ca_key, ["api.localhost", "10.1.2.3"], key_type="rsa2048")
    info = describe(cert, file="api.pem")
    assert tuple(info) == JSON_KEYS
    assert info["sans"] == ["DNS:api.localhost", "IP:10.1.2.3"] and info["key_type"] == "RSA 2048"
    assert info["serial"] == format(cert.serial_number, "x") and info["eku"] == ["serverAuth"]
    assert info["not_before"].endswith("Z") and info["issuer"] == pki.ca_cert.subject.rfc4514_string()


def test_days_left_and_text_notes(pki) -> None:
    nb, na = validity_window(10, expired=True)
    cert, _ = issue_leaf(pki.ca_cert, pki.ca_key, ["old.test"], not_before=nb, not_after=na)
    info = describe(cert)
    assert info["days_left"] == -1  # expired a day (and a few seconds) ago
    assert "EXPIRED 1 day ago" in render_text(info, index=1, total=1)
    nb, na = validity_window(10, not_yet_valid=True)
    future, _ = issue_leaf(pki.ca_cert, pki.ca_key, ["new.test"], not_before=nb, not_after=na)
    assert "NOT YET VALID" in render_text(describe(future), index=1, total=1)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=100)
    assert describe(cert, now=later)["days_left"] < -100


def test_inspect_file_reports_key_match_beside(pki) -> None:
    cert_path, _ = pki.server
    leaf, ca = inspect_file(cert_path)
    assert leaf["key_matches"] is True and "key_matches" not in ca
    assert ca["is_ca"] is True and ca["subject"] == leaf["issuer"]
