"""The file checks behind ``tlsproxy check``: the certificate, key, CA and CRL files a
loaded config names, opened and judged the way the TLS layer will need them.

``load_config`` validates the YAML only; this module answers "will these files work?"
before ``serve`` finds out: readable, PEM, the key belongs to the certificate, the chain
is in order (each certificate issued by the next), nothing expired. Each problem is a
``Finding`` pointing at the config key that named the file, in the same
``FILE:LINE: key: reason`` form as config errors.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy.config.model import CertificatePair, ProxyConfig
from proxy.errors import ConfigError, PKIError
from proxy.pki import store
from proxy.pki.build import keys_match
from proxy.tls.crl import load_client_crls

EXPIRY_WARNING_DAYS = 14


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    message: str  # FILE:LINE: key: reason


@dataclass(frozen=True)
class CertificateInfo:
    """One server certificate for the summary."""

    file: Path
    names: tuple[str, ...]
    not_after: datetime
    days_left: int


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    certificates: list[CertificateInfo] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


class _Problem(Exception):
    """A file check failed; the message is the reason (internal to this module)."""


def check_files(
    config: ProxyConfig, lines: Mapping[str, int], file: str, *, now: datetime | None = None
) -> CheckReport:
    """Open and judge every file the config names; never raises for a bad file."""
    checker = _Checker(lines, file, now or datetime.now(timezone.utc))
    for index, pair in enumerate(config.tls.certificates):
        checker.certificate_pair(f"tls.certificates[{index}]", pair)
    if config.tls.auto:
        ca_pem = config.tls.ca_dir / "ca.pem"
        if ca_pem.exists():
            checker.ca_bundle("tls.ca_dir", ca_pem)
    else:
        checker.host_coverage(config)
    if config.client_auth.ca is not None:
        cas = checker.ca_bundle("client_auth.ca", config.client_auth.ca)
        if config.client_auth.crl is not None:
            checker.crl("client_auth.crl", config.client_auth.crl, cas)
    return checker.report


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS and IP SANs, else the CN: what SNI will match the certificate against."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(names)


def _covered(host: str, names: set[str]) -> bool:
    """Whether a certificate name matches HOST: exactly, or a ``*.`` one label up."""
    return host in names or (not host.startswith("*.") and f"*.{host.partition('.')[2]}" in names)


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _read(path: Path) -> bytes:
    try:
        return store.read_bytes(path)
    except PKIError as exc:
        raise _Problem(str(exc)) from None


def _load_certificates(path: Path) -> list[x509.Certificate]:
    """PEM only: that is what the TLS layer (``ssl.load_cert_chain``) accepts."""
    try:
        return x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise _Problem(f"{path}: holds no PEM certificate (BEGIN CERTIFICATE block)") from None


def _usable_by_ssl(pair: CertificatePair) -> None:
    """The server's own loader has the last word (key formats, curves, PEM quirks)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(pair.cert, pair.key)
    except (ssl.SSLError, OSError) as exc:
        raise _Problem(f"{pair.cert} with key {pair.key}: cannot be used by TLS ({exc})") from None


