"""gRPC end to end: a grpcio client over TLS (with a client certificate) -> the proxy ->
an ``h2c://`` grpcio server. Every kind of call, trailers and statuses passed through,
cancellation passed on, and the proxy's own answers given as gRPC statuses."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed (pip install -e '.[test]')")

from grpc_upstream import SERVICE, GrpcUpstream  # noqa: E402
from upstream import ProxyThread, TestUpstream, proxy_config, service  # noqa: E402

from proxy.config.model import (  # noqa: E402
    AllowEntry,
    ClientAuthSettings,
    ListenAddress,
    ServiceClientAuth,
    Timeouts,
    UpstreamTLSSettings,
)
from proxy.config.values import parse_upstream  # noqa: E402

WAIT = 10.0


@pytest.fixture
def grpc_upstream() -> Iterator[GrpcUpstream]:
    with GrpcUpstream() as server:
        yield server


def channel(pki, port: int, cert: tuple[Path, Path] | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(pki.ca_pem).read_bytes(),
        private_key=Path(cert[1]).read_bytes() if cert else None,
        certificate_chain=Path(cert[0]).read_bytes() if cert else None,
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)


def call(chan: grpc.Channel, method: str, kind: str = "unary_unary"):
    return getattr(chan, kind)(f"/{SERVICE}/{method}")


def grpc_proxy(pki, tmp_path, *services, **overrides) -> ProxyThread:
    client_auth = ClientAuthSettings(mode="optional", ca=pki.ca_pem)
    return ProxyThread(proxy_config(pki, list(services), tmp_path, client_auth=client_auth, **overrides))


def grpc_service(name: str, url: str, **fields):
    return service(name, parse_upstream(url), **fields)


def test_unary_call_with_a_client_certificate_reaches_the_upstream_with_its_identity(pki, tmp_path, grpc_upstream):
    alice = pki.leaf("grpc-alice", client=True, cn="alice")
    with grpc_proxy(pki, tmp_path, grpc_service("grpc", grpc_upstream.url)) as px, channel(pki, px.port, alice) as chan:
        reply, state = call(chan, "Unary").with_call(b"hello", timeout=WAIT, metadata=(("x-trace", "t1"),))
    assert reply == b"hello"
    seen = dict(state.trailing_metadata())
    assert 'Subject="CN=alice"' in seen["seen-x-forwarded-client-cert"]
    assert seen["seen-x-trace"] == "t1" and seen["seen-x-forwarded-proto"] == "https"
    # (grpc-core refuses a call without "te: trailers"; the proxy keeps it for HTTP/2 upstreams)


def test_streaming_calls_of_every_kind(pki, tmp_path, grpc_upstream):
    with grpc_proxy(pki, tmp_path, grpc_service("grpc", grpc_upstream.url)) as px, channel(pki, px.port) as chan:
        replies = list(call(chan, "ServerStream", "unary_stream")(b"200:4096", timeout=WAIT))
        assert [len(reply) for reply in replies] == [4096] * 200
        assert [reply[0] for reply in replies] == [index % 256 for index in range(200)]
        sent = (bytes([index]) * 1000 for index in range(150))
        assert call(chan, "ClientStream", "stream_unary")(sent, timeout=WAIT) == b"150:150000"
        messages = [f"message {index}".encode() * 50 for index in range(100)]
        assert list(call(chan, "Bidi", "stream_stream")(iter(messages), timeout=WAIT)) == messages


def test_large_messages_both_ways_pass_the_flow_control_windows(pki, tmp_path, grpc_upstream):
    big = bytes(range(256)) * (16 * 1024)  # 4 MiB: many times every window on the way
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc_proxy(pki, tmp_path, grpc_service("grpc", grpc_upstream.url)) as px:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(pki.ca_pem).read_bytes())
        with grpc.secure_channel(f"localhost:{px.port}", credentials, options=options) as chan:
            assert call(chan, "Unary")(big, timeout=WAIT) == big


def test_an_aborted_call_arrives_with_its_status_message_and_trailing_metadata(pki, tmp_path, grpc_upstream):
    with grpc_proxy(pki, tmp_path, grpc_service("grpc", grpc_upstream.url)) as px, channel(pki, px.port) as chan:
        with pytest.raises(grpc.RpcError) as failure:
            call(chan, "Abort")(b"x", timeout=WAIT)
    error = failure.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error.details() == "nope: x"
    assert ("x-why", "because") in tuple(error.trailing_metadata())


def test_a_cancelled_call_is_cancelled_upstream(pki, tmp_path, grpc_upstream):
    with grpc_proxy(pki, tmp_path, grpc_service("grpc", grpc_upstream.url)) as px, channel(pki, px.port) as chan:
        responses = call(chan, "Slow", "unary_stream")(b"", timeout=WAIT)
        assert next(responses) == b"started"
        responses.cancel()
        assert grpc_upstream.cancelled.wait(WAIT)  # RST_STREAM went on to the upstream
        assert call(chan, "Unary")(b"still", timeout=WAIT) == b"still"  # the connection serves on


def status_of(chan: grpc.Channel, method: str = "Unary") -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failure:
        call(chan, method)(b"x", timeout=WAIT)
    return failure.value.code(), failure.value.details()


def test_the_proxys_own_answers_are_grpc_statuses(pki, tmp_path, grpc_upstream, upstream: TestUpstream):
    alice = pki.leaf("grpc-alice", client=True, cn="alice")
    bob = pki.leaf("grpc-bob", client=True, cn="bob")
    services = [
        grpc_service("strict", grpc_upstream.url, path_prefix="/test.Echo/",
                     client_auth=ServiceClientAuth(require=True, allow=(AllowEntry("cn", "alice"),))),
        grpc_service("down", "h2c://127.0.0.1:9", path_prefix="/down.Echo/"),
        service("http1", upstream, path_prefix="/old.Echo/"),
    ]
    with grpc_proxy(pki, tmp_path, *services) as px:
        with channel(pki, px.port, alice) as chan:
            assert call(chan, "Unary")(b"ok", timeout=WAIT) == b"ok"  # the admitted twin
            code, details = status_of(chan, "Nope")  # (same prefix: the upstream's own UNIMPLEMENTED)
            assert code == grpc.StatusCode.UNIMPLEMENTED
            assert chan.unary_unary("/missing.Svc/Call") is not None
            with pytest.raises(grpc.RpcError) as failure:
                chan.unary_unary("/missing.Svc/Call")(b"x", timeout=WAIT)
            assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "no service for host" in failure.value.details()
            with pytest.raises(grpc.RpcError) as failure:
                chan.unary_unary("/down.Echo/Unary")(b"x", timeout=WAIT)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and "'down'" in failure.value.details()
            with pytest.raises(grpc.RpcError) as failure:
                chan.unary_unary("/old.Echo/Unary")(b"x", timeout=WAIT)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and "h2c://" in failure.value.details()
        with channel(pki, px.port, bob) as chan:
            code, details = status_of(chan)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "CN=bob" in details
        with channel(pki, px.port) as chan:
            code, details = status_of(chan)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "no client certificate" in details


def test_an_upstream_too_slow_is_deadline_exceeded(pki, tmp_path, grpc_upstream):
    timeouts = Timeouts(upstream_response=0.5)
    with grpc_proxy(pki, tmp_path, grpc_service("grpc", grpc_upstream.url), timeouts=timeouts) as px:
        with channel(pki, px.port) as chan:
            responses = call(chan, "Slow", "unary_stream")(b"", timeout=WAIT)
            assert next(responses) == b"started"
            with pytest.raises(grpc.RpcError) as failure:
                next(responses)
    # The head came in time; the rest did not: the stream is reset, and the client
    # sees the call fail (not a success with a missing message).
    assert failure.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


# -- the sidecar pair over gRPC: insecure channel -> egress (h2c on listen_plain) ->
#    mTLS (https:// with http2) -> ingress (client_auth require + allow-list) -> h2c server

PLAIN = (ListenAddress("127.0.0.1", 0),)


def ingress_proxy(pki, tmp_path: Path, grpc_upstream: GrpcUpstream) -> ProxyThread:
    folder = tmp_path / "ingress"
    folder.mkdir()
    client_auth = ClientAuthSettings(mode="require", ca=pki.ca_pem, allow=(AllowEntry("cn", "egress"),))
    return ProxyThread(proxy_config(pki, grpc_service("app", grpc_upstream.url), folder, client_auth=client_auth))


def egress_proxy(pki, tmp_path: Path, ingress_port: int, cn: str) -> ProxyThread:
    folder = tmp_path / f"egress-{cn}"
    folder.mkdir()
    cert, key = pki.leaf(cn, cn, client=True, cn=cn)
    remote = service(
        "remote", parse_upstream(f"https://127.0.0.1:{ingress_port}"),
        upstream_tls=UpstreamTLSSettings(ca=pki.ca_pem, cert=cert, key=key, http2=True),
    )
    return ProxyThread(proxy_config(pki, remote, folder, listen_plain=PLAIN))


def test_an_insecure_grpc_client_gets_mtls_through_the_sidecar_pair(pki, tmp_path, grpc_upstream):
    with ingress_proxy(pki, tmp_path, grpc_upstream) as ingress:
        with egress_proxy(pki, tmp_path, ingress.port, "egress") as egress:
            plain_port = egress.running.plain_addresses[0][1]
            with grpc.insecure_channel(f"127.0.0.1:{plain_port}") as chan:
                reply, state = call(chan, "Unary").with_call(b"across", timeout=WAIT)
                assert list(call(chan, "Bidi", "stream_stream")(iter([b"a", b"b"]), timeout=WAIT)) == [b"a", b"b"]
        with egress_proxy(pki, tmp_path, ingress.port, "stranger") as egress:  # the refused twin
            plain_port = egress.running.plain_addresses[0][1]
            with grpc.insecure_channel(f"127.0.0.1:{plain_port}") as chan:
                code, details = status_of(chan)
    assert reply == b"across"
    assert 'Subject="CN=egress"' in dict(state.trailing_metadata())["seen-x-forwarded-client-cert"]
    assert code == grpc.StatusCode.PERMISSION_DENIED and "CN=stranger" in details


def test_h2c_prior_knowledge_and_http11_share_a_plain_listener(pki, tmp_path, grpc_upstream, upstream):
    services = [grpc_service("grpc", grpc_upstream.url, path_prefix="/test.Echo/"), service("web", upstream)]
    with ProxyThread(proxy_config(pki, services, tmp_path, listen_plain=PLAIN)) as px:
        plain_port = px.running.plain_addresses[0][1]
        with grpc.insecure_channel(f"127.0.0.1:{plain_port}") as chan:
            assert call(chan, "Unary")(b"h2c", timeout=WAIT) == b"h2c"
        conn = http.client.HTTPConnection("127.0.0.1", plain_port, timeout=WAIT)
        try:
            conn.request("GET", "/echo")
            response = conn.getresponse()
            assert response.status == 200 and "headers" in json.loads(response.read())
        finally:
            conn.close()
