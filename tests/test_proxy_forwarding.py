"""Forwarding through a real proxy (TLS on 127.0.0.1 port 0) to a real upstream, with
real clients: requests, httpx, curl and node."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading

import httpx
import pytest
import requests
from upstream import (
    WAIT,
    ProxyThread,
    RawUpstream,
    TestUpstream,
    pattern,
    pattern_sha256,
    proxy_config,
    recv_head,
    service,
    tls_connect,
)

from proxy.config.model import AdminSettings, ListenAddress, Timeouts, Upstream

pytestmark = pytest.mark.both_engines  # every test here runs on h11 and on httptools

MiB = 1 << 20


@pytest.fixture
def session(pki):
    with requests.Session() as s:
        s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify
        s.verify = str(pki.ca_pem)
        yield s


def upstream_headers(response) -> dict[str, str]:
    return {name: value for name, value in response.json()["headers"]}


def curl(*args: str, pki, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(WAIT), "--cacert", str(pki.ca_pem), *args],
        capture_output=True, timeout=WAIT + 5, check=check,
    )


def test_get_is_forwarded_with_forwarding_headers(proxy, session, upstream):
    response = session.get(
        proxy.url("/echo?x=1"),
        headers={"Connection": "keep-alive, X-Hop", "X-Hop": "secret", "Keep-Alive": "timeout=5",
                 "TE": "trailers", "X-Forwarded-For": "10.0.0.1", "X-Keep": "yes"},
        timeout=WAIT,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["target"] == "/echo?x=1"
    seen = upstream_headers(response)
    assert seen["host"] == f"localhost:{proxy.port}"
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-port"] == str(proxy.port)
    assert seen["x-forwarded-host"] == f"localhost:{proxy.port}"
    assert "for=" in seen["forwarded"] and "proto=https" in seen["forwarded"]
    assert len(seen["x-request-id"]) >= 16
    assert seen["x-keep"] == "yes"
    for hop in ("x-hop", "keep-alive", "te", "connection"):
        assert hop not in seen


def test_client_request_id_is_kept_and_set_headers_apply(pki, upstream, tmp_path, session):
    app = service("app", upstream, set_headers=(("X-Env", "dev"), ("User-Agent", "tlsproxy-test")))
    with ProxyThread(proxy_config(pki, app, tmp_path)) as px:
        response = session.get(px.url("/echo"), headers={"X-Request-Id": "abc-123"}, timeout=WAIT)
    seen = upstream_headers(response)
    assert seen["x-request-id"] == "abc-123"
    assert seen["x-env"] == "dev" and seen["user-agent"] == "tlsproxy-test"


def test_keep_alive_reuses_upstream_connections(proxy, session, upstream):
    for _ in range(50):
        assert session.get(proxy.url("/echo"), timeout=WAIT).status_code == 200
    assert len(upstream.requests) == 50
    assert upstream.accepts <= 2  # one pooled connection carries them all


def test_separate_clients_share_pooled_upstream_connections(proxy, pki, upstream):
    for _ in range(10):
        with requests.Session() as s:  # a fresh client connection each time
            assert s.get(proxy.url("/echo"), verify=str(pki.ca_pem), timeout=WAIT).status_code == 200
    assert upstream.accepts == 1


def test_idle_upstream_connections_expire(pki, upstream, tmp_path, session):
    config = proxy_config(pki, service("app", upstream), tmp_path, timeouts=Timeouts(idle=0.2))
    with ProxyThread(config) as px:
        assert session.get(px.url("/echo"), timeout=WAIT).status_code == 200
        assert upstream.wait_closed_by_peer(1)  # the pool's sweeper closed it
        assert px.call(_idle_count(px)) == 0
        assert session.get(px.url("/echo"), timeout=WAIT).status_code == 200
    assert upstream.accepts == 2


async def _idle_count(px):
    return px.running.state.pool.idle_count()


def test_64mib_download_arrives_byte_exact(proxy, session):
    size = 64 * MiB
    with session.get(proxy.url(f"/download?size={size}"), stream=True, timeout=WAIT) as response:
        assert response.headers["content-length"] == str(size)
        digest = hashlib.sha256()
        received = 0
        for piece in response.iter_content(MiB):
            digest.update(piece)
            received += len(piece)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)


def test_chunked_download_is_reframed_and_exact(proxy, pki, tmp_path):
    size = 8 * MiB + 123
    out = tmp_path / "download"
    result = curl("-o", str(out), "-w", "%{http_code}", proxy.url(f"/download?size={size}&chunked=1"), pki=pki)
    assert result.stdout == b"200"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(size)


def test_close_delimited_response_is_reframed_for_keep_alive(proxy, session, upstream):
    size = 3 * MiB + 7
    response = session.get(proxy.url(f"/close-delimited?size={size}"), timeout=WAIT)
    assert response.headers.get("transfer-encoding") == "chunked"
    assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(size)
    assert session.get(proxy.url("/echo"), timeout=WAIT).status_code == 200  # client connection kept
    assert upstream.accepts == 2  # the upstream's close is not reused, a new connection follows


def test_a_response_head_needing_no_change_reaches_curl_as_the_upstream_spelled_it(proxy, pki, http_engine):
    """The upstream sends ``Content-Type`` / ``Content-Length`` (names capitalised): the
    httptools engine relays that head byte for byte, like nginx; h11 re-spells it in
    lowercase. A client that asks to close gets the same lines and ``connection: close``
    from either engine (httptools: the upstream's spelling, then that one line)."""
    kept = curl("--http1.1", "-i", proxy.url("/echo"), pki=pki).stdout.partition(b"\r\n\r\n")[0].split(b"\r\n")
    closing = curl("--http1.1", "-i", "-H", "Connection: close", proxy.url("/echo"), pki=pki).stdout
    closing = closing.partition(b"\r\n\r\n")[0].split(b"\r\n")
    length = kept[2].partition(b": ")[2]
    assert kept[0] == closing[0] == b"HTTP/1.1 200 OK"
    if http_engine == "httptools":
        assert kept[1:] == [b"Content-Type: application/json", b"Content-Length: " + length]
    else:
        assert kept[1:] == [b"content-type: application/json", b"content-length: " + length]
    assert [line.lower() for line in closing[1:]] == [
        b"content-type: application/json", b"content-length: " + length, b"connection: close"]


def test_http10_client_gets_a_close_delimited_response(proxy, pki):
    result = curl("--http1.0", "-i", proxy.url("/close-delimited?size=5000"), pki=pki)
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" not in head.lower()
    assert body == b"".join(pattern(5000))


def test_20mib_chunked_upload_arrives_byte_exact(proxy, session):
    size = 20 * MiB
    response = session.post(proxy.url("/echo"), data=pattern(size), timeout=WAIT)  # generator: chunked
    body = response.json()
    assert (body["body_bytes"], body["body_sha256"]) == (size, pattern_sha256(size))
    assert "content-length" not in upstream_headers(response)


def test_20mib_upload_with_content_length_via_curl(proxy, pki, tmp_path):
    size = 20 * MiB
    source = tmp_path / "upload"
    with source.open("wb") as file:
        for piece in pattern(size):
            file.write(piece)
    result = curl("--http1.1", "--data-binary", f"@{source}", "-H", "Content-Type: application/octet-stream", "-v",
                  proxy.url("/echo"), pki=pki)
    body = json.loads(result.stdout)
    assert (body["body_bytes"], body["body_sha256"]) == (size, pattern_sha256(size))
    assert dict(body["headers"])["content-length"] == str(size)
    # curl asks "Expect: 100-continue" for big bodies; the upstream's 100 is relayed.
    assert b"< HTTP/1.1 100 Continue" in result.stderr


def test_expect_continue_lets_the_upstream_refuse_before_the_body(proxy, pki, tmp_path):
    source = tmp_path / "body"
    source.write_bytes(b"x" * 4 * MiB)
    result = curl("--http1.1", "-H", "Expect: 100-continue", "--data-binary", f"@{source}", "-w", "\n%{http_code}",
                  "-v", proxy.url("/early"), pki=pki)
    assert result.stdout.endswith(b"\n413")
    assert b"< HTTP/1.1 100" not in result.stderr


def test_head_204_304_keep_the_connection_usable(proxy, session, upstream):
    head = session.head(proxy.url("/download?size=1000"), timeout=WAIT)
    assert head.status_code == 200 and head.headers["content-length"] == "1000" and head.content == b""
    assert session.get(proxy.url("/status/204"), timeout=WAIT).status_code == 204
    not_modified = session.get(proxy.url("/status/304"), timeout=WAIT)
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert session.get(proxy.url("/echo"), timeout=WAIT).json()["method"] == "GET"
    assert upstream.accepts == 1


def test_routing_by_host_and_longest_prefix_with_strip_prefix(pki, tmp_path, session):
    with TestUpstream() as api, TestUpstream() as api_v2, TestUpstream() as web:
        services = [
            service("web", web),
            service("api", api, hosts=("api.localhost",), path_prefix="/api", strip_prefix=True),
            service("api2", api_v2, hosts=("api.localhost",), path_prefix="/api/v2"),
        ]
        with ProxyThread(proxy_config(pki, services, tmp_path)) as px:
            def get(path, host):
                return session.get(px.url(path, "127.0.0.1"), headers={"Host": host}, timeout=WAIT)

            assert get("/api/users?id=1", "api.localhost").json()["target"] == "/users?id=1"
            assert get("/api/v2/users", "api.localhost").json()["target"] == "/api/v2/users"
            assert get("/api/users", "www.localhost").json()["target"] == "/api/users"  # web: any host
            assert get("/apix", "api.localhost").json()["target"] == "/apix"  # not a segment of /api
        assert (api.accepts, api_v2.accepts, web.accepts) == (1, 1, 1)


def test_round_robin_skips_an_upstream_that_refuses(pki, tmp_path, session):
    # A port bound but not listening refuses connections, and stays ours: a port merely
    # closed could be handed to the next listener bound to port 0 (the proxy's own).
    with socket.socket() as refusing, TestUpstream() as first, TestUpstream() as second:
        refusing.bind(("127.0.0.1", 0))
        refused = Upstream(f"http://127.0.0.1:{refusing.getsockname()[1]}", "127.0.0.1", refusing.getsockname()[1])
        app = service("app", first, refused, second)
        with ProxyThread(proxy_config(pki, app, tmp_path)) as px:
            ports = [session.get(px.url("/echo"), timeout=WAIT).json()["server_port"] for _ in range(6)]
    assert set(ports) == {first.port, second.port}
    assert ports.count(first.port) >= 2 and ports.count(second.port) >= 2


def test_ipv4_and_ipv6_listeners(pki, upstream, tmp_path, session):
    listen = (ListenAddress("127.0.0.1", 0), ListenAddress("::1", 0))
    try:
        px = ProxyThread(proxy_config(pki, service("app", upstream), tmp_path, listen=listen))
    except OSError as exc:  # pragma: no cover - a host without IPv6
        pytest.skip(f"no IPv6 loopback: {exc}")
    with px:
        (_, port4), (_, port6) = px.running.addresses
        assert session.get(f"https://127.0.0.1:{port4}/echo", timeout=WAIT).status_code == 200
        assert session.get(f"https://[::1]:{port6}/echo", timeout=WAIT).status_code == 200


def test_httpx_client(proxy, pki):
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_pem)), timeout=WAIT) as client:
        assert client.get(proxy.url("/echo")).json()["method"] == "GET"
        posted = client.post(proxy.url("/echo"), content=b"hello").json()
        assert posted["body_bytes"] == 5


