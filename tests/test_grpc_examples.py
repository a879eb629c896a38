"""The README's "gRPC between test components" walk-through, run as written.

The section's ``bash`` blocks are taken from README.md and run in one bash, with only what a
test must change: the fixed ports become free ones, ``/tmp/grpc-demo`` a temporary folder,
and ``pip install grpcio`` is skipped (grpcio comes with the test extra). Everything else --
``tlsproxy certs``, ``check``, ``serve``, examples/grpc_echo_server.py and
examples/grpc_echo_client.py -- runs for real, and the printed statuses are checked: the
admitted call (with the identity B saw), UNAUTHENTICATED, PERMISSION_DENIED, and the sidecar
pair's insecure-channel call and its refused twin. The script runs in its own session so
whatever it left running is stopped with it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="grpcio is not installed (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parents[1]
SECTION = "## gRPC between test components"
PORTS = ("50051", "7443", "7444", "7080")  # every fixed port the section uses
RUN_LIMIT = 120.0


def readme_commands() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the section should hold two bash blocks: the pair, then the sidecar variant"
    return "\n".join(blocks)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def adapted(script: str, workdir: Path) -> str:
    assert "pip install -q grpcio" in script and "/tmp/grpc-demo" in script
    script = script.replace("pip install -q grpcio", ": pip install -q grpcio")
    script = script.replace("/tmp/grpc-demo", str(workdir))
    for fixed, free in zip(PORTS, free_ports(len(PORTS))):
        assert re.search(rf"\b{fixed}\b", script), f"port {fixed} no longer in the README: update PORTS"
        script = re.sub(rf"\b{fixed}\b", str(free), script)
    return script


def test_the_readme_grpc_walkthrough_works_as_written(tmp_path: Path) -> None:
    script = adapted(readme_commands(), tmp_path / "grpc-demo")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "walkthrough.log"
    # Output to a file, not a pipe: a process the script failed to stop must not keep the
    # test waiting for end-of-file. No ``-e``: the refused calls exit 1, as pasted they would.
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-u", "-c", script], cwd=REPO, env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=RUN_LIMIT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the script left running
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    output = log.read_text()
    statuses = [line for line in output.splitlines() if re.match(r"[A-Z_]+: ", line) and "tlsproxy" not in line]
    assert proc.returncode == 0, output[-4000:]
    assert len(statuses) == 5, output[-4000:]
    admitted, no_cert, off_list, sidecar, sidecar_refused = statuses
    assert admitted.startswith("OK: echo 'hello'; server saw x-forwarded-client-cert: Hash=")
    assert 'Subject="CN=billing";URI=spiffe://test.local/billing' in admitted
    assert no_cert == "UNAUTHENTICATED: no client certificate was presented; service 'echo' requires one"
    assert off_list == "PERMISSION_DENIED: certificate CN=reports is not allowed for service 'echo'"
    assert sidecar.startswith("OK: ") and 'Subject="CN=billing"' in sidecar
    assert sidecar_refused == off_list
