"""`workers: 2`: two processes on one port (port 0 included), supervised by the parent."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import requests
from test_proxy_serve import LISTENING, Served
from upstream import WAIT, TestUpstream

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork()"),
    pytest.mark.both_engines,  # every test here runs on h11 and on httptools
]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("no /proc children list on this system")
    return [int(child) for child in path.read_text().split()]


def test_two_workers_share_the_port_and_are_supervised(pki, tmp_path):
    cert, key = pki.server
    with TestUpstream() as upstream:
        config = tmp_path / "proxy.yaml"
        config.write_text(
            'listen: ["127.0.0.1:0"]\nworkers: 2\n'
            f"tls: {{certificates: [{{cert: {cert}, key: {key}}}]}}\n"
            "access_log: {path: access.log}\n"
            f"services: [{{name: app, upstream: '{upstream.url}'}}]\n"
        )
        with Served(["-c", str(config)], tmp_path) as served:
            port = served.wait_for(LISTENING).group(1)
            workers = children(served.proc.pid)
            assert len(workers) == 2

            def get() -> int:
                return requests.get(f"https://localhost:{port}/echo", verify=str(pki.ca_pem), timeout=WAIT).status_code

            assert [get() for _ in range(10)] == [200] * 10
            os.kill(workers[0], signal.SIGKILL)
            served.wait_for(re.compile(r"worker \d \(pid \d+\) exited"))
            assert [get() for _ in range(10)] == [200] * 10
            replaced = children(served.proc.pid)
            assert len(replaced) == 2 and workers[0] not in replaced
            assert served.stop() == 0  # the parent waits for its workers to drain
            assert not any(Path(f"/proc/{pid}").exists() for pid in replaced)
    # the killed worker's unflushed lines are lost; the others flushed theirs on exit
    assert (tmp_path / "access.log").read_text().count('"status":200') >= 10
