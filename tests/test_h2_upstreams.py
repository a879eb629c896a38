"""HTTP/2 upstreams (h2c://) seen from the upstream's side: the proxy keeps under the
upstream's MAX_CONCURRENT_STREAMS (opening more connections when they are full), a
GOAWAY retires a connection without failing what it processed, and HTTP/1.1 clients'
requests (bodies included) arrive as HTTP/2 streams."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from h2_upstream_server import H2Upstream
from upstream import ProxyThread, proxy_config, service

from proxy.config.model import Timeouts
from proxy.config.values import parse_upstream

WAIT = 10.0


def h2c_proxy(pki, tmp_path, upstream: H2Upstream) -> ProxyThread:
    return ProxyThread(proxy_config(pki, service("h2", parse_upstream(upstream.url)), tmp_path))


def get(pki, px: ProxyThread, path: str = "/x", **kwargs) -> requests.Response:
    return requests.get(px.url(path), verify=str(pki.ca_pem), timeout=WAIT, **kwargs)


def wait_for(condition, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_streams_stay_under_the_upstreams_limit_and_overflow_to_new_connections(pki, tmp_path):
    with H2Upstream(max_streams=2, hold=True) as upstream, h2c_proxy(pki, tmp_path, upstream) as px:
        upstream.release.set()
        assert get(pki, px).status_code == 200  # (one connection exists, its SETTINGS known)
        upstream.release.clear()
        with ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(get, pki, px, f"/held/{index}") for index in range(6)]
            assert wait_for(lambda: upstream.open_now == 6), upstream.open_now  # all six at once...
            upstream.release.set()
            statuses = [future.result(WAIT).status_code for future in pending]
    assert statuses == [200] * 6
    assert max(upstream.peaks) <= 2  # ... never more than two on one connection
    assert upstream.connections >= 3


def test_goaway_retires_a_connection_and_the_next_request_opens_another(pki, tmp_path):
    with H2Upstream(goaway_after=1) as upstream, h2c_proxy(pki, tmp_path, upstream) as px:
        bodies = [get(pki, px, f"/{index}").json() for index in range(3)]
    assert [body["connection"] for body in bodies] == [1, 2, 3]
    assert upstream.connections == 3


def test_an_http11_request_with_a_body_goes_up_as_an_http2_stream(pki, tmp_path):
    payload = bytes(range(256)) * 4096  # 1 MiB: past every HTTP/2 window on the way
    with H2Upstream() as upstream, h2c_proxy(pki, tmp_path, upstream) as px:
        response = requests.post(px.url("/upload?x=1"), data=payload, verify=str(pki.ca_pem), timeout=WAIT)
        chunked = requests.post(px.url("/chunked"), data=iter([b"a" * 1000] * 5), verify=str(pki.ca_pem),
                                timeout=WAIT)
    assert response.status_code == 200 and response.json()["body"] == len(payload)
    headers = dict(response.json()["headers"])
    assert headers[":path"] == "/upload?x=1" and headers[":method"] == "POST" and headers[":scheme"] == "http"
    assert headers[":authority"] == f"localhost:{px.port}"  # the client's Host
    assert "connection" not in headers and "host" not in headers and "transfer-encoding" not in headers
    assert headers["x-forwarded-proto"] == "https"
    assert chunked.json()["body"] == 5000  # chunked on the way in: DATA frames up


def test_an_upstream_that_is_down_is_502_naming_the_service(pki, tmp_path):
    with H2Upstream() as upstream:
        url = upstream.url
    with ProxyThread(proxy_config(pki, service("h2", parse_upstream(url)), tmp_path)) as px:
        response = get(pki, px)
    assert response.status_code == 502 and "service 'h2'" in response.text


@pytest.mark.parametrize("count", [20])
def test_many_requests_share_one_connection(pki, tmp_path, count):
    with H2Upstream() as upstream, h2c_proxy(pki, tmp_path, upstream) as px:
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda index: get(pki, px, f"/{index}").status_code, range(count)))
    assert statuses == [200] * count
    assert upstream.connections == 1


def test_a_connection_without_streams_for_timeouts_idle_is_closed(pki, tmp_path):
    with H2Upstream() as upstream:
        config = proxy_config(pki, service("h2", parse_upstream(upstream.url)), tmp_path,
                              timeouts=Timeouts(idle=0.3))
        with ProxyThread(config) as px:
            assert get(pki, px).status_code == 200
            assert wait_for(lambda: upstream.closed_by_peer == 1)  # idle 0.3 s: the proxy let it go
            assert get(pki, px).status_code == 200  # and the next request opens another
            assert upstream.connections == 2
