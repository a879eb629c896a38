"""Build a ``ProxyConfig`` from the YAML file or from the zero-config command line.

The YAML path walks the composed node tree (``proxy.config.nodes``) so that every
error names the file, line and key path; the single values are read by the parsers in
``proxy.config.values``, which the command-line path uses too. Cross-field rules
(a client-auth mode needs a CA, two services may not claim the same host and prefix)
are checked here, before anything starts. Nothing here opens certificate files:
``tlsproxy check`` and the TLS layer do that.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

from proxy.config.model import (
    ALLOW_KINDS,
    ALPN_PROTOCOLS,
    CLIENT_AUTH_MODES,
    FORWARD_MODES,
    HTTP_ENGINES,
    TLS_VERSIONS,
    AccessLogSettings,
    AdminSettings,
    AllowEntry,
    CertificatePair,
    ClientAuthSettings,
    Limits,
    ListenAddress,
    ProxyConfig,
    Service,
    ServiceClientAuth,
    Timeouts,
    TLSSettings,
    Upstream,
    UpstreamTLSSettings,
)
from proxy.config.nodes import ConfigNode, compose_file
from proxy.config.values import (
    InvalidValue,
    is_loopback,
    parse_allow_entry,
    parse_choice,
    parse_duration,
    parse_header_name,
    parse_header_value,
    parse_host_pattern,
    parse_int,
    parse_listen,
    parse_path_prefix,
    parse_server_name,
    parse_service_name,
    parse_upstream,
    parse_workers,
)
from proxy.errors import UsageError

T = TypeVar("T")

DEFAULT_CONFIG_PATH = Path("config/proxy.yaml")
ACCESS_LOG_FORMATS = ("json", "text")
TOP_LEVEL_KEYS = (
    "listen",
    "redirect_http",
    "workers",
    "http_engine",
    "tls",
    "client_auth",
    "timeouts",
    "limits",
    "listen_plain",
    "listen_plain_public",
    "access_log",
    "admin",
    "services",
)
SERVICE_KEYS = (
    "name", "hosts", "path_prefix", "strip_prefix", "upstream", "upstream_tls", "client_auth", "set_headers",
)


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """``$TLSPROXY_CONFIG`` if set, else ``./config/proxy.yaml``."""
    value = environ.get("TLSPROXY_CONFIG")
    return Path(value) if value else DEFAULT_CONFIG_PATH


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> ProxyConfig:
    """Read, validate and freeze the YAML config at ``path`` (ConfigError if wrong)."""
    return load_config_with_lines(path, environ)[0]


def load_config_with_lines(
    path: Path, environ: Mapping[str, str] = os.environ
) -> tuple[ProxyConfig, Mapping[str, int]]:
    """``load_config`` plus the line of every key path, so later checks (``tlsproxy
    check`` opening the certificate files) can point at ``tls.certificates[0].cert``."""
    root, lines = compose_file(path, environ)
    config = _proxy_config(root, base=path.parent.absolute(), source=path.absolute())
    return dataclasses.replace(config, key_lines=lines), lines


# --- the YAML sections ----------------------------------------------------------------


def _field_names(cls: type) -> tuple[str, ...]:
    """The YAML keys of a section are the model's field names."""
    return tuple(f.name for f in fields(cls))


def _optional(keys: Mapping[str, ConfigNode], name: str, build: Callable[[ConfigNode], T], default: T) -> T:
    node = keys.get(name)
    return default if node is None else build(node)


def _proxy_config(root: ConfigNode, base: Path, source: Path) -> ProxyConfig:
    if root.is_null:
        raise root.error("the file is empty; a config needs at least 'services'")
    keys = root.mapping(TOP_LEVEL_KEYS, required=("services",))
    # Sections are read in the documented order (services last, since its cross-field
    # rules need client_auth), so the first error reported is usually the first in the file.
    client_auth = _optional(keys, "client_auth", lambda n: _client_auth(n, base), ClientAuthSettings())
    defaults = ProxyConfig(services=())
    return ProxyConfig(
        listen=_optional(keys, "listen", _listen_list, defaults.listen),
        redirect_http=_optional(keys, "redirect_http", _optional_listen, None),
        workers=_optional(keys, "workers", _workers, defaults.workers),
        http_engine=_optional(keys, "http_engine", lambda n: _choice(n, HTTP_ENGINES), defaults.http_engine),
        tls=_optional(keys, "tls", lambda n: _tls(n, base), _tls_defaults(base)),
        client_auth=client_auth,
        timeouts=_optional(keys, "timeouts", _timeouts, defaults.timeouts),
        limits=_optional(keys, "limits", _limits, defaults.limits),
        listen_plain=_listen_plain(keys),
        listen_plain_public=_optional(keys, "listen_plain_public", ConfigNode.boolean, False),
        access_log=_optional(keys, "access_log", lambda n: _access_log(n, base), defaults.access_log),
        admin=_optional(keys, "admin", _admin, defaults.admin),
        services=_services(keys["services"], listener_ca=client_auth.ca, base=base),
        source=source,
    )


