"""Server TLS contexts: real handshakes on 127.0.0.1 port 0 with Python ssl clients.

Each handshake runs the server side in one worker thread (blocking sockets, every wait
bounded by a socket timeout) and the client in the test thread. Both sides shut TLS
down cleanly, because OpenSSL drops a session from its cache when a connection ends
without close_notify, which would make "not resumed" pass for the wrong reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy.config.model import (
    CertificatePair,
    ClientAuthSettings,
    ProxyConfig,
    Service,
    ServiceClientAuth,
    TLSSettings,
    Upstream,
)
from proxy.config.load import load_config
from proxy.errors import ConfigError
from proxy.pki.build import issue_leaf, make_crl
from proxy.pki.store import ensure_ca, load_certificates, write_crl, write_leaf
from proxy.tls.context import INTERMEDIATE_CIPHERS, ServerTLS

TIMEOUT = 5.0
UPSTREAMS = (Upstream("http://127.0.0.1:9000", "127.0.0.1", 9000),)


def config_for(*pairs, services=None, source=Path("/etc/proxy.yaml"), **tls_fields) -> ProxyConfig:
    client_auth = tls_fields.pop("client_auth", ClientAuthSettings())
    tls = TLSSettings(certificates=tuple(CertificatePair(c, k) for c, k in pairs), **tls_fields)
    return ProxyConfig(
        services=services or (Service(name="api", upstreams=UPSTREAMS),),
        tls=tls,
        client_auth=client_auth,
        source=source,
    )


@dataclass
class Outcome:
    """What each side saw of one connection."""

    server_error: str | None = None
    server_name: str | None = None
    client_cert_seen: bool = False
    client_error: str | None = None
    peer_names: tuple[str, ...] = ()
    peer_serial: int | None = None
    session: ssl.SSLSession | None = None
    session_reused: bool = False
    version: str | None = None
    cipher: str | None = None
    alpn: str | None = None

    @property
    def accepted(self) -> bool:
        return self.server_error is None and self.client_error is None


def client_context(pki, *, cert=None, max_version=None, ciphers=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.check_hostname = False  # the tests look at the served SANs themselves
    if cert is not None:
        context.load_cert_chain(*cert)
    if max_version is not None:
        context.maximum_version = max_version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def _serve_one(listener: socket.socket, tls: ServerTLS, outcome: Outcome) -> None:
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    try:
        with tls.context.wrap_socket(conn, server_side=True) as tls_conn:
            outcome.server_name = tls.server_name(tls_conn)
            outcome.client_cert_seen = tls_conn.getpeercert(binary_form=True) is not None
            tls_conn.recv(1)
            tls_conn.sendall(b"y")
            tls_conn.unwrap()
    except (ssl.SSLError, OSError) as exc:
        outcome.server_error = str(exc)
    finally:
        conn.close()


def handshake(tls: ServerTLS, client: ssl.SSLContext, server_name: str | None = "localhost", session=None) -> Outcome:
    outcome = Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(TIMEOUT)
        served = pool.submit(_serve_one, listener, tls, outcome)
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw:
                with client.wrap_socket(raw, server_hostname=server_name, session=session) as conn:
                    der = conn.getpeercert(binary_form=True)
                    peer = x509.load_der_x509_certificate(der)
                    outcome.peer_names, outcome.peer_serial = tuple(load_san(peer)), peer.serial_number
                    outcome.version = conn.version()
                    outcome.cipher = conn.cipher()[0]
                    outcome.alpn = conn.selected_alpn_protocol()
                    conn.sendall(b"x")
                    if conn.recv(1) != b"y":  # TLS 1.3: a refused client cert shows up here
                        raise ConnectionError("server closed the connection")
                    outcome.session = conn.session
                    outcome.session_reused = conn.session_reused
                    conn.unwrap()
        except (ssl.SSLError, OSError) as exc:
            outcome.client_error = str(exc)
        served.result(timeout=TIMEOUT)
    return outcome


def load_san(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.DNSName)


# --- certificates and SNI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_certs(pki):
    return pki.leaf("api", "api.example"), pki.leaf("web", "web.example", "*.web.example")


def test_sni_picks_the_certificate_naming_the_host(pki, two_certs):
    tls = ServerTLS.from_config(config_for(*two_certs))
    client = client_context(pki)
    assert handshake(tls, client, "api.example").peer_names == ("api.example",)
    web = handshake(tls, client, "WEB.example")
    assert web.peer_names == ("web.example", "*.web.example") and web.server_name == "web.example"
    assert handshake(tls, client, "a.web.example").peer_names == ("web.example", "*.web.example")


def test_unknown_or_missing_sni_gets_the_first_certificate(pki, two_certs):
    tls = ServerTLS.from_config(config_for(*two_certs))
    client = client_context(pki)
    unknown = handshake(tls, client, "other.example")
    assert unknown.peer_names == ("api.example",) and unknown.server_name == "other.example"
    # Wildcards cover one label only.
    assert handshake(tls, client, "a.b.web.example").peer_names == ("api.example",)
    none = handshake(tls, client, None)
    assert none.peer_names == ("api.example",) and none.server_name is None


def test_loaded_certificates_describe_what_is_served(two_certs):
    tls = ServerTLS.from_config(config_for(*two_certs))
    assert tls.renewal_due is None
    assert [c.names for c in tls.certificates] == [("api.example",), ("web.example", "*.web.example")]
    assert tls.certificates[0].path == two_certs[0][0] and not tls.certificates[0].auto
    assert tls.certificates[0].not_after > dt.datetime.now(dt.timezone.utc)
    assert set(two_certs[0]) <= set(tls.files)


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_server_name_is_remembered_on_asyncio_ssl_objects(pki, two_certs, loop_factory):
    tls = ServerTLS.from_config(config_for(*two_certs))
    seen: list[str | None] = []

    async def on_connect(reader, writer):
        seen.append(tls.server_name(writer.get_extra_info("ssl_object")))
        writer.close()

    async def main():
        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls.context)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=client_context(pki), server_hostname="web.example"),
                TIMEOUT,
            )
            peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
        return load_san(x509.load_der_x509_certificate(peer))

    loop = loop_factory()
    try:
        assert loop.run_until_complete(main()) == ["web.example", "*.web.example"]
    finally:
        loop.close()
    assert seen == ["web.example"]


# --- protocol policy -------------------------------------------------------------------


def test_intermediate_profile_settings(pki):
    context = ServerTLS.from_config(config_for(pki.server)).context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION
    assert not context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(INTERMEDIATE_CIPHERS.split(":"))


def test_min_version_13_refuses_a_tls12_only_client(pki):
    client = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
    accepted = handshake(ServerTLS.from_config(config_for(pki.server)), client)
    assert accepted.accepted and accepted.version == "TLSv1.2"
    refused = handshake(ServerTLS.from_config(config_for(pki.server, min_version="1.3")), client)
    assert not refused.accepted and "unsupported protocol" in refused.server_error.lower()
    assert handshake(ServerTLS.from_config(config_for(pki.server, min_version="1.3")), client_context(pki)).accepted


def test_tls12_client_with_only_cbc_ciphers_is_refused(pki):
    tls = ServerTLS.from_config(config_for(pki.server))
    cbc = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA")
    assert not handshake(tls, cbc).accepted
    gcm = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert handshake(tls, gcm).accepted


def test_the_client_chooses_among_the_allowed_ciphers(pki):
    tls = ServerTLS.from_config(config_for(pki.server))
    chacha_first = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256"
    client = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2, ciphers=chacha_first)
    assert handshake(tls, client).cipher == "ECDHE-ECDSA-CHACHA20-POLY1305"


def alpn_outcome(pki, offer: list[str] | None, **tls_fields) -> Outcome:
    client = client_context(pki)
    if offer is not None:
        client.set_alpn_protocols(offer)
    return handshake(ServerTLS.from_config(config_for(pki.server, **tls_fields)), client)


def test_alpn_picks_h2_first_and_http11_for_the_rest(pki):
    assert alpn_outcome(pki, ["h2", "http/1.1"]).alpn == "h2"
    assert alpn_outcome(pki, ["http/1.1", "h2"]).alpn == "h2"  # our preference decides
    assert alpn_outcome(pki, ["http/1.1"]).alpn == "http/1.1"
    assert alpn_outcome(pki, ["http/1.0"]).alpn == "http/1.0"  # curl --http1.0 (served as HTTP/1.1 is)
    no_alpn = alpn_outcome(pki, None)
    assert no_alpn.accepted and no_alpn.alpn is None  # no offer at all: HTTP/1.1


def test_alpn_http11_only_listener_refuses_an_h2_only_client_with_an_alert(pki):
    assert alpn_outcome(pki, ["h2", "http/1.1"], alpn=("http/1.1",)).alpn == "http/1.1"
    refused = alpn_outcome(pki, ["h2"], alpn=("http/1.1",))
    assert not refused.accepted
    assert "NO APPLICATION PROTOCOL" in (refused.client_error or "").upper()
    assert "NO_APPLICATION_PROTOCOL" in (refused.server_error or "").upper()


def test_alpn_h2_only_listener_refuses_an_http11_only_client(pki):
    assert alpn_outcome(pki, ["h2"], alpn=("h2",)).alpn == "h2"
    assert "NO APPLICATION PROTOCOL" in (alpn_outcome(pki, ["http/1.1"], alpn=("h2",)).client_error or "").upper()


# --- resumption ------------------------------------------------------------------------


def resumed_twice(tls: ServerTLS, client: ssl.SSLContext) -> tuple[bool, bool]:
    first = handshake(tls, client)
    second = handshake(tls, client, session=first.session)
    assert first.accepted and second.accepted
    return first.session_reused, second.session_reused


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_session_tickets_on_resume(pki, max_version):
    tls = ServerTLS.from_config(config_for(pki.server, session_tickets=True))
    assert resumed_twice(tls, client_context(pki, max_version=max_version)) == (False, True)


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_session_tickets_off_means_no_resumption_at_all(pki, max_version):
    tls = ServerTLS.from_config(config_for(pki.server, session_tickets=False))
    assert tls.context.options & ssl.OP_NO_TICKET and tls.context.num_tickets == 0
    assert resumed_twice(tls, client_context(pki, max_version=max_version)) == (False, False)


def test_tls12_session_id_cache_would_resume_without_our_switch(pki):
    """The control for the test above: OP_NO_TICKET alone still resumes TLS 1.2 by
    session ID from OpenSSL's server cache, which is why from_config turns it off."""
    tls = ServerTLS.from_config(config_for(pki.server, session_tickets=True))
    tls.context.options |= ssl.OP_NO_TICKET
    assert resumed_twice(tls, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)) == (False, True)


