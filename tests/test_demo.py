"""`tlsproxy demo`: the printed curl lines work as printed, and Ctrl-C stops it cleanly.

The end-to-end test runs the real command in a subprocess on a port picked by binding port 0
first (the printed curl lines must carry the real port), waits for the "ready" line, runs every
printed curl line and checks the status each one's comment promises.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from proxy.demo import READY, ensure_demo_certificates
from proxy.pki.store import load_certificates

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DemoProcess:
    """`python -m proxy demo` with its output read line by line on a thread (bounded waits)."""

    def __init__(self, port: int, cert_dir: Path, cwd: Path) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port), "--dir", str(cert_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} line within {timeout}s:\n" + self.output)
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"demo exited ({self.proc.returncode}) before {marker!r}:\n" + self.output)
            self.lines.append(line)
            if marker in line:
                return

    def drain(self) -> None:
        self._reader.join(timeout=STOP_TIMEOUT)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
        self._reader.join(timeout=STOP_TIMEOUT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def printed_commands(lines: list[str]) -> list[tuple[int, list[str]]]:
    """(expected status, argv) for each printed `curl --cacert` line, from the comment above it."""
    commands = []
    expected = None
    for line in lines:
        text = line.strip()
        if m := re.match(r"# (\d{3})\b", text):
            expected = int(m.group(1))
        elif text.startswith("curl --cacert"):
            assert expected is not None, f"no expected status above {text!r}"
            commands.append((expected, shlex.split(text)))
            expected = None
    return commands


def run_curl(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [*argv, "-sS", "--max-time", "10", "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=20, env=env,
    )
    assert proc.returncode == 0, f"{shlex.join(argv)} failed: {proc.stderr}"
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), body


@needs_curl
def test_demo_printed_curl_lines_work_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    port = free_port()
    demo = DemoProcess(port, tmp_path / "certs", cwd=tmp_path)
    try:
        demo.wait_for(READY, START_TIMEOUT)
        assert f"https://localhost:{port}" in demo.lines[-1]

        # Where the CA is, and the one command that trusts it (relative to where demo ran).
        stripped = [line.strip() for line in demo.lines]
        assert f"CA: {tmp_path / 'certs' / 'ca' / 'ca.pem'}" in stripped
        assert "trust it: tlsproxy certs trust --ca certs/ca/ca.pem --install" in stripped

        commands = printed_commands(demo.lines)
        assert sorted(status for status, _ in commands) == [200, 200, 403]
        for expected, argv in commands:
            status, body = run_curl(argv)
            assert status == expected, f"{shlex.join(argv)} -> {status}, expected {expected}:\n{body}"
            with_cert = "--cert" in argv
            # The client certificate reaches the upstream as XFCC only when one was presented.
            assert ("cn=demo-client" in body.lower()) == (with_cert and status == 200), body

        # The `export ...` hint makes plain `curl URL` trust the demo CA.
        export = next(line.strip() for line in demo.lines if line.strip().startswith("export "))
        env = dict(os.environ)
        env.update(item.split("=", 1) for item in shlex.split(export)[1:])
        bare = next(line.strip() for line in demo.lines if line.strip().startswith("curl https://"))
        assert run_curl(shlex.split(bare), env=env)[0] == 200

        demo.proc.send_signal(signal.SIGINT)
        assert demo.proc.wait(timeout=STOP_TIMEOUT) == 0
        demo.drain()
        assert "tlsproxy demo: stopped" in demo.output
    finally:
        demo.close()


def test_demo_refuses_a_busy_port_with_a_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port), "--dir", str(tmp_path / "certs")],
            capture_output=True, text=True, timeout=START_TIMEOUT, cwd=tmp_path,
        )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(port) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_certificates_are_created_once_then_reused(tmp_path: Path) -> None:
    first = ensure_demo_certificates(tmp_path)
    assert all("created" in note for note in first.notes)
    pem_before = first.server[0].read_bytes()
    assert (first.client[1].stat().st_mode & 0o777) == 0o600

    second = ensure_demo_certificates(tmp_path)
    assert all("reused" in note for note in second.notes)
    assert second.server[0].read_bytes() == pem_before


def test_leaves_from_another_ca_are_reissued(tmp_path: Path) -> None:
    first = ensure_demo_certificates(tmp_path)
    for name in ("ca.pem", "ca.key"):
        (tmp_path / "ca" / name).unlink()
    second = ensure_demo_certificates(tmp_path)
    assert "created" in second.notes[0]
    assert "re-issued: not issued by the demo CA" in second.notes[1]
    new_ca = load_certificates(second.ca_pem)[0]
    load_certificates(second.server[0])[0].verify_directly_issued_by(new_ca)
    assert second.client[0] == first.client[0]