def _workers(node: ConfigNode) -> int:
    return node.check(parse_workers, node.value(), os.cpu_count())


def _choice(node: ConfigNode, choices: Sequence[str]) -> str:
    return node.check(parse_choice, node.text(), choices)


def _path(node: ConfigNode, base: Path) -> Path:
    """A file path; relative ones resolve against the config file's folder."""
    text = node.text()
    if not text.strip():
        raise node.error("expected a file path, got an empty string")
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _optional_path(node: ConfigNode, base: Path) -> Path | None:
    return None if node.is_null else _path(node, base)


def _listen_list(node: ConfigNode, *, allow_empty: bool = False) -> tuple[ListenAddress, ...]:
    items = node.one_or_more()
    if not items and not allow_empty:
        raise node.error("needs at least one HOST:PORT")
    addresses: dict[ListenAddress, ConfigNode] = {}
    for item in items:
        address = item.parse(parse_listen)
        if address in addresses and address.port != 0:
            raise item.error(f"'{address}' is listed twice")
        addresses[address] = item
    return tuple(addresses)


def _listen_plain(keys: Mapping[str, ConfigNode]) -> tuple[ListenAddress, ...]:
    """Plain-HTTP listeners: loopback only unless ``listen_plain_public: true`` (a plain
    port on the network would serve the services to anyone without TLS)."""
    node = keys.get("listen_plain")
    if node is None or node.is_null:
        return ()
    addresses = _listen_list(node, allow_empty=True)
    public = _optional(keys, "listen_plain_public", ConfigNode.boolean, False)
    if not public:
        for item, address in zip(node.one_or_more(), addresses):
            if not is_loopback(address.host):
                raise item.error(
                    f"'{address}' is not a loopback address: a plain-HTTP listener there serves the "
                    "services without TLS to every host that can reach it; listen on 127.0.0.1 or [::1], "
                    "or set listen_plain_public: true to allow it"
                )
    return addresses


def _optional_listen(node: ConfigNode) -> ListenAddress | None:
    return None if node.is_null else node.parse(parse_listen)


def _tls_defaults(base: Path) -> TLSSettings:
    return TLSSettings(auto=True, ca_dir=base / TLSSettings.ca_dir)


def _tls(node: ConfigNode, base: Path) -> TLSSettings:
    keys = node.mapping(_field_names(TLSSettings))
    defaults = _tls_defaults(base)
    certificates = tuple(
        _certificate_pair(item, base) for item in _optional(keys, "certificates", ConfigNode.sequence, [])
    )
    auto = _optional(keys, "auto", ConfigNode.boolean, False)
    return TLSSettings(
        certificates=certificates,
        auto=auto or not certificates,
        ca_dir=_optional(keys, "ca_dir", lambda n: _path(n, base), defaults.ca_dir),
        min_version=_optional(keys, "min_version", lambda n: _choice(n, TLS_VERSIONS), defaults.min_version),
        session_tickets=_optional(keys, "session_tickets", ConfigNode.boolean, defaults.session_tickets),
        alpn=_optional(keys, "alpn", _alpn, defaults.alpn),
    )


def _alpn(node: ConfigNode) -> tuple[str, ...]:
    """The protocols offered by ALPN: a non-empty list of h2 and http/1.1, each once."""
    items = node.one_or_more()
    if not items:
        raise node.error(f"needs at least one of {', '.join(ALPN_PROTOCOLS)}")
    protocols: list[str] = []
    for item in items:
        protocol = _choice(item, ALPN_PROTOCOLS)
        if protocol in protocols:
            raise item.error(f"'{protocol}' is listed twice")
        protocols.append(protocol)
    return tuple(protocols)


def _certificate_pair(node: ConfigNode, base: Path) -> CertificatePair:
    keys = node.mapping(("cert", "key"), required=("cert", "key"))
    return CertificatePair(cert=_path(keys["cert"], base), key=_path(keys["key"], base))


def _client_auth(node: ConfigNode, base: Path) -> ClientAuthSettings:
    keys = node.mapping(_field_names(ClientAuthSettings))
    defaults = ClientAuthSettings()
    settings = ClientAuthSettings(
        mode=_optional(keys, "mode", lambda n: _choice(n, CLIENT_AUTH_MODES), defaults.mode),
        ca=_optional(keys, "ca", lambda n: _optional_path(n, base), None),
        crl=_optional(keys, "crl", lambda n: _optional_path(n, base), None),
        allow=_optional(keys, "allow", _allow_list, ()),
        forward=_optional(keys, "forward", lambda n: _choice(n, FORWARD_MODES), defaults.forward),
    )
    if settings.mode != "none" and settings.ca is None:
        raise keys["mode"].error(
            f"mode '{settings.mode}' needs client_auth.ca (the CA bundle that signs client certificates)"
        )
    if settings.crl is not None and settings.ca is None:
        raise keys["crl"].error("a CRL needs client_auth.ca (the CA bundle it belongs to)")
    if settings.allow and settings.mode == "none":
        raise keys["allow"].error(
            "an allow-list needs mode optional or require (with mode none no client certificate is asked for)"
        )
    return settings


