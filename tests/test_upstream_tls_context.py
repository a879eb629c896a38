"""The upstream TLS contexts (built per generation) and the failure words, without sockets."""

from __future__ import annotations

import ssl

import pytest

from proxy.config.model import ProxyConfig, Service, Upstream, UpstreamTLSSettings
from proxy.errors import ConfigError
from proxy.tls.upstream_context import upstream_tls_contexts
from proxy.tls.upstream_failure import describe_upstream_tls_failure

HTTPS = Upstream("https://10.0.0.5:8443", "10.0.0.5", 8443, "https")
HTTP = Upstream("http://10.0.0.5:8000", "10.0.0.5", 8000)


def config(**tls) -> ProxyConfig:
    return ProxyConfig(services=(
        Service(name="plain", upstreams=(HTTP,), path_prefix="/plain"),
        Service(name="remote", upstreams=(HTTPS,), upstream_tls=UpstreamTLSSettings(**tls)),
    ))


def test_one_verifying_context_per_https_service(pki):
    cert, key = pki.leaf("egress", "egress", client=True)
    contexts = upstream_tls_contexts(config(ca=pki.ca_pem, cert=cert, key=key, server_name="api.internal"))
    assert set(contexts) == {"remote"}  # http:// services get none: nothing changes on their path
    tls = contexts["remote"]
    assert tls.context.verify_mode == ssl.CERT_REQUIRED and tls.context.check_hostname
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.server_hostname(HTTPS) == "api.internal"
    assert tls.files == (pki.ca_pem, cert, key) and tls.presents_certificate
    again = upstream_tls_contexts(config(ca=pki.ca_pem, cert=cert, key=key))["remote"]
    assert again.server_hostname(HTTPS) == "10.0.0.5"  # the URL's host, an IP: verified as an IP SAN
    assert again.pool_key(HTTPS) != tls.pool_key(HTTPS)  # never the same pool across contexts


def test_bad_files_are_config_errors_naming_the_key(pki, tmp_path):
    cert, _ = pki.leaf("egress", "egress", client=True)
    _, other_key = pki.server
    with pytest.raises(ConfigError, match=r"services\[1\]\.upstream_tls\.key: .* is not the private key of"):
        upstream_tls_contexts(config(cert=cert, key=other_key))
    with pytest.raises(ConfigError, match=r"services\[1\]\.upstream_tls\.ca: .*missing.pem: no such file"):
        upstream_tls_contexts(config(ca=tmp_path / "missing.pem"))


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, message)
    exc.verify_code, exc.verify_message = code, message
    return exc


def alert(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, reason)
    exc.reason = reason
    return exc


@pytest.mark.parametrize(("exc", "with_cert", "words"), [
    (verify_error(10, "certificate has expired"), True, "its certificate has expired"),
    (verify_error(9, "certificate is not yet valid"), True, "its certificate is not yet valid"),
    (verify_error(20, "unable to get local issuer certificate"), True,
     "its certificate is not issued by a CA in the system trust store (unknown issuer)"),
    (verify_error(18, "self-signed certificate"), True,
     "its certificate is self-signed and not in the system trust store (unknown issuer)"),
    (verify_error(62, "Hostname mismatch"), True, "its certificate does not name 'api.internal' (hostname mismatch)"),
    (verify_error(50, "application verification failure"), True,
     "its certificate was refused: application verification failure"),
    (alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"), False,
     "it requires a client certificate and this service presents none (alert: certificate required); "
     "set upstream_tls.cert and upstream_tls.key"),
    (alert("SSLV3_ALERT_HANDSHAKE_FAILURE"), False,
     "it requires a client certificate and this service presents none (alert: handshake failure); "
     "set upstream_tls.cert and upstream_tls.key"),
    (alert("TLSV1_ALERT_UNKNOWN_CA"), True, "it rejected our client certificate (alert: unknown ca)"),
    (alert("SSLV3_ALERT_CERTIFICATE_EXPIRED"), True, "it rejected our client certificate (alert: certificate expired)"),
    (alert("TLSV1_ALERT_PROTOCOL_VERSION"), True, "it aborted the TLS handshake (alert: protocol version)"),
    (alert("WRONG_VERSION_NUMBER"), True, "it does not speak TLS on that port (an http:// upstream?)"),
    (ssl.SSLEOFError(8, "EOF"), True, "it closed the connection during the TLS handshake"),
    (ConnectionResetError(), True, None),
])
def test_failure_words(pki, exc, with_cert, words):
    cert, key = pki.leaf("egress", "egress", client=True)
    tls = upstream_tls_contexts(config(cert=cert, key=key) if with_cert else config())["remote"]
    assert describe_upstream_tls_failure(exc, tls, "api.internal") == words