class _Checker:
    def __init__(self, lines: Mapping[str, int], file: str, now: datetime) -> None:
        self._lines = lines
        self._file = file
        self._now = now
        self.report = CheckReport()

    def _add(self, severity: str, key: str, reason: str) -> None:
        # The line of the key itself, else of the nearest enclosing key that was written.
        line, parent = None, key
        while parent and line is None:
            line = self._lines.get(parent)
            parent = parent.rpartition(".")[0] if "." in parent else ""
        message = str(ConfigError(self._file, line, key, reason))
        self.report.findings.append(Finding(severity, message))

    def certificate_pair(self, key: str, pair: CertificatePair) -> None:
        try:
            chain = _load_certificates(pair.cert)
        except _Problem as exc:
            self._add("error", f"{key}.cert", str(exc))
            return
        leaf = chain[0]
        self.report.certificates.append(
            CertificateInfo(pair.cert, certificate_names(leaf), leaf.not_valid_after_utc, self._days_left(leaf))
        )
        self._chain_order(f"{key}.cert", pair.cert, chain)
        self._validity(f"{key}.cert", pair.cert, chain)
        try:
            self._key_matches(pair, leaf)
        except _Problem as exc:
            self._add("error", f"{key}.key", str(exc))
            return
        try:
            _usable_by_ssl(pair)
        except _Problem as exc:
            self._add("error", f"{key}.cert", str(exc))

    def _key_matches(self, pair: CertificatePair, leaf: x509.Certificate) -> None:
        try:
            private_key = serialization.load_pem_private_key(_read(pair.key), password=None)
        except TypeError:
            raise _Problem(f"{pair.key}: the private key is encrypted (give an unencrypted key)") from None
        except (ValueError, UnsupportedAlgorithm):
            raise _Problem(f"{pair.key}: holds no PEM private key") from None
        if not keys_match(leaf, private_key):  # type: ignore[arg-type]
            raise _Problem(f"{pair.key} is not the private key of {pair.cert}")

    def _chain_order(self, key: str, path: Path, chain: Sequence[x509.Certificate]) -> None:
        """Each certificate must be issued by the next one: TLS sends them in file order."""
        for number, (cert, issuer) in enumerate(pairwise(chain), start=1):
            try:
                cert.verify_directly_issued_by(issuer)
            except ValueError:
                self._add(
                    "error",
                    key,
                    f"{path}: certificate {number} ({_describe(cert)}) is not issued by certificate "
                    f"{number + 1} ({_describe(issuer)}); put the leaf first, then each issuer in turn",
                )
                return
            except InvalidSignature:
                self._add(
                    "error",
                    key,
                    f"{path}: the signature on certificate {number} ({_describe(cert)}) does not "
                    f"verify with the key of certificate {number + 1}",
                )
                return
            except TypeError:
                continue  # a key type cryptography cannot check here; the name check is all we have

    def _days_left(self, cert: x509.Certificate) -> int:
        return (cert.not_valid_after_utc - self._now).days

    def _validity(self, key: str, path: Path, certs: Sequence[x509.Certificate]) -> None:
        for number, cert in enumerate(certs, start=1):
            which = f"{path}: certificate {number} ({_describe(cert)})" if len(certs) > 1 else str(path)
            after = cert.not_valid_after_utc
            if after < self._now:
                self._add("error", key, f"{which} expired on {after:%Y-%m-%d %H:%M} UTC")
            elif cert.not_valid_before_utc > self._now:
                self._add("error", key, f"{which} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
            elif self._days_left(cert) < EXPIRY_WARNING_DAYS:
                self._add("warning", key, f"{which} expires in {self._days_left(cert)} days ({after:%Y-%m-%d})")

    def host_coverage(self, config: ProxyConfig) -> None:
        """Every service host should be named by some certificate, or SNI falls back to
        the first certificate and clients see a name mismatch (a warning: a client
        might connect by another name)."""
        names = {name.lower() for info in self.report.certificates for name in info.names}
        for index, service in enumerate(config.services):
            for position, host in enumerate(service.hosts):
                if not _covered(host, names):
                    self._add(
                        "warning",
                        f"services[{index}].hosts[{position}]",
                        f"no certificate in tls.certificates names '{host}'; "
                        "clients would get the default certificate and a name mismatch",
                    )

    def ca_bundle(self, key: str, path: Path) -> list[x509.Certificate]:
        try:
            cas = _load_certificates(path)
        except _Problem as exc:
            self._add("error", key, str(exc))
            return []
        self._validity(key, path, cas)
        return cas

    def crl(self, key: str, path: Path, cas: Sequence[x509.Certificate]) -> None:
        """The verdict serve gives at start (``proxy.tls.crl``), not a second opinion."""
        try:
            load_client_crls(path, cas, now=self._now)
        except PKIError as exc:
            self._add("error", key, str(exc))
