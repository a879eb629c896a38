"""The one verdict on a ``client_auth.crl`` file, for ``serve`` (context building) and
``tlsproxy check`` alike, so check never passes a CRL that serve then refuses.

OpenSSL loads the file with ``load_verify_locations(cafile=...)``: every PEM block in it,
certificates included. A CRL that OpenSSL cannot use for the clients' issuer does not
fail at start; it turns into "refuse every client certificate" at the first handshake.
So the file is refused when:

- it is not PEM (a DER CRL is named as such: TLS reads PEM only);
- it holds anything but ``X509 CRL`` blocks (a certificate there would be trusted as a
  client CA);
- a CRL in it is not signed by a CA in ``client_auth.ca`` (no CRL then exists for the
  clients' issuer), or by one whose key usage lacks cRLSign;
- a CRL in it is past its nextUpdate or before its thisUpdate (OpenSSL: "CRL has
  expired" / "CRL is not yet valid" for every client).

Several CRLs in one file (one per CA of a multi-CA bundle) are fine; each is judged.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from proxy.errors import PKIError
from proxy.pki import store

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_CRL_LABEL = b"X509 CRL"


def load_client_crls(
    path: Path, cas: Sequence[x509.Certificate], *, now: dt.datetime | None = None
) -> list[x509.CertificateRevocationList]:
    """The CRLs in PATH as the handshake will use them, or PKIError saying why not.

    ``cas`` are the certificates of ``client_auth.ca``; when empty (that bundle could
    not be read, which is reported on its own) the signer checks are skipped.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    data = store.read_bytes(path)
    crls = _parse(path, data)
    for crl in crls:
        if cas:
            _check_signer(path, crl, cas)
        _check_validity(path, crl, now)
    return crls


def crl_for(
    crls: Sequence[x509.CertificateRevocationList], leaf: x509.Certificate
) -> x509.CertificateRevocationList | None:
    """The CRL that speaks for ``leaf`` (its issuer's; else the first, as OpenSSL would
    find none and ``verify_certificate`` then names the mismatch), or None without CRLs."""
    return next((crl for crl in crls if crl.issuer == leaf.issuer), crls[0] if crls else None)


def _parse(path: Path, data: bytes) -> list[x509.CertificateRevocationList]:
    blocks = _PEM_BLOCK.findall(data)
    if not blocks:
        if _is_der_crl(data):
            raise PKIError(f"{path}: is a DER CRL; TLS reads PEM only (openssl crl -inform DER -in FILE -out FILE.pem)")
        raise PKIError(f"{path}: holds no PEM CRL (BEGIN X509 CRL block; TLS needs PEM)")
    others = sorted({label.decode("ascii") for label, _ in blocks if label != _CRL_LABEL})
    if others:
        raise PKIError(
            f"{path}: holds {', '.join(others)} besides X509 CRL blocks; OpenSSL would load them too "
            "(a certificate there becomes a trusted client CA): keep only CRLs in this file"
        )
    crls = []
    for number, (label, body) in enumerate(blocks, start=1):
        try:
            crls.append(x509.load_der_x509_crl(base64.b64decode(b"".join(body.split()), validate=True)))
        except (ValueError, binascii.Error):
            raise PKIError(f"{path}: CRL block {number} is not a valid X509 CRL") from None
    return crls


def _is_der_crl(data: bytes) -> bool:
    try:
        x509.load_der_x509_crl(data)
    except ValueError:
        return False
    return True


def _check_signer(path: Path, crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]) -> None:
    signer = next((ca for ca in cas if _signed_by(crl, ca)), None)
    if signer is None:
        raise PKIError(
            f"{path} is not signed by a CA in client_auth.ca (issuer {crl.issuer.rfc4514_string()}): "
            "OpenSSL would find no CRL for the clients' issuer and refuse every client certificate"
        )
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.crl_sign:
        raise PKIError(
            f"{path} is signed by {signer.subject.rfc4514_string()}, whose key usage lacks cRLSign: "
            "OpenSSL would refuse every client certificate"
        )


def _check_validity(path: Path, crl: x509.CertificateRevocationList, now: dt.datetime) -> None:
    next_update = crl.next_update_utc
    if next_update is not None and next_update < now:
        raise PKIError(
            f"{path} expired on {next_update:%Y-%m-%d %H:%M} UTC (nextUpdate): every client "
            "certificate would be refused until a fresh CRL is published"
        )
    if crl.last_update_utc > now:
        raise PKIError(
            f"{path} is not valid before {crl.last_update_utc:%Y-%m-%d %H:%M} UTC (thisUpdate): every "
            "client certificate would be refused until then"
        )


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