def test_node_https_client(proxy, pki):
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    script = (
        "const https = require('https');"
        f"https.get('{proxy.url('/echo?from=node')}', (res) => {{"
        "  let body = ''; res.on('data', (d) => body += d);"
        "  res.on('end', () => { console.log(res.statusCode + ' ' + JSON.parse(body).target); });"
        "}).on('error', (e) => { console.error(e.message); process.exit(1); });"
    )
    env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(pki.ca_pem)}
    result = subprocess.run(["node", "-e", script], capture_output=True, timeout=WAIT, env=env, check=True)
    assert result.stdout.decode().strip() == "200 /echo?from=node"


def test_node_refuses_the_proxy_without_the_ca(proxy):
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    script = (
        f"require('https').get('{proxy.url('/echo')}', () => process.exit(0))"
        ".on('error', (e) => { console.error(e.code); process.exit(3); });"
    )
    env = {key: value for key, value in os.environ.items() if key != "NODE_EXTRA_CA_CERTS"}
    result = subprocess.run(["node", "-e", script], capture_output=True, timeout=WAIT, env=env)
    assert result.returncode == 3


def test_access_log_has_one_record_per_request(pki, upstream, tmp_path, session):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as px:
        session.post(px.url("/echo?q"), data=b"12345", timeout=WAIT)
        session.get(px.url("/status/204"), timeout=WAIT)
    records = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [(r["method"], r["path"], r["status"]) for r in records] == [
        ("POST", "/echo?q", 200), ("GET", "/status/204", 204)
    ]
    first = records[0]
    assert first["bytes_in"] == 5 and first["bytes_out"] > 0
    assert first["service"] == "app" and first["upstream"] == upstream.url
    assert first["tls_version"] in ("TLSv1.2", "TLSv1.3") and first["client"].startswith("127.0.0.1:")
    assert first["request_id"] and first["duration_ms"] >= 0


