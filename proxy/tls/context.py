"""Server-side SSLContexts from the config: one place builds them, so a reload can build
a complete new set and swap it in (or keep the old one when this raises ConfigError).

Policy, Mozilla's "intermediate" server profile: TLS 1.2 and 1.3 only, ECDHE + AEAD
ciphers for 1.2 (1.3 suites are all AEAD), key exchange groups X25519, P-256 and P-384
only, no compression, no renegotiation, ALPN ``tls.alpn`` (h2 and http/1.1; a client offering neither gets
the ``no_application_protocol`` alert: ``openssl_ctl.strict_alpn``); the client picks among those
ciphers (Mozilla: server preference off).

Certificates: one SSLContext per configured certificate, each carrying the same client
authentication settings (the SNI callback switches a connection's context, so a lax
context would otherwise undo a strict one). The first certificate is the default, used
for no SNI or an SNI no certificate names; SNI matches SAN DNS names exactly or through
a one-label ``*.`` wildcard. With ``tls.auto`` (or no certificates) a server certificate
for every service host + localhost + 127.0.0.1 + ::1 is issued from ``tls.ca_dir`` into
``ca_dir/auto/`` and reused while it names the same hosts and has > 30 days left
(``proxy.tls.auto_cert``, the part that writes files).

``session_tickets: false`` means no resumption at all: no TLS 1.2 tickets
(OP_NO_TICKET), no TLS 1.3 tickets (``num_tickets = 0``) and no TLS 1.2 session-ID
cache. Python has no API for the last one, nor for the groups list: both are set through
ctypes on the context's own SSL_CTX (``proxy.tls.openssl_ctl``). When that is impossible
the session cache setting is refused rather than left silently resumable, and the groups
fall back to P-256 alone (``set_ecdh_curve``) with a warning.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from proxy.config.model import CertificatePair, ProxyConfig
from proxy.errors import ConfigError, PKIError
from proxy.pki import store
from proxy.tls import openssl_ctl
from proxy.tls.auto_cert import AUTO_RENEW_BEFORE, auto_certificate_names, ensure_auto_certificate
from proxy.tls.crl import load_client_crls
from proxy.tls.loading import (
    client_verify_mode,
    load_cert_chain,
    load_matching_key,
    load_pem_certificates,
    server_names,
)

INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# Mozilla "intermediate": OpenSSL's default list adds X448, P-521 and the FFDHE groups.
GROUPS = ("X25519", "P-256", "P-384")
# Without libssl through ctypes, Python can set one curve: the one every client has.
FALLBACK_CURVE = "prime256v1"
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# Set by the SNI callback on the connection's SSLObject: an attribute (not a table in
# ServerTLS) so it outlives a context swap on reload and needs no cleanup.
_SNI_ATTRIBUTE = "_tlsproxy_server_name"

log = logging.getLogger("tlsproxy")


@dataclass(frozen=True)
class LoadedCertificate:
    """A server certificate in use: where it came from and what it covers."""

    path: Path
    key_path: Path
    names: tuple[str, ...]  # SAN DNS names and IP addresses (the CN when there are none)
    not_after: dt.datetime
    auto: bool = False


class ServerTLS:
    """The server contexts for one config; immutable once built, replaced on reload."""

    def __init__(
        self,
        context: ssl.SSLContext,
        certificates: list[LoadedCertificate],
        client_cas: list[x509.Certificate],
        by_name: dict[str, ssl.SSLContext],
        by_parent: dict[str, ssl.SSLContext],
        files: tuple[Path, ...],
        client_crls: tuple[x509.CertificateRevocationList, ...] = (),
    ) -> None:
        self.context = context
        self.certificates = certificates
        self.client_cas = client_cas
        self.client_crls = client_crls  # client_auth.crl as verified (one per CA at most)
        self.files = files  # every file read: a reload source watches these
        self._by_name = by_name
        self._by_parent = by_parent
        context.sni_callback = self._on_server_name

    @property
    def renewal_due(self) -> dt.datetime | None:
        """When the first auto-issued certificate enters its renewal window; building
        from the config again after that re-issues it in place. None without auto certs."""
        due = [loaded.not_after - AUTO_RENEW_BEFORE for loaded in self.certificates if loaded.auto]
        return min(due) if due else None

    @classmethod
    def from_config(cls, config: ProxyConfig) -> ServerTLS:
        """Build every context; ConfigError naming the key and file on any failure."""
        return _Builder(config).build()

    @staticmethod
    def server_name(ssl_object: object) -> str | None:
        """The SNI this connection's client sent (lowercase), or None."""
        return getattr(ssl_object, _SNI_ATTRIBUTE, None)

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context whose certificate covers SERVER_NAME, else the default."""
        if server_name:
            selected = self._by_name.get(server_name)
            if selected is None:
                selected = self._by_parent.get(server_name.partition(".")[2])
            if selected is not None:
                return selected
        return self.context

    def _on_server_name(self, ssl_object, server_name: str | None, _context) -> None:
        if server_name is None:
            return
        server_name = server_name.lower().rstrip(".")
        setattr(ssl_object, _SNI_ATTRIBUTE, server_name)
        selected = self.context_for(server_name)
        if selected is not self.context:
            ssl_object.context = selected


class _Builder:
    """Carries the config and what was read while ``ServerTLS.from_config`` runs."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.source = str(config.source) if config.source is not None else "<command line>"
        self.files: list[Path] = []
        self.client_crls: list[x509.CertificateRevocationList] = []
        self.groups_fallback_logged = False

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.config.line_of(key), key, reason)

    def build(self) -> ServerTLS:
        tls = self.config.tls
        pairs = [(f"tls.certificates[{index}]", pair, False) for index, pair in enumerate(tls.certificates)]
        if tls.auto or not tls.certificates:
            pairs.append(("tls.ca_dir", self.auto_certificate(), True))
        client_cas = self.load_client_cas()

        contexts: list[ssl.SSLContext] = []
        certificates: list[LoadedCertificate] = []
        for key, pair, auto in pairs:
            loaded = self.check_pair(key, pair, auto)
            contexts.append(self.new_context(key, pair))
            certificates.append(loaded)

        by_name: dict[str, ssl.SSLContext] = {}
        by_parent: dict[str, ssl.SSLContext] = {}
        for loaded, context in zip(certificates, contexts):
            for name in loaded.names:
                name = name.lower()
                if name.startswith("*."):
                    by_parent.setdefault(name[2:], context)
                else:
                    by_name.setdefault(name, context)
        return ServerTLS(
            contexts[0], certificates, client_cas, by_name, by_parent, tuple(dict.fromkeys(self.files)),
            tuple(self.client_crls),
        )

    # --- one context ---------------------------------------------------------------

    def new_context(self, key: str, pair: CertificatePair) -> ssl.SSLContext:
        tls = self.config.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = MIN_VERSIONS[tls.min_version]
        context.set_ciphers(INTERMEDIATE_CIPHERS)
        self.set_groups(context)
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        # Python turns server preference on; Mozilla turns it off: every cipher left is
        # strong, and clients without AES hardware rightly prefer ChaCha20.
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        context.set_alpn_protocols(list(tls.alpn))  # (the fallback if strict_alpn cannot be set)
        openssl_ctl.strict_alpn(context, tls.alpn)
        if not tls.session_tickets:
            context.options |= ssl.OP_NO_TICKET
            context.num_tickets = 0
            if not openssl_ctl.disable_session_cache(context):
                raise self.error(
                    "tls.session_tickets",
                    "false needs OpenSSL's session cache switched off, which this Python build does not allow",
                )
        try:
            load_cert_chain(context, pair)
        except PKIError as exc:
            raise self.error(f"{key}.cert", str(exc)) from None
        self.apply_client_auth(context)
        return context

    def set_groups(self, context: ssl.SSLContext) -> None:
        if openssl_ctl.set_groups(context, GROUPS):
            return
        context.set_ecdh_curve(FALLBACK_CURVE)
        if not self.groups_fallback_logged:
            self.groups_fallback_logged = True
            log.warning(
                "TLS key exchange: OpenSSL's groups list cannot be set from this Python (libssl not "
                "reachable through ctypes); offering P-256 only instead of %s",
                ", ".join(GROUPS),
            )

    def apply_client_auth(self, context: ssl.SSLContext) -> None:
        settings = self.config.client_auth
        context.verify_mode = self.verify_mode()
        if context.verify_mode == ssl.CERT_NONE:
            return
        try:
            context.load_verify_locations(cafile=settings.ca)
        except (ssl.SSLError, OSError) as exc:
            raise self.error("client_auth.ca", f"{settings.ca}: not a usable CA bundle ({exc})") from None
        if settings.crl is not None:
            try:
                context.load_verify_locations(cafile=settings.crl)
            except (ssl.SSLError, OSError) as exc:
                raise self.error("client_auth.crl", f"{settings.crl}: not a usable PEM CRL ({exc})") from None
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

    def verify_mode(self) -> ssl.VerifyMode:
        return client_verify_mode(self.config.client_auth, self.config.services)

    # --- files ---------------------------------------------------------------------

    def check_pair(self, key: str, pair: CertificatePair, auto: bool) -> LoadedCertificate:
        """Read the pair as ``tlsproxy check`` does (``proxy.tls.loading``) before OpenSSL
        does, so errors say which file and why."""
        self.files += [pair.cert, pair.key]
        try:
            certs = load_pem_certificates(pair.cert)
        except PKIError as exc:
            raise self.error(f"{key}.cert", str(exc)) from None
        try:
            load_matching_key(pair, certs[0])
        except PKIError as exc:
            raise self.error(f"{key}.key", str(exc)) from None
        return LoadedCertificate(pair.cert, pair.key, server_names(certs[0]), certs[0].not_valid_after_utc, auto)

    def load_client_cas(self) -> list[x509.Certificate]:
        settings = self.config.client_auth
        if settings.ca is None:
            if self.verify_mode() != ssl.CERT_NONE:
                raise self.error("client_auth.ca", "needed to verify client certificates")
            return []
        self.files.append(settings.ca)
        try:
            cas = load_pem_certificates(settings.ca)
        except PKIError as exc:
            raise self.error("client_auth.ca", str(exc)) from None
        if settings.crl is not None:
            self.check_crl(settings.crl, cas)
        return cas

    def check_crl(self, path: Path, cas: list[x509.Certificate]) -> None:
        """The CRL verdict ``tlsproxy check`` gives too (``proxy.tls.crl``); the CRLs
        are kept for re-checking open connections' certificates after a reload."""
        self.files.append(path)
        try:
            self.client_crls = load_client_crls(path, cas)
        except PKIError as exc:
            raise self.error("client_auth.crl", str(exc)) from None

    def auto_certificate(self) -> CertificatePair:
        """The auto-issued server certificate (``proxy.tls.auto_cert``)."""
        ca_dir = self.config.tls.ca_dir
        names = auto_certificate_names(host for service in self.config.services for host in service.hosts)
        try:
            pair = ensure_auto_certificate(ca_dir, names)
        except PKIError as exc:
            raise self.error("tls.ca_dir", f"automatic certificate in {ca_dir}: {exc}") from None
        self.files.append(Path(ca_dir) / store.CA_CERT_FILE)
        return pair