# --- client certificates ---------------------------------------------------------------


def mtls_config(pki, mode="require", crl=None, pairs=None, services=None) -> ProxyConfig:
    return config_for(
        *(pairs or [pki.server]),
        services=services,
        client_auth=ClientAuthSettings(mode=mode, ca=pki.ca_pem, crl=crl),
    )


def test_require_refuses_no_cert_and_accepts_one_from_the_ca(pki):
    tls = ServerTLS.from_config(mtls_config(pki))
    assert tls.context.verify_mode == ssl.CERT_REQUIRED
    assert [c.subject for c in tls.client_cas] == [load_certificates(pki.ca_pem)[0].subject]
    refused = handshake(tls, client_context(pki))
    assert not refused.accepted and "certificate" in refused.server_error.lower()
    alice = pki.leaf("alice", "alice", client=True)
    accepted = handshake(tls, client_context(pki, cert=alice))
    assert accepted.accepted and accepted.client_cert_seen


def test_require_refuses_a_cert_from_an_unknown_ca_and_a_server_cert(pki):
    tls = ServerTLS.from_config(mtls_config(pki))
    stranger = pki.leaf("stranger", "stranger", client=True, ca="other")
    assert not handshake(tls, client_context(pki, cert=stranger)).accepted
    assert not handshake(tls, client_context(pki, cert=pki.server)).accepted  # EKU serverAuth only