def _allow_list(node: ConfigNode) -> tuple[AllowEntry, ...]:
    entries = []
    for item in node.sequence():
        keys = item.mapping(ALLOW_KINDS)
        if len(keys) != 1:
            raise item.error(f"each entry has exactly one key, one of {', '.join(ALLOW_KINDS)}")
        ((kind, value),) = keys.items()
        entries.append(value.check(parse_allow_entry, kind, value.text()))
    return tuple(entries)


def _services(node: ConfigNode, listener_ca: Path | None, base: Path) -> tuple[Service, ...]:
    items = node.sequence()
    if not items:
        raise node.error("at least one service is needed")
    services: list[Service] = []
    paths_by_name: dict[str, str] = {}
    routes: dict[tuple[str, str], tuple[str, Service]] = {}
    for item in items:
        keys = item.mapping(SERVICE_KEYS, required=("name", "upstream"))
        service = _service(keys, listener_ca, base)
        if service.name in paths_by_name:
            raise keys["name"].error(f"'{service.name}' is already the name of {paths_by_name[service.name]}")
        paths_by_name[service.name] = item.path
        where = keys.get("path_prefix") or keys.get("hosts") or item
        for host in service.hosts or ("",):
            route = (host, service.path_prefix.lower())  # prefixes match case-insensitively
            if route in routes:
                path, other = routes[route]
                shown = f"host '{host}'" if host else "any host"
                raise where.error(
                    f"{shown} with path_prefix '{service.path_prefix}' is already routed to "
                    f"service '{other.name}' ({path})"
                )
            routes[route] = (item.path, service)
        services.append(service)
    return tuple(services)


def _service(keys: Mapping[str, ConfigNode], listener_ca: Path | None, base: Path) -> Service:
    name = keys["name"].parse(parse_service_name)
    upstream_nodes = keys["upstream"].one_or_more()
    if not upstream_nodes:
        raise keys["upstream"].error("needs at least one http:// URL")
    upstreams = _upstreams(upstream_nodes)
    hosts = _optional(keys, "hosts", lambda n: [item.parse(parse_host_pattern) for item in n.one_or_more()], [])
    client_auth = _optional(keys, "client_auth", lambda n: _service_client_auth(n, listener_ca), None)
    return Service(
        name=name,
        upstreams=upstreams,
        hosts=tuple(dict.fromkeys(hosts)),
        path_prefix=_optional(keys, "path_prefix", lambda n: n.parse(parse_path_prefix), "/"),
        strip_prefix=_optional(keys, "strip_prefix", ConfigNode.boolean, False),
        client_auth=client_auth,
        set_headers=_optional(keys, "set_headers", _set_headers, ()),
        upstream_tls=_optional(keys, "upstream_tls", lambda n: _upstream_tls(n, upstreams[0], base), None),
    )


def _upstreams(nodes: list[ConfigNode]) -> tuple[Upstream, ...]:
    """One scheme per service (a list mixing TLS and plain upstreams would make the
    service's transport depend on the round-robin turn)."""
    upstreams = tuple(item.parse(parse_upstream) for item in nodes)
    first = upstreams[0]
    for item, upstream in zip(nodes, upstreams):
        if upstream.scheme != first.scheme:
            raise item.error(
                f"'{upstream.url}' is {upstream.scheme}:// but '{first.url}' is {first.scheme}://: "
                "the upstreams of one service share one scheme"
            )
    return upstreams


def _upstream_tls(node: ConfigNode, upstream: Upstream, base: Path) -> UpstreamTLSSettings | None:
    if node.is_null:
        return None
    if upstream.scheme != "https":
        raise node.error(
            f"only for https:// upstreams; this service's upstream is '{upstream.url}' "
            f"(write https://{upstream.url.partition('://')[2]} to reach it over TLS)"
        )
    keys = node.mapping(_field_names(UpstreamTLSSettings))
    if ("cert" in keys) != ("key" in keys):
        present, missing = ("cert", "key") if "cert" in keys else ("key", "cert")
        raise keys[present].error(f"needs upstream_tls.{missing} too (the client certificate and its key go together)")
    return UpstreamTLSSettings(
        ca=_optional(keys, "ca", lambda n: _optional_path(n, base), None),
        cert=_optional(keys, "cert", lambda n: _path(n, base), None),
        key=_optional(keys, "key", lambda n: _path(n, base), None),
        server_name=_optional(keys, "server_name", lambda n: n.parse(parse_server_name), None),
        http2=_optional(keys, "http2", ConfigNode.boolean, False),
    )


