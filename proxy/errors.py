"""The one exception tree of tlsproxy.

Foreign exceptions (OSError, ssl.SSLError, yaml errors, h11 errors, cryptography's
VerificationError...) are translated into these where they enter our code, so the
edges (the CLI, the connection handler) catch one family and choose one exit code or
one HTTP status::

    TlsProxyError                 exit_code 1
    ├── UsageError                exit_code 2 (bad command line)
    ├── ConfigError               FILE:LINE: key.path: reason
    ├── PKIError                  certificate toolkit: unreadable file, bad NAME, wrong password
    │   └── VerificationFailed    a certificate a TLS client would refuse; .reason in words
    ├── ConnectionFailed          a peer broke HTTP/2 for the whole connection (GOAWAY sent)
    └── HTTPError                 one request failed; .status picks the response
        ├── BadRequest            400 (unparseable / ambiguous framing / plain HTTP on TLS port)
        ├── Forbidden             403 (client certificate not allowed for this service)
        ├── NotFound              404 (no service matches host and path)
        ├── PayloadTooLarge       413
        ├── MisdirectedRequest    421 (Host and SNI reach services with different policies)
        ├── HeadersTooLarge       431
        ├── BadGateway            502 (upstream refused / broke the protocol)
        └── GatewayTimeout        504
"""

from __future__ import annotations


class TlsProxyError(Exception):
    """Base of every error tlsproxy raises on purpose; the message is for the user."""

    exit_code = 1


class UsageError(TlsProxyError):
    """The command line itself is wrong (exit 2, like argparse)."""

    exit_code = 2


class ConfigError(TlsProxyError):
    """A config value is wrong; names the file, the line and the key path."""

    def __init__(self, file: object, line: int | None, key: str, reason: str) -> None:
        self.file = str(file)
        self.line = line
        self.key = key
        self.reason = reason
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


class PKIError(TlsProxyError):
    """The certificate toolkit could not do what was asked (the message says why)."""


class VerificationFailed(PKIError):
    """A TLS client would refuse this certificate; ``reason`` is a short phrase."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ConnectionFailed(TlsProxyError):
    """The peer broke the protocol for the whole connection (an HTTP/2 connection
    error: its GOAWAY is already queued); the message says how, for the log, and
    ``kind`` for the metrics: ``protocol`` (a broken peer) or ``abuse`` (a flood)."""

    def __init__(self, message: str, *, kind: str = "protocol") -> None:
        super().__init__(message)
        self.kind = kind


class HTTPError(TlsProxyError):
    """One request failed; ``status`` is the response code, the message its body."""

    status = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        super().__init__(message)


class BadRequest(HTTPError):
    status = 400


class Forbidden(HTTPError):
    status = 403

    def __init__(self, message: str, *, unauthenticated: bool = False) -> None:
        super().__init__(message)
        self.unauthenticated = unauthenticated  # no certificate at all (gRPC: UNAUTHENTICATED)


class NotFound(HTTPError):
    status = 404


class PayloadTooLarge(HTTPError):
    status = 413


class MisdirectedRequest(HTTPError):
    status = 421


class HeadersTooLarge(HTTPError):
    status = 431


class BadGateway(HTTPError):
    status = 502


class GatewayTimeout(HTTPError):
    status = 504