def test_client_auth_applies_to_every_sni_context(pki, two_certs):
    tls = ServerTLS.from_config(mtls_config(pki, pairs=list(two_certs)))
    outcome = handshake(tls, client_context(pki), "web.example")
    assert not outcome.accepted and "certificate" in outcome.server_error.lower()
    alice = pki.leaf("alice", "alice", client=True)
    outcome = handshake(tls, client_context(pki, cert=alice), "web.example")
    assert outcome.accepted and outcome.peer_names == ("web.example", "*.web.example")


def test_revoked_client_cert_is_refused_with_the_crl(pki):
    revoked = pki.leaf("revoked", "revoked", client=True)
    good = pki.leaf("good", "good", client=True)
    tls = ServerTLS.from_config(mtls_config(pki, crl=pki.crl([revoked[0]])))
    assert tls.context.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    refused = handshake(tls, client_context(pki, cert=revoked))
    assert not refused.accepted and "revoked" in refused.server_error
    assert handshake(tls, client_context(pki, cert=good)).accepted


def test_crl_applies_on_the_sni_selected_context_too(pki, two_certs):
    revoked = pki.leaf("revoked", "revoked", client=True)
    tls = ServerTLS.from_config(mtls_config(pki, crl=pki.crl([revoked[0]]), pairs=list(two_certs)))
    refused = handshake(tls, client_context(pki, cert=revoked), "web.example")
    assert not refused.accepted and "revoked" in refused.server_error
    assert handshake(tls, client_context(pki, cert=pki.leaf("good", "good", client=True)), "web.example").accepted