def _service_client_auth(node: ConfigNode, listener_ca: Path | None) -> ServiceClientAuth | None:
    if node.is_null:
        return None
    keys = node.mapping(_field_names(ServiceClientAuth))
    if listener_ca is None:
        raise node.error("needs client_auth.ca at the top level (the CA bundle that verifies client certificates)")
    return ServiceClientAuth(
        require=_optional(keys, "require", ConfigNode.boolean, False),
        allow=_optional(keys, "allow", _allow_list, ()),
    )


def _set_headers(node: ConfigNode) -> tuple[tuple[str, str], ...]:
    headers: dict[str, tuple[str, str]] = {}
    for name, value in node.pairs():
        value.check(parse_header_name, name)
        if name.lower() in headers:
            raise value.error(f"header '{name}' is set twice (names are case-insensitive)")
        headers[name.lower()] = (name, value.parse(parse_header_value))
    return tuple(headers.values())


def _timeouts(node: ConfigNode) -> Timeouts:
    # A zero timeout would refuse every connection; only the shutdown grace may be 0.
    def duration(name: str, child: ConfigNode) -> float:
        return child.check(parse_duration, child.value(), allow_zero=name == "shutdown_grace")

    keys = node.mapping(_field_names(Timeouts))
    return Timeouts(**{name: duration(name, child) for name, child in keys.items()})


def _limits(node: ConfigNode) -> Limits:
    keys = node.mapping(_field_names(Limits))
    return Limits(**{name: child.check(parse_int, child.value(), minimum=0) for name, child in keys.items()})


def _access_log(node: ConfigNode, base: Path) -> AccessLogSettings:
    keys = node.mapping(_field_names(AccessLogSettings))
    defaults = AccessLogSettings()
    path = _optional(keys, "path", lambda n: n.text(), defaults.path)
    return AccessLogSettings(
        format=_optional(keys, "format", lambda n: _choice(n, ACCESS_LOG_FORMATS), defaults.format),
        path=path if path == "-" else str(_path(keys["path"], base)),
    )


def _admin(node: ConfigNode) -> AdminSettings:
    keys = node.mapping(_field_names(AdminSettings))
    return AdminSettings(listen=_optional(keys, "listen", _optional_listen, None))


# --- the zero-config command line -----------------------------------------------------


def _flag(flag: str, parser: Callable[..., T], *args: object) -> T:
    """Run a value parser on a command-line value; errors name the flag."""
    try:
        return parser(*args)
    except InvalidValue as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _flag_upstreams(urls: list[str]) -> tuple[Upstream, ...]:
    upstreams = tuple(_flag("--upstream", parse_upstream, url) for url in urls)
    for upstream in upstreams:
        if upstream.scheme != upstreams[0].scheme:
            raise UsageError(f"--upstream: '{upstream.url}' and '{upstreams[0].url}': one scheme for all upstreams")
    return upstreams


def config_from_args(
    listen: str,
    upstream: str | list[str],
    cert: Path | None = None,
    key: Path | None = None,
    client_ca: Path | None = None,
    client_auth: str | None = None,
    ca_dir: Path = Path("certs/ca"),
) -> ProxyConfig:
    """The config for ``serve --listen HOST:PORT --upstream URL [...]``: one service
    named "default" for every host and path; auto TLS from ``ca_dir`` without --cert.

    ``--client-ca`` alone means ``--client-auth require`` (the safe reading of "only
    clients from this CA"). Relative paths resolve against the working directory.
    """
    urls = [upstream] if isinstance(upstream, str) else list(upstream)
    if not urls:
        raise UsageError("--upstream: at least one http:// URL is needed")
    if (cert is None) != (key is None):
        raise UsageError("--cert and --key go together")
    mode = "none" if client_ca is None else "require"
    if client_auth is not None:
        mode = _flag("--client-auth", parse_choice, client_auth, ("optional", "require"))
        if client_ca is None:
            raise UsageError("--client-auth: needs --client-ca (the CA bundle that signs client certificates)")
    certificates = ()
    if cert is not None and key is not None:
        certificates = (CertificatePair(Path(cert).absolute(), Path(key).absolute()),)
    return ProxyConfig(
        services=(
            Service(name="default", upstreams=_flag_upstreams(urls)),
        ),
        listen=(_flag("--listen", parse_listen, listen),),
        tls=TLSSettings(certificates=certificates, auto=not certificates, ca_dir=Path(ca_dir).absolute()),
        client_auth=ClientAuthSettings(mode=mode, ca=None if client_ca is None else Path(client_ca).absolute()),
    )
