"""`workers: 2` seen from one admin listener, with real processes and real clients:
/metrics totals equal what was sent to both workers, survive a SIGKILLed worker (the
admin one included), and the status page lists a refused client with its reason."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from test_proxy_serve import LISTENING, Served
from upstream import WAIT, TestUpstream

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork()")

ADMIN = re.compile(r"admin on http://127\.0\.0\.1:(\d+) ")
EXITED = re.compile(r"worker (\d) \(pid (\d+)\) exited")
PUBLISH_DEADLINE = 10.0  # workers publish every second; a bounded wait for the slowest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("no /proc children list on this system")
    return [int(child) for child in path.read_text().split()]


@contextlib.contextmanager
def reaped_on_failure(served: Served) -> Iterator[None]:
    """On a failure, kill the workers before ``Served`` kills the parent: orphaned
    workers would hold its stderr open and its reader thread would wait for them."""
    try:
        yield
    except BaseException:
        if served.proc.poll() is None:
            for pid in children(served.proc.pid):
                os.kill(pid, signal.SIGKILL)
        raise


def established_on(pid: int, port: int) -> int:
    """How many established TCP connections to local ``port`` process ``pid`` holds
    (its socket inodes matched against /proc/net/tcp): which worker got a client."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(page: str, series: str) -> float:
    """The value of one exact series line (``name{labels}``) on a /metrics page, 0 if absent."""
    for line in page.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


def wait_for_metric(admin: str, series: str, expected: float) -> str:
    """Scrape until ``series`` equals ``expected`` (workers publish every second);
    every value seen on the way must not exceed it. The last page."""
    deadline = time.monotonic() + PUBLISH_DEADLINE
    while True:
        page = get(f"{admin}/metrics")[1]
        value = sample(page, series)
        assert value <= expected, f"{series} = {value}, more than the {expected} sent"
        if value == expected:
            return page
        assert time.monotonic() < deadline, f"{series} = {value}, expected {expected}"
        time.sleep(0.1)  # polling interval of a bounded wait (the publish is periodic)


def refused_handshake(port: int, cert: tuple[Path, Path], ca: Path) -> None:
    """A client presenting a certificate from a CA the proxy does not trust: refused."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")  # TLS 1.3: refused here
                assert tls.recv(1) == b"", "an untrusted client certificate was admitted"
                raise ConnectionError("closed")


CONFIG = """\
listen: ["127.0.0.1:0"]
workers: 2
tls: {{certificates: [{{cert: {cert}, key: {key}}}]}}
client_auth: {{mode: optional, ca: {ca}}}
admin: {{listen: "127.0.0.1:{admin_port}"}}
access_log: {{path: access.log}}
services:
  - name: private
    path_prefix: /private
    upstream: {upstream}
    client_auth: {{require: true, allow: [{{cn: alice}}]}}
  - name: app
    upstream: {upstream}