def test_crl_from_another_ca_or_expired_is_a_config_error(pki, tmp_path):
    other_ca = load_certificates(pki.other_ca_pem)[0]
    foreign = tmp_path / "foreign.pem"
    other_key = ensure_ca(pki.other_ca_dir)[1]
    write_crl(foreign, make_crl(other_ca, other_key, [1]))
    error = error_of(mtls_config(pki, crl=foreign))
    assert error.key == "client_auth.crl" and "not signed by a CA in client_auth.ca" in error.reason

    now = dt.datetime.now(dt.timezone.utc)
    expired = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca_cert.subject)
        .last_update(now - dt.timedelta(days=10))
        .next_update(now - dt.timedelta(days=1))
        .sign(pki.ca_key, hashes.SHA256())
    )
    stale = tmp_path / "stale.pem"
    write_crl(stale, expired)
    error = error_of(mtls_config(pki, crl=stale))
    assert error.key == "client_auth.crl" and "expired" in error.reason


def test_optional_accepts_with_and_without_a_cert(pki):
    tls = ServerTLS.from_config(mtls_config(pki, mode="optional"))
    assert tls.context.verify_mode == ssl.CERT_OPTIONAL
    without = handshake(tls, client_context(pki))
    assert without.accepted and not without.client_cert_seen
    with_cert = handshake(tls, client_context(pki, cert=pki.leaf("alice", "alice", client=True)))
    assert with_cert.accepted and with_cert.client_cert_seen
    stranger = pki.leaf("stranger", "stranger", client=True, ca="other")
    assert not handshake(tls, client_context(pki, cert=stranger)).accepted


def test_mode_none_asks_for_a_cert_when_a_service_requires_one(pki):
    strict = Service(name="billing", upstreams=UPSTREAMS, client_auth=ServiceClientAuth(require=True))
    assert ServerTLS.from_config(mtls_config(pki, mode="none")).context.verify_mode == ssl.CERT_NONE
    tls = ServerTLS.from_config(mtls_config(pki, mode="none", services=(strict,)))
    assert tls.context.verify_mode == ssl.CERT_OPTIONAL
    assert handshake(tls, client_context(pki)).accepted
    assert handshake(tls, client_context(pki, cert=pki.leaf("alice", "alice", client=True))).client_cert_seen


# --- automatic certificates ------------------------------------------------------------


def auto_config(ca_dir: Path, *hosts: str) -> ProxyConfig:
    services = (Service(name="api", upstreams=UPSTREAMS, hosts=hosts),)
    return config_for(services=services, ca_dir=ca_dir)


def serial_of(loaded) -> int:
    return load_certificates(loaded.path)[0].serial_number


def test_auto_certificate_is_issued_once_and_reused(pki, tmp_path):
    ca_dir = tmp_path / "ca"
    tls = ServerTLS.from_config(auto_config(ca_dir, "api.localhost"))
    (loaded,) = tls.certificates
    assert loaded.auto and loaded.path == ca_dir / "auto" / "server.pem"
    assert set(loaded.names) == {"localhost", "api.localhost", "127.0.0.1", "::1"}
    assert (ca_dir / "ca.pem").exists() and (ca_dir / "auto" / "server.key").stat().st_mode & 0o077 == 0
    assert tls.renewal_due == loaded.not_after - dt.timedelta(days=30)
    assert serial_of(ServerTLS.from_config(auto_config(ca_dir, "api.localhost")).certificates[0]) == serial_of(loaded)

    client = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))  # full hostname check
    assert handshake(tls, client, "api.localhost").accepted


