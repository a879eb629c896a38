"""The configuration as frozen dataclasses.

``proxy.config.load`` builds a ``ProxyConfig`` from YAML (or from the zero-config command
line) once; nothing reads YAML after that. Each component takes the slice it needs.
All paths are absolute (relative ones were resolved against the config file's folder);
all durations are float seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.errors import ConfigError

CLIENT_AUTH_MODES = ("none", "optional", "require")
FORWARD_MODES = ("none", "xfcc", "rfc9440", "headers")
ALLOW_KINDS = ("cn", "ou", "dns", "uri", "email", "fingerprint")
HTTP_ENGINES = ("auto", "httptools", "h11")
TLS_VERSIONS = ("1.2", "1.3")
ALPN_PROTOCOLS = ("h2", "http/1.1")
# http: HTTP/1.1; https: TLS to the upstream (``upstream_tls``); h2c: HTTP/2 cleartext
UPSTREAM_SCHEMES = ("http", "https", "h2c")
# The zero-config form has no file to point at: its errors name the flag the value came from.
FLAG_OF_KEY = {
    "tls.certificates[0].cert": "--cert",
    "tls.certificates[0].key": "--key",
    "tls.certificates[0]": "--cert/--key",
    "client_auth.ca": "--client-ca",
    "listen": "--listen",
}


@dataclass(frozen=True)
class ListenAddress:
    """A HOST:PORT to bind; ``host`` is bare (``::`` not ``[::]``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class CertificatePair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TLSSettings:
    certificates: tuple[CertificatePair, ...] = ()
    auto: bool = False  # effective value: True also when no certificates are listed
    ca_dir: Path = Path("certs/ca")
    min_version: str = "1.2"
    session_tickets: bool = True
    alpn: tuple[str, ...] = ("h2", "http/1.1")  # offered to clients, in order of preference


@dataclass(frozen=True)
class AllowEntry:
    """One allow-list entry; ``kind`` is one of ALLOW_KINDS.

    ``fingerprint`` values are normalised to lowercase hex without colons or the
    ``sha256:`` prefix.
    """

    kind: str
    value: str


@dataclass(frozen=True)
class ClientAuthSettings:
    """Listener-wide client certificate policy (the TLS handshake)."""

    mode: str = "none"
    ca: Path | None = None
    crl: Path | None = None
    allow: tuple[AllowEntry, ...] = ()
    forward: str = "xfcc"


@dataclass(frozen=True)
class ServiceClientAuth:
    """Per-service policy, checked per request after the handshake."""

    require: bool = False
    allow: tuple[AllowEntry, ...] = ()


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0
    request_header: float = 15.0
    idle: float = 60.0
    upstream_connect: float = 5.0
    upstream_response: float = 60.0
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 65536
    max_body_bytes: int = 0  # 0 = unlimited
    max_connections: int = 10000
    max_concurrent_streams: int = 100  # per HTTP/2 connection


@dataclass(frozen=True)
class AccessLogSettings:
    format: str = "json"  # json | text
    path: str = "-"  # "-" = stdout


@dataclass(frozen=True)
class AdminSettings:
    listen: ListenAddress | None = None  # None = no admin listener


@dataclass(frozen=True)
class Upstream:
    """An upstream origin, parsed from ``http://host:port`` (or ``https://``, ``h2c://``)."""

    url: str
    host: str
    port: int
    scheme: str = "http"  # one of UPSTREAM_SCHEMES


@dataclass(frozen=True)
class UpstreamTLSSettings:
    """How to reach ``https://`` upstreams: whom to trust, what name to verify, which
    client certificate to present (mTLS on the way out)."""

    ca: Path | None = None  # None: the system's default trust store
    cert: Path | None = None  # with ``key``: presented to the upstream
    key: Path | None = None
    server_name: str | None = None  # SNI and the name verified; None: the URL's host
    http2: bool = False  # offer only h2 by ALPN and speak HTTP/2 (gRPC over TLS)


@dataclass(frozen=True)
class Service:
    name: str
    upstreams: tuple[Upstream, ...]
    hosts: tuple[str, ...] = ()  # lowercase, no port; empty = any host
    path_prefix: str = "/"
    strip_prefix: bool = False
    client_auth: ServiceClientAuth | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    upstream_tls: UpstreamTLSSettings | None = None  # https:// upstreams only
    # Its upstreams take HTTP/2 (h2c://, or https:// with upstream_tls.http2): decided
    # once here, read by every request.
    http2_upstream: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        scheme = self.upstreams[0].scheme if self.upstreams else "http"
        tls = self.upstream_tls
        object.__setattr__(self, "http2_upstream", scheme == "h2c" or (scheme == "https" and tls is not None and tls.http2))

    @property
    def upstream_scheme(self) -> str:
        """The one scheme of the service's upstreams (the loader refuses mixes)."""
        return self.upstreams[0].scheme


@dataclass(frozen=True)
class ProxyConfig:
    services: tuple[Service, ...]
    listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 8443),)
    redirect_http: ListenAddress | None = None
    listen_plain: tuple[ListenAddress, ...] = ()  # plain-HTTP listeners (sidecar egress)
    listen_plain_public: bool = False  # allow listen_plain addresses other than loopback
    workers: int = 1  # "auto" is resolved to os.cpu_count() at load time
    http_engine: str = "auto"
    tls: TLSSettings = field(default_factory=TLSSettings)
    client_auth: ClientAuthSettings = field(default_factory=ClientAuthSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    source: Path | None = None  # the YAML file, None for the zero-config form
    # key path -> line in ``source`` (``tls.certificates[0].cert`` -> 7), so an error found
    # after loading (a certificate file at start or on reload) still names its line.
    key_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def error(self, key: str, reason: str) -> ConfigError:
        """An error found after loading (a certificate file, the access log), pointing where
        the user wrote the value: ``FILE:LINE: key: reason``, or ``--flag: reason`` for the
        zero-config form (``tls.ca_dir``, which no flag sets, is named as the CA folder)."""
        if self.source is None:
            flag = FLAG_OF_KEY.get(key)
            if flag is None and key == "tls.ca_dir":
                return ConfigError(f"local CA {self.tls.ca_dir}", None, "", reason)
            return ConfigError(flag or "<command line>", None, "" if flag else key, reason)
        return ConfigError(self.source, self.line_of(key), key, reason)

    def line_of(self, key: str) -> int | None:
        """The line of ``key`` or, for a section such as ``tls.certificates[0]``, of its first key."""
        line = self.key_lines.get(key)
        if line is None:
            inner = [n for k, n in self.key_lines.items() if k.startswith(key + ".") or k.startswith(key + "[")]
            line = min(inner) if inner else None
        return line
