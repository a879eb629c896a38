"""YAML -> ProxyConfig: accepted configs and every kind of error with its line and key path."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from proxy.config.load import config_from_args, default_config_path, load_config, load_config_with_lines
from proxy.config.model import (
    AllowEntry,
    ListenAddress,
    ProxyConfig,
    ServiceClientAuth,
    Timeouts,
    Upstream,
    UpstreamTLSSettings,
)
from proxy.errors import ConfigError, UsageError

REPO = Path(__file__).resolve().parent.parent
SERVICE = "services:\n  - name: api\n    upstream: http://127.0.0.1:9000\n"
FINGERPRINT = "ab" * 32


@pytest.fixture
def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write YAML to ./proxy.yaml in a temp folder and load it by that relative name,
    so error messages start with ``proxy.yaml:LINE:`` exactly as a user would see them."""
    monkeypatch.chdir(tmp_path)

    def load_text(text: str, environ: dict[str, str] | None = None) -> ProxyConfig:
        Path("proxy.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
        return load_config(Path("proxy.yaml"), environ or {})

    return load_text


def error_of(load, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(text, environ)
    return str(caught.value)


# --- accepted --------------------------------------------------------------------------


def test_minimal_config_gets_the_defaults(load, tmp_path: Path) -> None:
    config = load(SERVICE)
    assert config.listen == (ListenAddress("0.0.0.0", 8443),)
    assert config.services[0].upstreams == (Upstream("http://127.0.0.1:9000", "127.0.0.1", 9000),)
    assert config.services[0].path_prefix == "/"
    assert config.tls.auto is True  # no certificates listed
    assert config.tls.ca_dir == tmp_path / "certs" / "ca"
    assert config.timeouts == Timeouts()
    assert config.admin.listen is None
    assert config.source == tmp_path / "proxy.yaml"


def test_example_config_loads() -> None:
    config = load_config(REPO / "config" / "proxy.yaml", {})
    assert [s.name for s in config.services] == ["api", "web"]
    assert config.tls.certificates[0].cert == REPO / "config" / "certs" / "api.pem"
    assert config.services[0].client_auth == ServiceClientAuth(True, (AllowEntry("cn", "billing"),))
    assert config.services[1].set_headers == (("X-Env", "dev"),)


def test_full_config(load, tmp_path: Path) -> None:
    config = load(
        f"""\
        listen: "[::]:8443"
        redirect_http: 127.0.0.1:0
        workers: 3
        http_engine: h11
        tls:
          certificates: [{{cert: certs/a.pem, key: /abs/a.key}}]
          auto: true
          ca_dir: ca
          min_version: 1.3
          session_tickets: false
        client_auth:
          mode: optional
          ca: certs/clients.pem
          crl: certs/clients.crl
          allow: [{{cn: alice}}, {{dns: "*.svc.local"}}, {{fingerprint: "sha256:{':'.join([FINGERPRINT.upper()[i:i + 2] for i in range(0, 64, 2)])}"}}]
          forward: rfc9440
        timeouts: {{handshake: 250ms, idle: 2m, shutdown_grace: 0}}
        limits: {{max_body_bytes: 1048576}}
        access_log: {{format: text, path: logs/access.log}}
        admin: {{listen: "127.0.0.1:9901"}}
        services:
          - name: api
            hosts: [API.Localhost:8443, "*.example.com", "[::1]"]
            path_prefix: /api
            strip_prefix: true
            upstream: ["http://[::1]:9000/", http://backend]
            client_auth: {{require: true, allow: [{{ou: billing}}]}}
            set_headers: {{X-Env: dev, X-Version: 2}}
        """
    )
    assert config.listen == (ListenAddress("::", 8443),)
    assert config.redirect_http == ListenAddress("127.0.0.1", 0)
    assert (config.workers, config.http_engine) == (3, "h11")
    tls = config.tls
    assert tls.certificates[0].cert == tmp_path / "certs" / "a.pem"
    assert tls.certificates[0].key == Path("/abs/a.key")
    assert (tls.auto, tls.ca_dir, tls.min_version, tls.session_tickets) == (True, tmp_path / "ca", "1.3", False)
    client_auth = config.client_auth
    assert (client_auth.mode, client_auth.forward) == ("optional", "rfc9440")
    assert client_auth.crl == tmp_path / "certs" / "clients.crl"
    assert client_auth.allow == (
        AllowEntry("cn", "alice"),
        AllowEntry("dns", "*.svc.local"),
        AllowEntry("fingerprint", FINGERPRINT),
    )
    assert config.timeouts.handshake == 0.25
    assert config.timeouts.idle == 120.0
    assert config.timeouts.shutdown_grace == 0.0
    assert config.timeouts.request_header == Timeouts().request_header
    assert config.limits.max_body_bytes == 1048576
    assert config.access_log.path == str(tmp_path / "logs" / "access.log")
    assert config.admin.listen == ListenAddress("127.0.0.1", 9901)
    service = config.services[0]
    assert service.hosts == ("api.localhost", "*.example.com", "::1")
    assert service.upstreams == (
        Upstream("http://[::1]:9000", "::1", 9000),
        Upstream("http://backend", "backend", 80),
    )
    assert service.set_headers == (("X-Env", "dev"), ("X-Version", "2"))
    assert service.client_auth == ServiceClientAuth(True, (AllowEntry("ou", "billing"),))


def test_workers_auto_is_the_core_count(load) -> None:
    assert load("workers: auto\n" + SERVICE).workers == (os.cpu_count() or 1)


def test_environment_variables_are_expanded(load) -> None:
    config = load(
        """\
        listen: ["${HOST:-127.0.0.1}:${PORT}"]
        workers: ${WORKERS:-2}
        services:
          - name: api
            upstream: "http://${UPSTREAM_HOST}:9000"
            set_headers: {X-Literal: "$${NOT_A_VAR}", X-Empty-Default: "${EMPTY:-fallback}"}
        """,
        {"PORT": "8443", "UPSTREAM_HOST": "backend", "EMPTY": ""},
    )
    assert config.listen == (ListenAddress("127.0.0.1", 8443),)
    assert config.workers == 2  # typed after expansion
    assert config.services[0].upstreams[0].host == "backend"
    assert config.services[0].set_headers == (("X-Literal", "${NOT_A_VAR}"), ("X-Empty-Default", "fallback"))


def test_yaml_merge_keys_work(load) -> None:
    config = load(
        """\
        services:
          - &base {name: a, upstream: http://a, strip_prefix: true, path_prefix: /a}
          - {<<: *base, name: b, path_prefix: /b}
        """
    )
    assert [(s.name, s.strip_prefix, s.path_prefix) for s in config.services] == [("a", True, "/a"), ("b", True, "/b")]


def test_merge_keys_still_refuse_a_key_written_twice(load) -> None:
    """The anchor (services[0]) is read on its own and again through the merge."""
    text = """\
        services:
          - &a {name: a, upstream: http://a, path_prefix: /a}
          - {<<: *a, name: b, name: c, path_prefix: /b}
        """
    assert error_of(load, text) == "proxy.yaml:3: services[1].name: duplicate key (first at line 3)"


def test_the_first_error_in_the_file_is_reported(load) -> None:
    assert error_of(load, 'listen: "nope"\nservices: []\n').startswith("proxy.yaml:1: listen:")


def test_lines_of_every_key_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("tls:\n  certificates:\n    - cert: a.pem\n      key: a.key\n" + SERVICE)
    _, lines = load_config_with_lines(path, {})
    assert (lines["tls.certificates[0].cert"], lines["tls.certificates[0].key"]) == (3, 4)
    assert lines["services[0].upstream"] == 7


def test_same_prefix_on_different_hosts_is_fine(load) -> None:
    config = load(
        """\
        services:
          - {name: a, hosts: [a.test], upstream: http://a}
          - {name: b, hosts: [b.test], upstream: http://b}
          - {name: c, upstream: http://c}
        """
    )
    assert len(config.services) == 3


def test_https_upstream_with_upstream_tls(load, tmp_path: Path) -> None:
    config = load(
        """\
        listen_plain: ["127.0.0.1:8080", "[::1]:8080", "localhost:8081"]
        services:
          - name: billing
            upstream: [https://10.0.0.5, "https://[fd00::5]:8443"]
            upstream_tls:
              ca: certs/ca.pem
              cert: certs/egress.pem
              key: certs/egress.key
              server_name: Billing.Internal.
              http2: true
          - {name: open, path_prefix: /open, upstream: https://api.example}
        """
    )
    billing, open_service = config.services
    assert billing.upstreams == (
        Upstream("https://10.0.0.5", "10.0.0.5", 443, "https"),
        Upstream("https://[fd00::5]:8443", "fd00::5", 8443, "https"),
    )
    assert billing.upstream_tls == UpstreamTLSSettings(
        ca=tmp_path / "certs/ca.pem", cert=tmp_path / "certs/egress.pem", key=tmp_path / "certs/egress.key",
        server_name="billing.internal", http2=True,
    )
    assert open_service.upstream_tls is None  # the system trust store, the URL's host
    assert config.listen_plain == (
        ListenAddress("127.0.0.1", 8080), ListenAddress("::1", 8080), ListenAddress("localhost", 8081),
    )
    assert config.listen_plain_public is False


def test_listen_plain_public_allows_any_address(load) -> None:
    config = load("listen_plain: ['0.0.0.0:8080']\nlisten_plain_public: true\n" + SERVICE)
    assert config.listen_plain == (ListenAddress("0.0.0.0", 8080),)


# --- refused: every error names file, line and key path --------------------------------

ERRORS = [
    pytest.param(
        "listen: [\"0.0.0.0:8443\"]\nservices:\n  - name: api\n    upstream: htp://x\n",
        "proxy.yaml:4: services[0].upstream: 'htp://x' is not an http:// URL",
        id="bad-upstream-scheme",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: [https://a, http://b]\n",
        "proxy.yaml:3: services[0].upstream[1]: 'http://b' is http:// but 'https://a' is https://: "
        "the upstreams of one service share one scheme",
        id="mixed-upstream-schemes",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: http://a:8000\n    upstream_tls:\n      ca: ca.pem\n",
        "proxy.yaml:4: services[0].upstream_tls: only for https:// upstreams; this service's upstream is "
        "'http://a:8000' (write https://a:8000 to reach it over TLS)",
        id="upstream-tls-on-http",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: https://a\n    upstream_tls:\n      key: egress.key\n",
        "proxy.yaml:5: services[0].upstream_tls.key: needs upstream_tls.cert too "
        "(the client certificate and its key go together)",
        id="upstream-tls-key-without-cert",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: https://a\n    upstream_tls: {server_name: 'a/b'}\n",
        "proxy.yaml:4: services[0].upstream_tls.server_name: 'a/b' is not a DNS name or IP address",
        id="upstream-tls-server-name",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: https://a\n    upstream_tls: {verify: false}\n",
        "proxy.yaml:4: services[0].upstream_tls.verify: unknown key",
        id="upstream-tls-no-verify-switch",
    ),
    pytest.param(
        "listen_plain: ['127.0.0.1:8080', '0.0.0.0:8081']\nservices:\n  - name: api\n    upstream: http://a\n",
        "proxy.yaml:1: listen_plain[1]: '0.0.0.0:8081' is not a loopback address: a plain-HTTP listener there "
        "serves the services without TLS to every host that can reach it; listen on 127.0.0.1 or [::1], "
        "or set listen_plain_public: true to allow it",
        id="listen-plain-public-refused",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream:\n      - http://a\n      - http://b/api\n",
        "proxy.yaml:5: services[0].upstream[1]: 'http://b/api' has a path or query; an upstream is http://host[:port] only",
        id="upstream-path",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: http://a:0\n",
        "proxy.yaml:3: services[0].upstream: 'http://a:0' has an invalid port (expected 1-65535)",
        id="upstream-port",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: []\n",
        "proxy.yaml:3: services[0].upstream: needs at least one http:// URL",
        id="upstream-empty",
    ),
    pytest.param(
        SERVICE + "servces: []\n",
        "proxy.yaml:4: servces: unknown key (did you mean 'services'?)",
        id="unknown-top-key",
    ),
    pytest.param(
        "tls:\n  certficates: []\n" + SERVICE,
        "proxy.yaml:2: tls.certficates: unknown key (did you mean 'certificates'?)",
        id="unknown-nested-key",
    ),
    pytest.param(
        SERVICE + "    colour: blue\n",
        "proxy.yaml:4: services[0].colour: unknown key",
        id="unknown-key-no-suggestion",
    ),
    pytest.param(
        "workers: 1\nworkers: 2\n" + SERVICE,
        "proxy.yaml:2: workers: duplicate key (first at line 1)",
        id="duplicate-key",
    ),
    pytest.param(
        "listen: {host: x}\n" + SERVICE,
        "proxy.yaml:1: listen: expected a list, got a mapping",
        id="list-vs-mapping",
    ),
    pytest.param(
        "tls: [a]\n" + SERVICE,
        "proxy.yaml:1: tls: expected a mapping (key: value), got a list",
        id="mapping-vs-list",
    ),
    pytest.param(
        "services:\n  - name: [a]\n    upstream: http://a\n",
        "proxy.yaml:2: services[0].name: expected a string, got a list",
        id="scalar-vs-list",
    ),
    pytest.param(
        "services:\n  - upstream: http://a\n",
        "proxy.yaml:2: services[0].name: required key is missing",
        id="missing-name",
    ),
    pytest.param("listen: []\n", "proxy.yaml:1: services: required key is missing", id="missing-services"),
    pytest.param("services: []\n", "proxy.yaml:1: services: at least one service is needed", id="no-services"),
    pytest.param("", "proxy.yaml:1: the file is empty; a config needs at least 'services'", id="empty-file"),
    pytest.param("- a\n", "proxy.yaml:1: expected a mapping (key: value), got a list", id="top-level-list"),
    pytest.param(
        "client_auth:\n  mode: requier\n" + SERVICE,
        "proxy.yaml:2: client_auth.mode: 'requier' is not one of none, optional, require (did you mean 'require'?)",
        id="enum-mode",
    ),
    pytest.param(
        "client_auth: {forward: envoy}\n" + SERVICE,
        "proxy.yaml:1: client_auth.forward: 'envoy' is not one of none, xfcc, rfc9440, headers",
        id="enum-forward",
    ),
    pytest.param(
        "http_engine: uvloop\n" + SERVICE,
        "proxy.yaml:1: http_engine: 'uvloop' is not one of auto, httptools, h11",
        id="enum-engine",
    ),
    pytest.param(
        "tls: {min_version: 1.1}\n" + SERVICE,
        "proxy.yaml:1: tls.min_version: '1.1' is not one of 1.2, 1.3",
        id="enum-min-version",
    ),
    pytest.param(
        "access_log: {format: xml}\n" + SERVICE,
        "proxy.yaml:1: access_log.format: 'xml' is not one of json, text",
        id="enum-log-format",
    ),
    pytest.param(
        "timeouts:\n  idle: soon\n" + SERVICE,
        "proxy.yaml:2: timeouts.idle: 'soon' is not a duration (e.g. 250ms, 10s, 2m, or seconds)",
        id="duration-garbage",
    ),
    pytest.param(
        "timeouts:\n  idle: -5\n" + SERVICE,
        "proxy.yaml:2: timeouts.idle: '-5' is not a duration (must be a finite number of seconds >= 0)",
        id="duration-negative",
    ),
    pytest.param(
        "timeouts:\n  handshake: 0s\n" + SERVICE,
        "proxy.yaml:2: timeouts.handshake: '0s' must be longer than zero",
        id="duration-zero",
    ),
    pytest.param(
        "timeouts: {idle: true}\n" + SERVICE,
        "proxy.yaml:1: timeouts.idle: 'True' is not a duration (e.g. 250ms, 10s, 2m, or seconds)",
        id="duration-bool",
    ),
    pytest.param(
        "limits: {max_body_bytes: lots}\n" + SERVICE,
        "proxy.yaml:1: limits.max_body_bytes: 'lots' is not a whole number",
        id="int-garbage",
    ),
    pytest.param(
        "limits: {max_connections: -1}\n" + SERVICE,
        "proxy.yaml:1: limits.max_connections: -1 is less than 0",
        id="int-negative",
    ),
    pytest.param("workers: 0\n" + SERVICE, "proxy.yaml:1: workers: 0 is less than 1", id="workers-zero"),
    pytest.param(
        "workers: many\n" + SERVICE,
        "proxy.yaml:1: workers: 'many' is neither a number of processes nor 'auto'",
        id="workers-word",
    ),
    pytest.param(
        SERVICE + "    strip_prefix: maybe\n",
        "proxy.yaml:4: services[0].strip_prefix: 'maybe' is not true or false",
        id="bool",
    ),
    pytest.param(
        'listen: ["0.0.0.0:70000"]\n' + SERVICE,
        "proxy.yaml:1: listen[0]: '0.0.0.0:70000' has an invalid port (expected 0-65535)",
        id="listen-port",
    ),
    pytest.param(
        'listen: "::1:8443"\n' + SERVICE,
        "proxy.yaml:1: listen: '::1:8443': an IPv6 address goes in brackets, e.g. [::1]:8443",
        id="listen-ipv6-brackets",
    ),
    pytest.param(
        'listen: "8443"\n' + SERVICE,
        "proxy.yaml:1: listen: '8443' is not HOST:PORT (e.g. 0.0.0.0:8443 or [::]:8443)",
        id="listen-no-host",
    ),
    pytest.param(
        'admin: {listen: "localhost"}\n' + SERVICE,
        "proxy.yaml:1: admin.listen: 'localhost' is not HOST:PORT (e.g. 0.0.0.0:8443 or [::]:8443)",
        id="admin-listen",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: ${UPSTREAM}\n",
        "proxy.yaml:3: services[0].upstream: environment variable UPSTREAM is not set (use ${UPSTREAM:-default} for a default)",
        id="env-unset",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: http://${UP\n",
        "proxy.yaml:3: services[0].upstream: malformed variable reference '${' (use ${NAME} or ${NAME:-default})",
        id="env-malformed",
    ),
    pytest.param(
        "services:\n  - name: api\n    upstream: [http://a\n",
        "proxy.yaml:4: YAML syntax error: while parsing a flow sequence, expected ',' or ']', but got '<stream end>'",
        id="yaml-syntax",
    ),
    pytest.param(
        "client_auth:\n  mode: require\n" + SERVICE,
        "proxy.yaml:2: client_auth.mode: mode 'require' needs client_auth.ca (the CA bundle that signs client certificates)",
        id="mode-needs-ca",
    ),
    pytest.param(
        "client_auth:\n  crl: x.crl\n" + SERVICE,
        "proxy.yaml:2: client_auth.crl: a CRL needs client_auth.ca (the CA bundle it belongs to)",
        id="crl-needs-ca",
    ),
    pytest.param(
        "client_auth:\n  ca: ca.pem\n  allow: [{cn: a}]\n" + SERVICE,
        "proxy.yaml:3: client_auth.allow: an allow-list needs mode optional or require "
        "(with mode none no client certificate is asked for)",
        id="allow-needs-mode",
    ),
    pytest.param(
        SERVICE + "    client_auth: {require: true}\n",
        "proxy.yaml:4: services[0].client_auth: needs client_auth.ca at the top level "
        "(the CA bundle that verifies client certificates)",
        id="service-client-auth-needs-ca",
    ),
    pytest.param(
        "client_auth: {mode: require, ca: ca.pem, allow: [{cn: a, ou: b}]}\n" + SERVICE,
        "proxy.yaml:1: client_auth.allow[0]: each entry has exactly one key, one of cn, ou, dns, uri, email, fingerprint",
        id="allow-two-keys",
    ),
    pytest.param(
        "client_auth:\n  mode: require\n  ca: ca.pem\n  allow:\n    - {common_name: a}\n" + SERVICE,
        "proxy.yaml:5: client_auth.allow[0].common_name: unknown key",
        id="allow-unknown-kind",
    ),
    pytest.param(
        "client_auth:\n  mode: require\n  ca: ca.pem\n  allow:\n    - fingerprint: sha256:abcd\n" + SERVICE,
        "proxy.yaml:5: client_auth.allow[0].fingerprint: 'sha256:abcd' is not a SHA-256 fingerprint "
        "(64 hex digits, optionally 'sha256:' and colons)",
        id="allow-fingerprint",
    ),
    pytest.param(
        "client_auth:\n  mode: require\n  ca: ca.pem\n  allow:\n    - dns: a.*.svc\n" + SERVICE,
        "proxy.yaml:5: client_auth.allow[0].dns: 'a.*.svc': a wildcard is only allowed as a leading '*.'",
        id="allow-dns-wildcard",
    ),
    pytest.param(
        SERVICE + "  - name: api\n    upstream: http://b\n    path_prefix: /b\n",
        "proxy.yaml:4: services[1].name: 'api' is already the name of services[0]",
        id="duplicate-name",
    ),
    pytest.param(
        "services:\n  - {name: a, hosts: [x.test], path_prefix: /p, upstream: http://a}\n"
        "  - {name: b, hosts: [y.test, X.test], path_prefix: /p, upstream: http://b}\n",
        "proxy.yaml:3: services[1].path_prefix: host 'x.test' with path_prefix '/p' is already routed to "
        "service 'a' (services[0])",
        id="duplicate-route",
    ),
    pytest.param(
        SERVICE + "  - name: b\n    upstream: http://b\n",
        "proxy.yaml:4: services[1]: any host with path_prefix '/' is already routed to service 'api' (services[0])",
        id="duplicate-catch-all",
    ),
    pytest.param(
        SERVICE + "    path_prefix: api\n",
        "proxy.yaml:4: services[0].path_prefix: 'api' must start with '/'",
        id="path-prefix",
    ),
    pytest.param(
        SERVICE + "    hosts: [bad_host!]\n",
        "proxy.yaml:4: services[0].hosts[0]: 'bad_host!' does not name a valid host",
        id="bad-host",
    ),
    pytest.param(
        SERVICE + "    set_headers: {X Bad: 1}\n",
        "proxy.yaml:4: services[0].set_headers.X Bad: 'X Bad' is not a valid header name",
        id="header-name",
    ),
    pytest.param(
        SERVICE + '    set_headers:\n      X-Evil: "a\\r\\nInjected: 1"\n',
        "proxy.yaml:5: services[0].set_headers.X-Evil: 'a\\r\\nInjected: 1': header values must not contain CR, LF or NUL",
        id="header-crlf",
    ),
    pytest.param(
        SERVICE + "    set_headers: {X-A: 1, x-a: 2}\n",
        "proxy.yaml:4: services[0].set_headers.x-a: header 'x-a' is set twice (names are case-insensitive)",
        id="header-twice",
    ),
    pytest.param(
        "services:\n  - name: my api\n    upstream: http://a\n",
        "proxy.yaml:2: services[0].name: 'my api' is not a service name (letters, digits, '-', '_', '.')",
        id="service-name",
    ),
    pytest.param(
        "tls:\n  certificates:\n    - {cert: a.pem}\n" + SERVICE,
        "proxy.yaml:3: tls.certificates[0].key: required key is missing",
        id="cert-without-key",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_config_errors_name_file_line_and_key(load, text: str, message: str) -> None:
    assert error_of(load, text) == message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml", {})
    assert str(caught.value) == f"{tmp_path / 'nope.yaml'}: no such file"


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, {})


def test_error_carries_structured_fields(load) -> None:
    with pytest.raises(ConfigError) as caught:
        load("services:\n  - name: api\n    upstream: htp://x\n")
    assert (caught.value.file, caught.value.line, caught.value.key) == ("proxy.yaml", 3, "services[0].upstream")


# --- default path and the zero-config command line -------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, Path("config/proxy.yaml")), ({"TLSPROXY_CONFIG": "/etc/tp.yaml"}, Path("/etc/tp.yaml"))],
)
def test_default_config_path(environ: dict[str, str], expected: Path) -> None:
    assert default_config_path(environ) == expected


def test_config_from_args_auto_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = config_from_args("127.0.0.1:0", "http://127.0.0.1:9000")
    assert config.listen == (ListenAddress("127.0.0.1", 0),)
    (service,) = config.services
    assert (service.name, service.hosts, service.path_prefix) == ("default", (), "/")
    assert service.upstreams == (Upstream("http://127.0.0.1:9000", "127.0.0.1", 9000),)
    assert config.tls.auto is True and config.tls.certificates == ()
    assert config.tls.ca_dir == tmp_path / "certs" / "ca"
    assert config.client_auth.mode == "none"
    assert config.source is None


def test_config_from_args_with_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = config_from_args(
        "[::1]:8443", ["http://a:1", "http://b:2"], cert=Path("s.pem"), key=Path("s.key"), client_ca=Path("ca.pem")
    )
    assert config.tls.auto is False
    assert config.tls.certificates[0].cert == tmp_path / "s.pem"
    assert [u.port for u in config.services[0].upstreams] == [1, 2]
    assert (config.client_auth.mode, config.client_auth.ca) == ("require", tmp_path / "ca.pem")
    optional = config_from_args("[::1]:8443", "http://a", client_ca=Path("ca.pem"), client_auth="optional")
    assert optional.client_auth.mode == "optional"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"upstream": "htp://x"}, "--upstream: 'htp://x' is not an http:// URL"),
        ({"upstream": []}, "--upstream: at least one http:// URL is needed"),
        ({"listen": "localhost"}, "--listen: 'localhost' is not HOST:PORT (e.g. 0.0.0.0:8443 or [::]:8443)"),
        ({"cert": Path("a.pem")}, "--cert and --key go together"),
        ({"client_auth": "require"}, "--client-auth: needs --client-ca (the CA bundle that signs client certificates)"),
        (
            {"client_auth": "always", "client_ca": Path("ca.pem")},
            "--client-auth: 'always' is not one of optional, require",
        ),
    ],
)
def test_config_from_args_errors_name_the_flag(kwargs: dict, message: str) -> None:
    arguments = {"listen": "127.0.0.1:8443", "upstream": "http://127.0.0.1:9000", **kwargs}
    with pytest.raises(UsageError) as caught:
        config_from_args(**arguments)
    assert str(caught.value) == message


def test_prefixes_differing_only_in_case_are_the_same_route(load) -> None:
    """Prefixes match case-insensitively, so /API and /api would compete for one request."""
    text = """\
        services:
          - {name: a, upstream: http://a, path_prefix: /api}
          - {name: b, upstream: http://b, path_prefix: /API}
        """
    assert "is already routed to service 'a'" in error_of(load, text)


@pytest.mark.parametrize("prefix", ["/a%2fb", "/a;x", "/a\\\\b", "//a", "/a/../b", "/a/./b"])
def test_a_prefix_no_normalised_request_could_match_is_refused(load, prefix: str) -> None:
    text = f"""\
        services:
          - {{name: a, upstream: http://a, path_prefix: "{prefix}"}}
        """
    assert "must be a normalised path" in error_of(load, text)


def test_a_normalised_prefix_loads(load) -> None:
    text = """\
        services:
          - {name: a, upstream: http://a, path_prefix: /api/v1.2/}
        """
    assert load(text).services[0].path_prefix == "/api/v1.2/"