"""


class Cells(HTMLParser):
    """The text of each table row of the status page, by the heading above its table."""

    def __init__(self) -> None:
        super().__init__()
        self.section = ""
        self.rows: dict[str, list[list[str]]] = {}
        self._in: str | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("h2", "td"):
            self._in = tag
            if tag == "td" and self._row is not None:
                self._row.append("")
            if tag == "h2":
                self.section = ""
        elif tag == "tr":
            self._row = []
        elif tag == "script":
            raise AssertionError("the status page holds a script")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row:
            self.rows.setdefault(self.section.split(" (")[0], []).append(self._row)
            self._row = None
        if tag in ("h2", "td"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "h2":
            self.section += data
        elif self._in == "td" and self._row is not None:
            self._row[-1] += data


def status_rows(admin: str) -> dict[str, list[list[str]]]:
    status, page = get(f"{admin}/")
    assert status == 200
    parser = Cells()
    parser.feed(page)
    return parser.rows


def test_two_workers_one_page(pki, tmp_path):
    cert, key = pki.server
    alice = pki.leaf("alice", client=True)
    bob = pki.leaf("bob", "bob.example", client=True, cn="bob <b>&</b>")
    stranger = pki.leaf("stranger", client=True, ca="other")
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    with TestUpstream() as upstream:
        config = tmp_path / "proxy.yaml"
        config.write_text(CONFIG.format(cert=cert, key=key, ca=pki.ca_pem, admin_port=admin_port, upstream=upstream.url))
        with Served(["-c", str(config)], tmp_path) as served, reaped_on_failure(served):
            port = int(served.wait_for(LISTENING).group(1))
            assert int(served.wait_for(ADMIN).group(1)) == admin_port
            workers = children(served.proc.pid)
            assert len(workers) == 2

            # 40 clients, each on a new connection held open until both workers have some
            sessions = []
            try:
                for _ in range(40):
                    session = requests.Session()
                    sessions.append(session)
                    response = session.get(f"https://localhost:{port}/echo", verify=str(pki.ca_pem), timeout=WAIT)
                    assert response.status_code == 200
                held = {pid: established_on(pid, port) for pid in workers}
                assert sum(held.values()) >= 40, held
                assert all(held.values()), f"the kernel gave every connection to one worker: {held}"
            finally:
                for session in sessions:
                    session.close()
            for _ in range(7):
                refused_handshake(port, stranger, pki.ca_pem)
            response = requests.get(f"https://localhost:{port}/private/x", verify=str(pki.ca_pem),
                                    cert=(str(bob[0]), str(bob[1])), timeout=WAIT)
            assert response.status_code == 403

            ok = 'tlsproxy_requests_total{service="app",status="200"}'
            refused = 'tlsproxy_handshake_failures_total{reason="unknown_ca"}'
            wait_for_metric(admin, ok, 40)
            page = wait_for_metric(admin, refused, 7)
            assert sample(page, 'tlsproxy_requests_total{service="private",status="403"}') == 1
            # gauges: per worker, or summed, or once
            assert sample(page, 'tlsproxy_last_reload_success{worker="0"}') == 1
            assert sample(page, 'tlsproxy_last_reload_success{worker="1"}') == 1
            assert page.count("\ntlsproxy_active_connections ") == 1
            assert page.count(f'tlsproxy_certificate_not_after_seconds{{path="{cert}"') == 1
            assert page.count("# TYPE tlsproxy_requests_total counter") == 1

            # The status page: the refused clients, with the reason in words, escaped.
            status, html = get(f"{admin}/")
            assert "<b>&" not in html and "\\<b\\>" not in html  # what bob chose stays text
            rows = status_rows(admin)
            refusals = rows["Refused handshakes and requests"]
            by_stage = {}
            for row in refusals:
                by_stage.setdefault(row[4], []).append(row)
            assert len(by_stage["handshake"]) == 7
            assert all("untrusted self-signed CA" in row[5] for row in by_stage["handshake"]), refusals
            request_refusal = by_stage["request (403)"][0]
            assert request_refusal[2] == "CN=bob \\<b\\>&\\</b\\>" and request_refusal[3] == "private"
            assert "bob" in request_refusal[5] and "private" in request_refusal[5]
            assert {row[6] for row in refusals} <= {"0", "1"}
            services = {row[0]: row for row in rows["Services"]}
            assert set(services) == {"private", "app"} and upstream.url in services["app"][2]
            certificates = rows["Certificates"]
            assert any(row[0] == "server" and "localhost" in row[3] and 360 <= int(row[5]) <= 366
                       for row in certificates), certificates

            # A reload that changes the listeners: one line says it needs a restart.
            config.write_text(config.read_text().replace('["127.0.0.1:0"]', '["127.0.0.1:0", "127.0.0.1:1"]'))
            served.proc.send_signal(signal.SIGHUP)
            served.wait_for(re.compile(r"reload: listen changed; that takes a restart"))
            deadline = time.monotonic() + PUBLISH_DEADLINE
            while len(reloads := status_rows(admin).get("Reloads", [])) < 2 or len(reloads[0]) < 4:
                assert time.monotonic() < deadline, reloads
                time.sleep(0.1)  # polling interval of a bounded wait (the publish is periodic)
            assert all(row[1] == "ok" and "takes a restart" in row[2] for row in reloads)
            assert sorted(row[3] for row in reloads) == ["0", "1"]
            assert sum("takes a restart" in line for line in served.stderr) == 1  # one line, not one per worker

            # SIGKILL each worker in turn (the admin one last): nothing counted goes away.
            for victim in sorted(workers, key=lambda pid: pid != workers[1]):
                before = get(f"{admin}/metrics")[1]
                os.kill(victim, signal.SIGKILL)
                served.wait_for(EXITED)
                deadline = time.monotonic() + PUBLISH_DEADLINE
                while True:
                    try:
                        after = get(f"{admin}/metrics")[1]
                    except OSError:  # the admin worker is being replaced
                        after = None
                    if after is not None:
                        assert sample(after, ok) == sample(before, ok) == 40
                        assert sample(after, refused) == 7
                        if victim not in children(served.proc.pid) and len(children(served.proc.pid)) == 2:
                            break
                    assert time.monotonic() < deadline, "the worker was not replaced"
                    time.sleep(0.1)  # polling interval of a bounded wait
            # the replacements count on top of what the dead ones had
            for _ in range(10):
                assert requests.get(f"https://localhost:{port}/echo", verify=str(pki.ca_pem), timeout=WAIT).ok
            wait_for_metric(admin, ok, 50)
            rows = status_rows(admin)
            assert len([r for r in rows["Refused handshakes and requests"] if r[4] == "handshake"]) == 7
            assert served.stop() == 0
