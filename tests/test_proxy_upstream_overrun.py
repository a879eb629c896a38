"""An upstream response is never shared between clients (SPEC 4), through real sockets.

Bytes an upstream sends past the end of a response — a body on a HEAD answer, on 204
or 304, more bytes than its Content-Length — must close that upstream connection: were
it pooled, the next request on it (another client, another TLS connection) would read
those bytes as its own response. Each upstream here hides a complete forged response in
the overrun; the next client must get the upstream's genuine answer, never the forgery.
"""

from __future__ import annotations

import contextlib

import pytest
import requests
from upstream import GENUINE, WAIT, ProxyThread, ScriptedUpstream, proxy_config, service

pytestmark = pytest.mark.both_engines

FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"


@contextlib.contextmanager
def proxy_in_front_of(pki, tmp_path, answers: dict[bytes, bytes]):
    with ScriptedUpstream(answers) as up, ProxyThread(proxy_config(pki, service("app", up), tmp_path)) as px:
        yield px, up


def fetch(pki, px: ProxyThread, method: str, path: str) -> requests.Response:
    """One request on a connection of its own (a new client each time)."""
    return requests.request(method, px.url(path), verify=str(pki.ca_pem), timeout=WAIT)


OVERRUNS = {
    "head-with-body": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + FORGED),
    "head-with-exactly-a-forged-body": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(FORGED) + FORGED),
    "204-with-body": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + FORGED),
    "304-with-body": ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n" + FORGED),
    "more-than-content-length": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + FORGED),
    "chunked-then-more": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                                 + FORGED),
}


@pytest.mark.parametrize(("method", "answer"), OVERRUNS.values(), ids=OVERRUNS.keys())
def test_bytes_past_a_response_never_reach_the_next_client(pki, tmp_path, method, answer):
    with proxy_in_front_of(pki, tmp_path, {b"/first": answer}) as (px, up):
        first = fetch(pki, px, method, "/first")
        assert first.status_code in (200, 204, 304)
        assert first.content in (b"", b"hello")
        second = fetch(pki, px, "GET", "/second")
        assert second.content == b"genuine"
        assert up.accepts == 2  # the overrun connection was closed, not pooled


def test_a_clean_keep_alive_upstream_is_still_reused(pki, tmp_path):
    clean = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    with proxy_in_front_of(pki, tmp_path, {b"/first": clean, b"/head": clean[: -len(b"hello")]}) as (px, up):
        assert fetch(pki, px, "GET", "/first").content == b"hello"
        assert fetch(pki, px, "HEAD", "/head").headers["content-length"] == "5"
        assert fetch(pki, px, "GET", "/second").content == b"genuine"
        assert up.accepts == 1
