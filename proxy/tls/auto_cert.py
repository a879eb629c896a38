"""The automatic server certificate (``tls.auto``, or no certificates): issued from the
CA in ``tls.ca_dir`` for every service host + localhost + 127.0.0.1 + ::1 into
``ca_dir/auto/server.pem`` (+ ``.key``), and reused while it names the same hosts, comes
from that CA, matches its key and has more than 30 days left.

This is the file-writing half of context building: ``proxy.tls.context`` asks for the
pair and loads it like any configured certificate. Issuance is the toolkit's pure
``issue_leaf``; writing goes through ``proxy.pki.store`` (atomic, 0600 key) under the CA
directory's lock, so workers starting (or renewing) together issue one certificate and
nobody reads a key from one issuance beside a certificate from another.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from proxy.config.model import CertificatePair
from proxy.errors import PKIError
from proxy.pki import store
from proxy.pki.build import issue_leaf, keys_match
from proxy.pki.names import parse_names

AUTO_DIR = "auto"
AUTO_STEM = "server"
AUTO_LOCK = ".auto.lock"
AUTO_RENEW_BEFORE = dt.timedelta(days=30)
AUTO_DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


def auto_certificate_names(service_hosts: Iterable[str]) -> list[str]:
    """localhost, 127.0.0.1, ::1, then each service host once, in config order."""
    names = list(AUTO_DEFAULT_NAMES)
    names += [host for host in dict.fromkeys(service_hosts) if host not in names]
    return names


def ensure_auto_certificate(ca_dir: Path, names: list[str]) -> CertificatePair:
    """The auto certificate's files, reused or (re-)issued under the CA lock; the CA is
    created when missing. PKIError when the CA or the files cannot be used."""
    ca_cert, ca_key = store.ensure_ca(ca_dir)
    prefix = Path(ca_dir) / AUTO_DIR / AUTO_STEM
    pair = CertificatePair(store.suffixed(prefix, ".pem"), store.suffixed(prefix, ".key"))
    wanted = set(parse_names(names))
    with store.locked(Path(ca_dir) / AUTO_LOCK):
        if not _reusable(pair, ca_cert, wanted):
            cert, key = issue_leaf(ca_cert, ca_key, names)
            store.write_leaf(prefix, cert, key, [ca_cert], force=True)
    return pair


def _reusable(pair: CertificatePair, ca_cert: x509.Certificate, wanted: set[x509.GeneralName]) -> bool:
    """Whether an existing auto certificate names exactly WANTED, comes from this CA,
    matches its key and stays valid for more than AUTO_RENEW_BEFORE."""
    if not (pair.cert.exists() and pair.key.exists()):
        return False
    try:
        cert = store.load_certificates(pair.cert)[0]
        key = store.load_private_key(pair.key)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(ca_cert)
    except (PKIError, x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError):
        return False
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    return set(sans) == wanted and left > AUTO_RENEW_BEFORE and keys_match(cert, key)