def test_admin_listener_reports_the_proxy(pki, upstream, tmp_path, session):
    gone = TestUpstream()
    gone.close()
    services = [service("app", upstream), service("broken", gone, path_prefix="/broken")]
    admin = AdminSettings(listen=ListenAddress("127.0.0.1", 0))
    with ProxyThread(proxy_config(pki, services, tmp_path, admin=admin)) as px:
        host, port = px.running.admin_address[:2]
        assert session.get(px.url("/echo"), timeout=WAIT).status_code == 200
        assert session.get(px.url("/broken/x"), timeout=WAIT).status_code == 502
        assert requests.get(f"http://127.0.0.1:{px.port}/", timeout=WAIT).status_code == 400  # plain HTTP
        assert requests.get(f"http://{host}:{port}/readyz", timeout=WAIT).text.strip() == "ready"
        metrics = requests.get(f"http://{host}:{port}/metrics", timeout=WAIT).text
    assert 'tlsproxy_requests_total{service="app",status="200"} 1' in metrics
    assert 'tlsproxy_requests_total{service="broken",status="502"} 1' in metrics
    assert 'tlsproxy_upstream_connect_errors_total{service="broken"} 1' in metrics
    assert 'tlsproxy_handshake_failures_total{reason="plain_http"} 1' in metrics


