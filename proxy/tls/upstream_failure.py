"""A failed TLS connection to an ``https://`` upstream -> the reason in words.

The 502 body and the log line name the service and say why, in the terms a user acts
on: the upstream's certificate expired, is not yet valid, is not issued by a CA we
trust (unknown issuer, self-signed), does not name the server name we verify (name
mismatch); or the upstream refused *us*: it requires a client certificate and none is
configured, or it rejected the one we presented. OpenSSL reports the first group as
``ssl.SSLCertVerificationError`` (``verify_code`` from X509_V_ERR_*) during the
handshake, the second as an alert the upstream sent (``ssl.SSLError.reason``
``TLSV13_ALERT_CERTIFICATE_REQUIRED``, ``SSLV3_ALERT_BAD_CERTIFICATE``...): in TLS 1.2
during the handshake, in TLS 1.3 only on the first read after it (the client's side of
the handshake is done before the server has judged its certificate) — so the relay
asks this module too when an https:// upstream closes without answering.
(``proxy.tls.handshake`` is the server-side counterpart, about clients' certificates.)
"""

from __future__ import annotations

import ssl

from proxy.tls.upstream_context import UpstreamTLS

__all__ = ["describe_upstream_tls_failure"]

_UNKNOWN_ISSUER = "is not issued by a CA in {trust} (unknown issuer)"

# OpenSSL X509_V_ERR_* codes -> words about the upstream's certificate.
_VERIFY_CODES: dict[int, str] = {
    2: _UNKNOWN_ISSUER,
    20: _UNKNOWN_ISSUER,
    21: _UNKNOWN_ISSUER,
    18: "is self-signed and not in {trust} (unknown issuer)",
    19: "chains to a self-signed CA that is not in {trust} (unknown issuer)",
    9: "is not yet valid",
    10: "has expired",
    26: "is not for server authentication (EKU)",
    23: "is revoked",
    62: "does not name {name!r} (hostname mismatch)",
    64: "does not name the IP address {name} (name mismatch)",
}

# Alerts an upstream sends about the client certificate we presented.
_REJECTED_OURS = frozenset(
    {"UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED",
     "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED", "DECRYPT_ERROR"}
)
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})


def describe_upstream_tls_failure(exc: BaseException, tls: UpstreamTLS, server_name: str) -> str | None:
    """Why a TLS connection to an upstream failed, in words; None when ``exc`` is not a
    TLS failure (a refused TCP connect, a timeout: the caller words those)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        words = _VERIFY_CODES.get(exc.verify_code)
        if words is None:
            return f"its certificate was refused: {exc.verify_message or exc}"
        return "its certificate " + words.format(trust=tls.trust, name=server_name)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "it closed the connection during the TLS handshake"
    if not isinstance(exc, ssl.SSLError):
        return None
    reason = exc.reason or ""
    for prefix in ("TLSV13_ALERT_", "TLSV1_ALERT_", "SSLV3_ALERT_"):
        if reason.startswith(prefix):
            return _alert_words(reason[len(prefix):], tls)
    if reason in _NOT_TLS:
        return "it does not speak TLS on that port (an http:// upstream?)"
    if reason == "UNEXPECTED_EOF_WHILE_READING":
        return "it closed the connection during the TLS handshake"
    return f"TLS failed: {reason.lower().replace('_', ' ') or exc}"


def _alert_words(alert: str, tls: UpstreamTLS) -> str:
    words = alert.lower().replace("_", " ")
    if alert == "CERTIFICATE_REQUIRED" or (alert == "HANDSHAKE_FAILURE" and not tls.presents_certificate):
        if tls.presents_certificate:
            return f"it requires a client certificate and did not take ours (alert: {words})"
        return (
            f"it requires a client certificate and this service presents none (alert: {words}); "
            "set upstream_tls.cert and upstream_tls.key"
        )
    if alert in _REJECTED_OURS:
        if tls.presents_certificate:
            return f"it rejected our client certificate (alert: {words})"
        return f"it refused the connection (alert: {words})"
    return f"it aborted the TLS handshake (alert: {words})"
