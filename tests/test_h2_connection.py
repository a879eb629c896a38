"""The HTTP/2 connection as a whole: ALPN (SPEC 3 ``tls.alpn``) and draining (SPEC 4a:
GOAWAY, open streams finish, new ones refused)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from pathlib import Path

import h2.errors
import pytest
from h2client import H2Client, client_context
from upstream import WAIT, ProxyThread, proxy_config, proxy_log_waiter, recv_until_closed, service

from proxy.config.model import CertificatePair, TLSSettings


def http11_only(pki, upstream, tmp_path) -> ProxyThread:
    cert, key = pki.server
    tls = TLSSettings(certificates=(CertificatePair(Path(cert), Path(key)),), alpn=("http/1.1",))
    return ProxyThread(proxy_config(pki, service("app", upstream), tmp_path, tls=tls))


def handshake(pki, port: int, alpn: tuple[str, ...]) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return client_context(pki, alpn=alpn).wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def test_an_h2_only_client_on_an_http11_listener_gets_no_application_protocol(pki, upstream, tmp_path):
    with proxy_log_waiter("TLS handshake with") as waiter, http11_only(pki, upstream, tmp_path) as px:
        with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
            handshake(pki, px.port, ("h2",))
        assert waiter.seen.wait(WAIT), waiter.messages
        line = next(m for m in waiter.messages if "TLS handshake with" in m)
        assert "ALPN" in line and "alpn: [http/1.1]" in line, line
    assert upstream.accepts == 0


@pytest.mark.both_engines
def test_a_client_offering_h2_and_http11_gets_http11_there(pki, upstream, tmp_path):
    with http11_only(pki, upstream, tmp_path) as px:
        with handshake(pki, px.port, ("h2", "http/1.1")) as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = recv_until_closed(tls)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert len(upstream.requests) == 1


def test_the_default_listener_chooses_h2(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        with H2Client(pki, px.port) as client:  # asserts ALPN h2
            assert client.response(client.request("/echo")).status == 200
    line = json.loads((tmp_path / "access.log").read_text().splitlines()[0])
    assert line["protocol"] == "HTTP/2"


@pytest.mark.both_engines
def test_draining_sends_goaway_finishes_the_open_stream_and_refuses_new_ones(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px, \
            H2Client(pki, px.port) as client:
        client.survive_goaway()
        held = client.request("/held")
        assert upstream.holding.wait(WAIT)
        closing = asyncio.run_coroutine_threadsafe(px.running.close(10.0), px.loop)  # SIGTERM, in process
        goaway = client.wait_goaway()
        assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        assert goaway.last_stream_id >= held
        late = client.request("/echo")  # opened after the GOAWAY, while the held one runs
        refused = client.response(late)
        assert refused.status is None and refused.reset == h2.errors.ErrorCodes.REFUSED_STREAM, refused
        upstream.let_go()
        answer = client.response(held)
        assert answer.status == 200 and answer.ended, answer
        assert json.loads(answer.body)["target"] == "/held"  # the whole body
        client.read_until_closed()  # the proxy closes once the held stream is done
        assert client.closed
        closing.result(WAIT)
    assert [r["target"] for r in upstream.requests] == ["/held"]