UPGRADE_REQUEST = (
    b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: test-echo\r\n\r\n"
)


def test_upgrade_is_tunnelled_both_ways(proxy, pki, upstream):
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(UPGRADE_REQUEST + b"first")  # bytes of the new protocol right behind the request
            answer = b""
            while b"echo:first" not in answer:
                chunk = tls.recv(65536)
                assert chunk, answer
                answer += chunk
            head = answer.split(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 101 ")
            assert b"upgrade: test-echo" in head and b"connection: upgrade" in head
            tls.sendall(b"second")
            assert tls.recv(65536) == b"echo:second"
    seen = dict(upstream.requests[0]["headers"])
    assert seen["upgrade"] == "test-echo" and seen["connection"].lower() == "upgrade"


def test_refused_upgrade_is_an_ordinary_response(proxy, session, upstream):
    response = session.get(proxy.url("/upgrade?refuse=1"),
                           headers={"Connection": "Upgrade", "Upgrade": "test-echo"}, timeout=WAIT)
    assert response.status_code == 200
    assert session.get(proxy.url("/echo"), timeout=WAIT).status_code == 200
    assert upstream.accepts == 1  # both answered on one pooled connection


def test_upgrade_header_without_connection_upgrade_is_not_forwarded(proxy, session):
    response = session.get(proxy.url("/echo"), headers={"Upgrade": "test-echo"}, timeout=WAIT)
    assert "upgrade" not in upstream_headers(response)


def settled(read, *, every: float = 0.1, quiet_polls: int = 5):
    """``read()`` once it has stopped changing for ``quiet_polls`` polls in a row (bounded by
    WAIT): how long a stall must last to count as one is what this observes."""
    stop = threading.Event()
    value, quiet, waited = read(), 0, 0.0
    while quiet < quiet_polls and waited < WAIT:
        stop.wait(every)
        waited += every
        current = read()
        quiet = quiet + 1 if current == value else 0
        value = current
    return value


def test_a_client_that_stops_reading_holds_the_upstream_back(proxy, pki, upstream):
    """Backpressure end to end: the proxy takes the response from the upstream only as fast
    as the client reads it, so a client that stops reading a large download leaves most of it
    unsent (socket buffers on both legs plus the proxy's bounded buffers, not the whole body)."""
    size = 512 * MiB
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect: a small window
    raw.settimeout(WAIT)
    raw.connect(("127.0.0.1", proxy.port))
    with context.wrap_socket(raw, server_hostname="localhost") as client:
        client.sendall(f"GET /download?size={size} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        assert client.recv(64 * 1024).startswith(b"HTTP/1.1 200 ")  # the download has begun
        stalled_at = settled(lambda: upstream.download_bytes_sent)
        assert 0 < stalled_at < 64 * MiB  # of 512 MiB: then nobody reads, and nobody buffers


def test_an_upstream_that_stops_reading_holds_the_client_upload_back(proxy, pki, upstream):
    """The other direction: while the upstream reads nothing (``/hang``), the proxy stops
    reading the client's body once its bounded buffers are full, so the client's sends stall."""
    size = 512 * MiB
    sent = [0]
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
    client = context.wrap_socket(raw, server_hostname="localhost")

    def upload() -> None:
        piece = b"u" * (64 * 1024)
        try:
            client.sendall(f"POST /hang HTTP/1.1\r\nHost: localhost\r\nContent-Length: {size}\r\n\r\n".encode())
            while sent[0] < size:
                client.sendall(piece)
                sent[0] += len(piece)
        except OSError:
            pass  # the test ends the connection under it

    sender = threading.Thread(target=upload, daemon=True)
    sender.start()
    try:
        stalled_at = settled(lambda: sent[0])
        assert 0 < stalled_at < 64 * MiB  # of 512 MiB
    finally:
        client.shutdown(socket.SHUT_RDWR)  # unblocks the sender
        sender.join(WAIT)
        client.close()
        upstream.close()  # ends /hang: the proxy then answers 502 to nobody, and is done


class HeadRecorder(RawUpstream):
    """An upstream that keeps each request head's bytes as they arrived and answers 204."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[bytes] = []

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        while True:
            data = recv_head(conn, data)
            head, found, data = data.partition(b"\r\n\r\n")
            if not found:
                return
            self.heads.append(head)
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")


def test_a_request_whose_headers_need_no_change_goes_up_as_the_client_spelled_it(pki, tmp_path, http_engine):
    """The httptools engine relays ordinary header lines as received (names' case and
    spacing kept, as nginx does), less Connection / Keep-Alive, then the proxy's headers;
    h11 sends the same headers re-spelled. A request with a header the proxy rewrites
    goes the parsed way on both engines."""
    with HeadRecorder() as recorder, ProxyThread(proxy_config(pki, service("app", recorder), tmp_path)) as px:
        with tls_connect(pki, px.port) as client:
            for extra in (b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n", b"X-Forwarded-For: 10.9.9.9\r\n"):
                client.sendall(b"GET /a/b?q=1 HTTP/1.1\r\nHost: localhost\r\nX-Mixed-Case:  Va lue\r\n" + extra
                               + b"Accept: */*\r\n\r\n")
                assert recv_head(client).startswith(b"HTTP/1.1 204 ")
    relayed, parsed = recorder.heads
    lines = relayed.split(b"\r\n")
    assert lines[0] == b"GET /a/b?q=1 HTTP/1.1"
    if http_engine == "httptools":
        assert lines[1:4] == [b"Host: localhost", b"X-Mixed-Case:  Va lue", b"Accept: */*"]
    else:
        assert lines[1:4] == [b"host: localhost", b"x-mixed-case: Va lue", b"accept: */*"]
    names = [line.partition(b":")[0].lower() for line in lines[1:]]
    assert names[3:] == [b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
                         b"forwarded", b"x-request-id"]
    assert b"connection" not in names and b"keep-alive" not in names
    assert b"\r\nx-forwarded-for: 10.9.9.9, 127.0.0.1\r\n" in parsed.lower()
    assert b"x-mixed-case: va lue\r\n" in parsed.lower()


def test_a_request_with_host_after_other_headers_goes_up_with_host_first(pki, tmp_path, http_engine):
    """Node's http and Java's clients send Host after their other headers. Upstream, Host
    comes first on both engines (as h11 writes it, and RFC 9112 3.2 asks of clients);
    the httptools engine relays the other lines as the client spelled them, in order."""
    with HeadRecorder() as recorder, ProxyThread(proxy_config(pki, service("app", recorder), tmp_path)) as px:
        with tls_connect(pki, px.port) as client:
            client.sendall(b"GET /n HTTP/1.1\r\nUser-Agent: node\r\nX-Mixed-Case:  Va lue\r\nHOST: localhost\r\n"
                           b"Connection: keep-alive\r\nAccept: */*\r\n\r\n")
            assert recv_head(client).startswith(b"HTTP/1.1 204 ")
    (head,) = recorder.heads
    lines = head.split(b"\r\n")
    if http_engine == "httptools":
        assert lines[1:5] == [b"HOST: localhost", b"User-Agent: node", b"X-Mixed-Case:  Va lue", b"Accept: */*"]
    else:
        assert lines[1:5] == [b"host: localhost", b"user-agent: node", b"x-mixed-case: Va lue", b"accept: */*"]
    names = [line.partition(b":")[0].lower() for line in lines[1:]]
    assert names.count(b"host") == 1 and b"connection" not in names
    assert names[4:] == [b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
                         b"forwarded", b"x-request-id"]


def test_whitespace_padding_does_not_carry_a_head_past_the_header_limit_upstream(pki, tmp_path, http_engine):
    """The header limit (4096 here) bounds what an upstream receives on both engines: a
    head padded with whitespace around a value counts its parsed size at the proxy, so the
    upstream gets it re-spelled, without the padding (found by an attack on the raw path)."""
    from proxy.config.model import Limits

    limit = 4096
    with HeadRecorder() as recorder, ProxyThread(
        proxy_config(pki, service("app", recorder), tmp_path, limits=Limits(max_header_bytes=limit))
    ) as px:
        with tls_connect(pki, px.port) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b" " * 12000 + b"a" + b"\t" * 3000
                           + b"\r\n\r\n")
            answer = recv_head(client)
    if answer.startswith(b"HTTP/1.1 204 "):
        (head,) = recorder.heads
        assert len(head) < limit and b"\r\nx-pad: a\r\n" in head.lower() + b"\r\n"
    else:  # (the padding arrived in pieces: the incomplete head passed the limit)
        assert answer.startswith(b"HTTP/1.1 431 ")
