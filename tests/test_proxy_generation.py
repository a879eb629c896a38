"""Config generations: a reload publishes one new generation and every next request is
decided by it, even on a connection opened before (SPEC section 4, reload bullet).
What a reload cannot change is logged as needing a restart; the expiry gauge follows
the certificates the new generation serves."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from test_metrics import parse_exposition
from upstream import WAIT, ProxyThread, proxy_config, proxy_log_waiter, service

from proxy.config.model import (
    AllowEntry, CertificatePair, ClientAuthSettings, Limits, ListenAddress, ServiceClientAuth, TLSSettings,
)
from proxy.pki.build import issue_leaf, make_crl
from proxy.pki.store import load_certificates, write_leaf

pytestmark = pytest.mark.both_engines


def allow(*names: str) -> ServiceClientAuth:
    return ServiceClientAuth(require=True, allow=tuple(AllowEntry("cn", name) for name in names))


@pytest.fixture
def alice(pki):
    return pki.leaf("alice", "alice@example.com", client=True, cn="alice")


def config_for(pki, upstream, tmp_path, policy: ServiceClientAuth, forward: str = "xfcc"):
    client_auth = ClientAuthSettings(mode="optional", ca=pki.ca_pem, forward=forward)
    return proxy_config(pki, service("private", upstream, client_auth=policy), tmp_path, client_auth=client_auth)


class Client:
    """One keep-alive TLS connection presenting ``cert``; ``socket`` must never change."""

    def __init__(self, pki, port: int, cert) -> None:
        context = ssl.create_default_context(cafile=str(pki.ca_pem))
        context.load_cert_chain(str(cert[0]), str(cert[1]))
        self.http = http.client.HTTPSConnection("localhost", port, context=context, timeout=WAIT)
        self.http.connect()
        self.socket = self.http.sock

    def get(self, path: str) -> tuple[int, bytes]:
        self.http.request("GET", path)
        response = self.http.getresponse()
        body = response.read()
        assert self.http.sock is self.socket, "the proxy closed the keep-alive connection"
        return response.status, body

    def close(self) -> None:
        self.http.close()


@contextlib.contextmanager
def connected(pki, config, cert) -> Iterator[tuple[ProxyThread, Client]]:
    """A proxy running ``config`` and one keep-alive ``Client`` to it presenting ``cert``."""
    with ProxyThread(config) as px:
        client = Client(pki, px.port, cert)
        try:
            yield px, client
        finally:
            client.close()


async def _reload(px: ProxyThread, config) -> bool:
    return px.running.reload(config)


async def _reload_async(px: ProxyThread, config) -> bool:
    return await px.running.reload_async(config)


@pytest.mark.parametrize("how", [_reload, _reload_async], ids=["sync", "async"])
def test_reload_that_narrows_the_allow_list_refuses_the_next_request_on_an_open_connection(
    pki, upstream, tmp_path, alice, how
):
    config = config_for(pki, upstream, tmp_path, allow("alice", "bob"))
    with connected(pki, config, alice) as (px, client):
        assert client.get("/echo")[0] == 200
        assert px.call(how(px, config_for(pki, upstream, tmp_path, allow("bob")))) is True
        status, body = client.get("/echo")
        assert status == 403 and b"CN=alice" in body
    assert len(upstream.requests) == 1


def test_a_client_still_allowed_after_the_reload_keeps_its_connection(pki, upstream, tmp_path, alice):
    config = config_for(pki, upstream, tmp_path, allow("alice", "bob"))
    with connected(pki, config, alice) as (px, client):
        assert client.get("/echo")[0] == 200
        assert px.call(_reload(px, config_for(pki, upstream, tmp_path, allow("alice")))) is True
        assert client.get("/echo")[0] == 200
    assert upstream.accepts == 1 and len(upstream.requests) == 2


def test_identity_headers_are_rendered_again_after_a_reload_changes_forward(pki, upstream, tmp_path, alice):
    config = config_for(pki, upstream, tmp_path, allow("alice"), forward="xfcc")
    with connected(pki, config, alice) as (px, client):
        before = dict(json.loads(client.get("/echo")[1])["headers"])
        assert "x-forwarded-client-cert" in before
        reloaded = config_for(pki, upstream, tmp_path, allow("alice"), forward="headers")
        assert px.call(_reload(px, reloaded)) is True
        after = dict(json.loads(client.get("/echo")[1])["headers"])
    assert "x-forwarded-client-cert" not in after
    assert after["x-client-cert-subject"] == "CN=alice"


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda c: dataclasses.replace(c, limits=dataclasses.replace(c.limits, max_connections=7)),
         "limits.max_connections"),
        (lambda c: dataclasses.replace(c, workers=3), "workers"),
        (lambda c: dataclasses.replace(c, listen_plain=(ListenAddress("127.0.0.1", 0),)), "listen_plain"),
    ],
    ids=["max_connections", "workers", "listen_plain"],
)
def test_settings_that_need_a_restart_are_logged_and_the_rest_applies(pki, upstream, tmp_path, change, name):
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_connections=50))
    with ProxyThread(config) as px:
        changed = change(dataclasses.replace(config, limits=dataclasses.replace(config.limits, max_body_bytes=10)))
        with proxy_log_waiter("takes a restart") as waiter:
            assert px.call(_reload(px, changed)) is True
        assert waiter.seen.is_set(), waiter.messages
        assert name in next(m for m in waiter.messages if "takes a restart" in m)
        published = px.running.state.generation.config
        assert published.limits.max_body_bytes == 10  # the rest of the new config applies
        assert published.limits.max_connections == 50 and published.workers == 1  # what still runs
        assert published.listen_plain == () and px.running.plain_addresses == []


def test_the_not_after_gauge_follows_the_certificates_of_a_reload(pki, upstream, tmp_path):
    not_after = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=10)
    cert, key = issue_leaf(
        pki.ca_cert, pki.ca_key, ["localhost", "127.0.0.1"],
        not_before=not_after - dt.timedelta(days=90), not_after=not_after,
    )
    short = write_leaf(tmp_path / "short", cert, key, [pki.ca_cert])
    config = proxy_config(pki, service("app", upstream), tmp_path)
    with ProxyThread(config) as px:
        metrics = px.running.state.metrics
        before = parse_exposition(metrics.render())["tlsproxy_certificate_not_after_seconds"]["samples"]
        assert [labels["path"] for _name, labels, _value in before] == [str(pki.server[0])]
        tls = TLSSettings(certificates=(CertificatePair(short[0], short[1]),))
        with proxy_log_waiter("expires in") as waiter:
            assert px.call(_reload(px, dataclasses.replace(config, tls=tls))) is True
        after = parse_exposition(metrics.render())["tlsproxy_certificate_not_after_seconds"]["samples"]
        assert [(labels["path"], value) for _name, labels, value in after] == [(str(short[0]), not_after.timestamp())]
        assert waiter.seen.is_set(), waiter.messages  # the 10-day certificate is warned about at once


@pytest.mark.parametrize("revoke_alice", [True, False], ids=["alice-revoked", "bob-revoked"])
def test_a_reloaded_crl_applies_to_open_connections(pki, upstream, tmp_path, alice, revoke_alice):
    """A certificate revoked by a reloaded CRL is refused on the next request of a
    connection whose handshake accepted it; revoking someone else changes nothing."""
    bob = pki.leaf("bob", client=True, cn="bob")
    config = config_for(pki, upstream, tmp_path, allow("alice"))
    with connected(pki, config, alice) as (px, client):
        assert client.get("/echo")[0] == 200
        crl = pki.crl([alice[0] if revoke_alice else bob[0]])
        revoked = dataclasses.replace(config, client_auth=dataclasses.replace(config.client_auth, crl=crl))
        with proxy_log_waiter("no longer accepted") as waiter:
            assert px.call(_reload(px, revoked)) is True
            status, body = client.get("/echo")
    if revoke_alice:
        assert status == 403 and b"certificate" in body
        assert any("revoked" in message for message in waiter.messages), waiter.messages
    else:
        assert status == 200 and not waiter.seen.is_set()


def test_a_reloaded_crl_for_the_second_ca_of_a_bundle_applies_to_open_connections(pki, upstream, tmp_path):
    """A CRL file may hold one CRL per trusted CA: open connections are re-checked against
    their issuer's CRL (the generation once took the file's first CRL only, so carol was
    refused as "revocation status unknown" even when nobody had revoked her)."""
    carol = pki.leaf("carol", client=True, cn="carol", ca="other")
    bob = pki.leaf("bob", client=True, cn="bob")
    bundle = tmp_path / "two-cas.pem"
    bundle.write_bytes(pki.ca_pem.read_bytes() + pki.other_ca_pem.read_bytes())
    client_auth = ClientAuthSettings(mode="optional", ca=bundle)
    config = proxy_config(pki, service("private", upstream, client_auth=allow("carol")), tmp_path, client_auth=client_auth)
    other_cert, other_key = pki._cas["other"]

    def crls(revoked_by_other: list) -> Path:
        path = tmp_path / f"crls-{len(revoked_by_other)}.pem"
        first = make_crl(pki.ca_cert, pki.ca_key, [load_certificates(bob[0])[0].serial_number])
        second = make_crl(other_cert, other_key, [load_certificates(c[0])[0].serial_number for c in revoked_by_other])
        path.write_bytes(b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in (first, second)))
        return path

    with ProxyThread(config) as px:
        context = ssl.create_default_context(cafile=str(pki.ca_pem))
        context.load_cert_chain(str(carol[0]), str(carol[1]))
        conn = http.client.HTTPSConnection("localhost", px.port, context=context, timeout=WAIT)
        conn.connect()  # the handshake under the first generation: both reloads re-check it
        try:
            statuses = []
            for revoked in ([], [carol]):  # the twin first: the other CA's CRL revokes nobody
                reload_to = dataclasses.replace(config, client_auth=dataclasses.replace(client_auth, crl=crls(revoked)))
                assert px.call(_reload(px, reload_to)) is True
                conn.request("GET", "/echo")
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            conn.close()
    assert statuses == [200, 403]
