"""The file checks behind ``tlsproxy check``: the certificate, key, CA and CRL files a
loaded config names, opened and judged the way the TLS layer will need them.

``load_config`` validates the YAML only; this module answers "will these files work?"
before ``serve`` finds out, with the functions serve itself uses (``proxy.tls.loading``:
readable, PEM, the key belongs to the certificate, OpenSSL loads the pair;
``proxy.tls.crl``: the CRL verdict), so check never passes what serve refuses. It adds
what serve does not refuse but a client would: the chain is in order (each certificate
issued by the next), nothing expired, every service host covered. Each problem is a
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
from cryptography.exceptions import InvalidSignature

from proxy.config.model import CertificatePair, ProxyConfig
from proxy.errors import ConfigError, PKIError
from proxy.tls.crl import load_client_crls
from proxy.tls.loading import load_cert_chain, load_matching_key, load_pem_certificates, server_names

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
    for index, service in enumerate(config.services):
        settings = service.upstream_tls
        if settings is None:
            continue
        key = f"services[{index}].upstream_tls"
        if settings.ca is not None:
            checker.ca_bundle(f"{key}.ca", settings.ca)
        if settings.cert is not None and settings.key is not None:
            checker.certificate_pair(key, CertificatePair(settings.cert, settings.key), server=False)
    return checker.report


def _covered(host: str, names: set[str]) -> bool:
    """Whether a certificate name matches HOST: exactly, or a ``*.`` one label up."""
    return host in names or (not host.startswith("*.") and f"*.{host.partition('.')[2]}" in names)


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


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

    def certificate_pair(self, key: str, pair: CertificatePair, *, server: bool = True) -> None:
        """A server certificate (``server``), or a client one presented upstream."""
        try:
            chain = load_pem_certificates(pair.cert)
        except PKIError as exc:
            self._add("error", f"{key}.cert", str(exc))
            return
        leaf = chain[0]
        if server:  # the summary and the host coverage are about server certificates
            self.report.certificates.append(
                CertificateInfo(pair.cert, server_names(leaf), leaf.not_valid_after_utc, self._days_left(leaf))
            )
        self._chain_order(f"{key}.cert", pair.cert, chain)
        self._validity(f"{key}.cert", pair.cert, chain)
        try:
            load_matching_key(pair, leaf)
        except PKIError as exc:
            self._add("error", f"{key}.key", str(exc))
            return
        try:
            load_cert_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT), pair)
        except PKIError as exc:
            self._add("error", f"{key}.cert", str(exc))

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
            cas = load_pem_certificates(path)
        except PKIError as exc:
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
