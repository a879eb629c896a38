"""Handshake failures -> (counter key, words), checked against real handshakes.

Each case runs a server-side ``ssl`` handshake in a thread on 127.0.0.1 port 0 (CERT_REQUIRED,
the session CA, a CRL) while the test plays the client, then feeds the server's exception to
``describe_handshake_failure``. Every wait is bounded by a socket timeout or a join timeout.
"""

from __future__ import annotations

import socket
import ssl
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from proxy.pki.store import load_certificates
from proxy.tls.handshake import HANDSHAKE_FAILURE_KEYS, describe_handshake_failure
from proxy.tls.identity import ClientIdentity, client_identity

WAIT = 5.0  # upper bound for any socket wait; the happy path takes milliseconds

Client = Callable[[socket.socket], None]


@dataclass
class ServerOutcome:
    error: BaseException | None = None
    identity: ClientIdentity | None = None


def server_context(pki, crl, *, tls12_cipher: str | None = None) -> ssl.SSLContext:
    """The shape the proxy's listener uses: client certs required, CRL checked for the leaf."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.server)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki.ca_pem)
    context.load_verify_locations(crl)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if tls12_cipher:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(tls12_cipher)
    return context


def run_handshake(pki, context: ssl.SSLContext, client: Client, *, server_timeout: float = WAIT) -> ServerOutcome:
    """Serve one handshake with ``context`` while ``client`` drives a connected socket."""
    outcome = ServerOutcome()
    trusted = load_certificates(pki.ca_pem)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(WAIT)

        def serve() -> None:
            try:
                conn, _addr = listener.accept()
            except OSError as exc:
                outcome.error = exc
                return
            with conn:
                conn.settimeout(server_timeout)
                try:
                    tls = context.wrap_socket(conn, server_side=True)
                except Exception as exc:  # the exception under study
                    outcome.error = exc
                    return
                with tls:
                    outcome.identity = client_identity(tls, trusted)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=WAIT) as raw:
            try:
                client(raw)
            except (ssl.SSLError, OSError):
                pass  # the client's view of a refusal is not what is tested here
        thread.join(WAIT * 2)
        assert not thread.is_alive(), "server thread did not finish"
    return outcome


def tls_client(
    pki,
    cert: tuple | None = None,
    *,
    trust=None,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> Client:
    """A client that handshakes (optionally with a certificate) and waits for the server's verdict."""

    def drive(raw: socket.socket) -> None:
        with warnings.catch_warnings():
            # Pinning TLS 1.1 is deprecated in Python; here it is the point of the test.
            warnings.simplefilter("ignore", DeprecationWarning)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(trust or pki.ca_pem)
            if cert:
                context.load_cert_chain(*cert)
            if ciphers:
                context.set_ciphers(ciphers)
            if version:
                context.minimum_version = context.maximum_version = version
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.recv(1)  # TLS 1.3 learns of a refused client certificate only here

    return drive


def raw_client(data: bytes) -> Client:
    def drive(raw: socket.socket) -> None:
        if data:
            raw.sendall(data)
        raw.recv(1)  # until the server answers or closes

    return drive


@pytest.fixture(scope="module")
def revoked(pki):
    return pki.leaf("revoked-client", client=True, cn="revoked")


@pytest.fixture(scope="module")
def context(pki, revoked) -> ssl.SSLContext:
    return server_context(pki, pki.crl([revoked[0]]))


def failure(outcome: ServerOutcome) -> tuple[str, str]:
    assert outcome.error is not None, "the handshake unexpectedly succeeded"
    return describe_handshake_failure(outcome.error)


# --- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_trusted_client_certificate_is_accepted(pki, context, version):
    alice = pki.leaf("alice", client=True, cn="alice")
    outcome = run_handshake(pki, context, tls_client(pki, alice, version=version))
    assert outcome.error is None
    assert outcome.identity is not None and outcome.identity.common_names == ("alice",)
    assert len(outcome.identity.chain_der) == 1  # the session CA, found in the bundle


# --- refused: one real handshake per reason ----------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_no_certificate(pki, context, version):
    key, words = failure(run_handshake(pki, context, tls_client(pki, None, version=version)))
    assert key == "no_certificate" and "no certificate" in words


