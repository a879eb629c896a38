"""A failed server-side TLS handshake -> a counter key and a reason in words.

The SPEC wants a log line naming the client and the reason ("expired", "unknown CA"...)
and /metrics wants a count per reason. OpenSSL reports these as exceptions of a few
shapes, found empirically (OpenSSL 3.0, Python 3.11, blocking sockets, asyncio and
uvloop alike; tests/test_tls_handshake.py re-checks each with a real handshake):

* the client's certificate failed verification: ``ssl.SSLCertVerificationError`` with
  ``verify_code`` from OpenSSL's X509_V_ERR_* list (10 expired, 9 not yet valid,
  20 unknown issuer, 23 revoked, 26 wrong purpose...) and ``verify_message``;
* everything else OpenSSL refused: ``ssl.SSLError`` whose ``reason`` names it
  (``PEER_DID_NOT_RETURN_A_CERTIFICATE``, ``UNSUPPORTED_PROTOCOL``,
  ``NO_SHARED_CIPHER``, ``HTTP_REQUEST``, ``TLSV1_ALERT_*`` sent by the client...);
* the client went away: ``ssl.SSLEOFError`` / ``ConnectionResetError``;
* too slow: ``TimeoutError`` (socket timeouts) or, from asyncio/uvloop's
  ``ssl_handshake_timeout``, ``ConnectionAbortedError("SSL handshake is taking longer
  than ...")``.

Note: a server context (PROTOCOL_TLS_SERVER) already checks the client certificate's
purpose: a certificate whose EKU is serverAuth only is refused in the handshake with
verify_code 26 ("unsuitable certificate purpose"), so no post-handshake EKU check is
needed.
"""

from __future__ import annotations

import ssl

__all__ = ["HANDSHAKE_FAILURE_KEYS", "describe_handshake_failure"]

HANDSHAKE_FAILURE_KEYS = (
    "no_certificate",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "revoked",
    "wrong_purpose",
    "bad_certificate",
    "crl_unavailable",
    "protocol_version",
    "no_shared_cipher",
    "no_application_protocol",
    "plain_http",
    "malformed",
    "client_alert",
    "client_closed",
    "timeout",
    "other",
)

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h) -> (key, words).
_VERIFY_CODES: dict[int, tuple[str, str]] = {
    2: ("unknown_ca", "client certificate is not issued by a trusted CA"),
    18: ("unknown_ca", "client certificate is self-signed and not trusted"),
    19: ("unknown_ca", "client certificate chain ends in an untrusted self-signed CA"),
    20: ("unknown_ca", "client certificate is not issued by a trusted CA"),
    21: ("unknown_ca", "client certificate is not issued by a trusted CA"),
    27: ("unknown_ca", "client certificate is not trusted"),
    28: ("unknown_ca", "client certificate is rejected by the trust store"),
    9: ("not_yet_valid", "client certificate is not yet valid"),
    10: ("expired", "client certificate has expired"),
    23: ("revoked", "client certificate is revoked"),
    26: ("wrong_purpose", "client certificate is not for client authentication (EKU)"),
    3: ("crl_unavailable", "no CRL from the client certificate's issuer is loaded"),
    8: ("crl_unavailable", "the CRL's signature is invalid"),
    11: ("crl_unavailable", "the CRL is not yet valid"),
    12: ("crl_unavailable", "the CRL has expired"),
}

_OLD_VERSION = ("protocol_version", "client offered only TLS versions this listener refuses")

_SSL_REASONS: dict[str, tuple[str, str]] = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": ("no_certificate", "client sent no certificate, one is required"),
    "UNSUPPORTED_PROTOCOL": _OLD_VERSION,
    "VERSION_TOO_LOW": _OLD_VERSION,
    "WRONG_SSL_VERSION": _OLD_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": ("protocol_version", "client refused every TLS version offered"),
    "NO_SHARED_CIPHER": ("no_shared_cipher", "client and listener share no cipher suite"),
    "NO_APPLICATION_PROTOCOL": (
        "no_application_protocol",
        "client offered by ALPN no protocol this listener serves (tls.alpn; e.g. an HTTP/2-only client "
        "on a listener with alpn: [http/1.1])",
    ),
    "NO_SHARED_GROUPS": ("no_shared_cipher", "client and listener share no key-exchange group"),
    "NO_SUITABLE_SIGNATURE_ALGORITHM": ("no_shared_cipher", "client and listener share no signature scheme"),
    "HTTP_REQUEST": ("plain_http", "client sent plain HTTP to the TLS port"),
    "HTTPS_PROXY_REQUEST": ("plain_http", "client sent a plain HTTP CONNECT to the TLS port"),
    "UNEXPECTED_EOF_WHILE_READING": ("client_closed", "client closed the connection during the handshake"),
}

# Record-layer complaints: what arrived is not (well-formed) TLS.
_NOT_TLS_REASONS = frozenset({
    "UNEXPECTED_MESSAGE", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG",
    "RECORD_LENGTH_MISMATCH", "BAD_PACKET_LENGTH", "LENGTH_MISMATCH",
})

# Alerts a client sends when it does not accept our server certificate.
_CLIENT_REFUSED_OUR_CERT = frozenset(
    {"UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED"}
)


def describe_handshake_failure(exc: BaseException) -> tuple[str, str]:
    """(counter key, reason in words) for an exception from a server-side handshake.

    The key is one of HANDSHAKE_FAILURE_KEYS; the words are for the log line next to
    the client's address, e.g. ("expired", "client certificate has expired").
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _describe_verify_error(exc)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "client_closed", "client closed the connection during the handshake"
    if isinstance(exc, ssl.SSLError):
        return _describe_ssl_error(exc)
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)
    ):
        return "timeout", "client did not finish the handshake in time"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, EOFError)):
        return "client_closed", "client closed the connection during the handshake"
    return "other", _exception_words(exc)


def _describe_verify_error(exc: ssl.SSLCertVerificationError) -> tuple[str, str]:
    message = exc.verify_message or "verification failed"
    known = _VERIFY_CODES.get(exc.verify_code)
    if known is None:
        return "bad_certificate", f"client certificate refused: {message}"
    key, words = known
    return key, f"{words} ({message})"


def _describe_ssl_error(exc: ssl.SSLError) -> tuple[str, str]:
    reason = exc.reason or ""
    known = _SSL_REASONS.get(reason)
    if known is not None:
        return known
    for prefix in ("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_"):
        if reason.startswith(prefix):
            alert = reason[len(prefix):]
            words = _in_words(alert)
            if alert in _CLIENT_REFUSED_OUR_CERT:
                return "client_alert", f"client refused the server certificate (alert: {words})"
            return "client_alert", f"client aborted the handshake (alert: {words})"
    if reason in _NOT_TLS_REASONS:
        return "malformed", f"client sent bytes that are not a valid TLS handshake ({_in_words(reason)})"
    return "other", _exception_words(exc)


def _in_words(reason: str) -> str:
    return reason.lower().replace("_", " ")


def _exception_words(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"handshake failed: {text}"