def test_workers_starting_together_share_one_auto_certificate(tmp_path):
    config = auto_config(tmp_path / "ca", "api.localhost")
    with ThreadPoolExecutor(4) as pool:
        built = [future.result(timeout=30) for future in [pool.submit(ServerTLS.from_config, config) for _ in range(4)]]
    client = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
    served = [handshake(tls, client, "api.localhost") for tls in built]
    assert all(outcome.accepted for outcome in served)
    assert len({outcome.peer_serial for outcome in served}) == 1


def test_auto_certificate_is_reissued_for_new_hosts_or_near_expiry(tmp_path):
    ca_dir = tmp_path / "ca"
    first = serial_of(ServerTLS.from_config(auto_config(ca_dir, "api.localhost")).certificates[0])
    second = ServerTLS.from_config(auto_config(ca_dir, "api.localhost", "web.localhost")).certificates[0]
    assert serial_of(second) != first and "web.localhost" in second.names

    ca_cert, ca_key = ensure_ca(ca_dir)
    names = ["localhost", "127.0.0.1", "::1", "api.localhost", "web.localhost"]
    cert, key = issue_leaf(ca_cert, ca_key, names, days=10)
    write_leaf(ca_dir / "auto" / "server", cert, key, [ca_cert], force=True)
    renewed = ServerTLS.from_config(auto_config(ca_dir, "api.localhost", "web.localhost")).certificates[0]
    assert renewed.not_after - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=300)


def test_explicit_certificates_plus_auto_keep_the_explicit_one_first(pki, tmp_path):
    tls = ServerTLS.from_config(config_for(pki.leaf("api", "api.example"), auto=True, ca_dir=tmp_path / "ca"))
    assert [c.auto for c in tls.certificates] == [False, True]
    assert handshake(tls, client_context(pki)).accepted is False  # localhost: auto CA, not trusted here
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
    assert handshake(tls, trusted, "localhost").accepted


# --- errors ------------------------------------------------------------------------------


def error_of(config: ProxyConfig) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ServerTLS.from_config(config)
    return info.value


def test_missing_cert_file_names_the_key_and_the_file(pki, tmp_path):
    missing = tmp_path / "nope.pem"
    error = error_of(config_for((missing, pki.server[1])))
    assert error.key == "tls.certificates[0].cert" and str(missing) in str(error)
    assert str(error).startswith("/etc/proxy.yaml: tls.certificates[0].cert:")


def test_key_that_does_not_match_names_the_key(pki):
    other_key = pki.leaf("api", "api.example")[1]
    error = error_of(config_for(pki.server, (pki.server[0], other_key)))
    assert error.key == "tls.certificates[1].key" and "not the private key" in error.reason


def test_garbage_key_and_zero_config_source(pki, tmp_path):
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    error = error_of(config_for((pki.server[0], garbage), source=None))
    assert error.key == "tls.certificates[0].key" and str(error).startswith("<command line>:")


def test_bad_client_ca_and_crl_name_their_keys(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nothing here\n")
    config = config_for(pki.server, client_auth=ClientAuthSettings(mode="require", ca=garbage))
    assert error_of(config).key == "client_auth.ca"
    config = config_for(pki.server, client_auth=ClientAuthSettings(mode="require", ca=pki.ca_pem, crl=garbage))
    assert error_of(config).key == "client_auth.crl"
    config = config_for(pki.server, client_auth=ClientAuthSettings(mode="require"))
    assert error_of(config).key == "client_auth.ca"


def test_a_file_error_found_at_start_names_the_line_of_its_key(pki, tmp_path):
    """SPEC section 6: a certificate invalid at start is reported with file, line and key."""
    config_file = tmp_path / "proxy.yaml"
    config_file.write_text(
        "listen: [127.0.0.1:0]\n"
        "tls:\n"
        "  certificates:\n"
        f"    - cert: {tmp_path / 'nope.pem'}\n"
        f"      key: {pki.server[1]}\n"
        "services:\n"
        "  - {name: app, upstream: http://127.0.0.1:9}\n"
    )
    error = error_of(load_config(config_file))
    assert str(error).startswith(f"{config_file}:4: tls.certificates[0].cert:")