@pytest.mark.parametrize(
    ("options", "key", "words"),
    [
        ({"ca": "other"}, "unknown_ca", "trusted"),  # code 19: the client sends its CA along
        ({"expired": True}, "expired", "has expired"),
        ({"not_yet_valid": True}, "not_yet_valid", "not yet valid"),
    ],
    ids=["unknown_ca", "expired", "not_yet_valid"],
)
def test_client_certificate_refused_by_verification(pki, context, options, key, words):
    cert = pki.leaf(f"bad-{key}".replace("_", "-"), client=True, **options)
    described = failure(run_handshake(pki, context, tls_client(pki, cert)))
    assert described[0] == key and words in described[1]


def test_unknown_ca_with_the_leaf_alone(pki, context, tmp_path):
    """A client sending only its leaf (curl --cert leaf.pem) gets OpenSSL's code 20."""
    cert_path, key_path = pki.leaf("eve", client=True, ca="other")
    leaf_only = tmp_path / "eve-leaf.pem"
    leaf_only.write_bytes(cert_path.read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
    described = failure(run_handshake(pki, context, tls_client(pki, (leaf_only, key_path))))
    assert described[0] == "unknown_ca" and "not issued by a trusted CA" in described[1]


def test_revoked(pki, context, revoked):
    assert failure(run_handshake(pki, context, tls_client(pki, revoked))) == (
        "revoked",
        "client certificate is revoked (certificate revoked)",
    )


def test_a_server_only_eku_is_refused_by_the_handshake_itself(pki, context):
    """OpenSSL's server side checks the client purpose: no post-handshake EKU check needed."""
    key, words = failure(run_handshake(pki, context, tls_client(pki, pki.server)))
    assert key == "wrong_purpose" and "EKU" in words


def test_tls_1_1_is_refused(pki, context):
    alice = pki.leaf("alice", client=True, cn="alice")
    client = tls_client(pki, alice, version=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")
    assert failure(run_handshake(pki, context, client))[0] == "protocol_version"


def test_no_shared_cipher(pki, revoked):
    narrow = server_context(pki, pki.crl([revoked[0]]), tls12_cipher="ECDHE-ECDSA-AES128-GCM-SHA256")
    client = tls_client(pki, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")
    assert failure(run_handshake(pki, narrow, client))[0] == "no_shared_cipher"


def test_plain_http(pki, context):
    outcome = run_handshake(pki, context, raw_client(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    assert failure(outcome) == ("plain_http", "client sent plain HTTP to the TLS port")


def test_bytes_that_are_not_tls(pki, context):
    assert failure(run_handshake(pki, context, raw_client(b"\x16\x03\x01\x00\x05hello")))[0] == "malformed"


def test_client_refusing_the_server_certificate(pki, context):
    alice = pki.leaf("alice", client=True, cn="alice")
    key, words = failure(run_handshake(pki, context, tls_client(pki, alice, trust=pki.other_ca_pem)))
    assert key == "client_alert" and "refused the server certificate" in words


def test_client_closing_before_hello(pki, context):
    assert failure(run_handshake(pki, context, lambda raw: None))[0] == "client_closed"


def test_client_silent_until_the_timeout(pki, context):
    outcome = run_handshake(pki, context, raw_client(b""), server_timeout=0.2)
    assert failure(outcome) == ("timeout", "client did not finish the handshake in time")


# --- shapes that need no socket -------------------------------------------------------------


def test_asyncio_handshake_timeout_message():
    # asyncio's and uvloop's ssl_handshake_timeout abort with this exception and wording
    exc = ConnectionAbortedError("SSL handshake is taking longer than 10.0 seconds: aborting the connection")
    assert describe_handshake_failure(exc)[0] == "timeout"


@pytest.mark.parametrize(
    ("exc", "key"),
    [(ConnectionResetError(104, "reset"), "client_closed"), (BrokenPipeError(), "client_closed"),
     (RuntimeError("boom"), "other")],
)
def test_other_exceptions(exc, key):
    assert describe_handshake_failure(exc)[0] == key


def test_unlisted_verify_code_is_a_bad_certificate():
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code, exc.verify_message = 7, "certificate signature failure"
    assert describe_handshake_failure(exc) == (
        "bad_certificate",
        "client certificate refused: certificate signature failure",
    )


def test_every_key_is_declared():
    exc = ssl.SSLError(1, "odd")
    exc.reason = "SOMETHING_NEW"
    key, words = describe_handshake_failure(exc)
    assert key == "other" and "odd" in words
    assert key in HANDSHAKE_FAILURE_KEYS
