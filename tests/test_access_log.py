"""Access log: formats, batching, stdout and files."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from proxy.config.model import AccessLogSettings
from proxy.errors import ConfigError
from proxy.server import access_log
from proxy.server.access_log import FIELDS, AccessLog, format_time

RECORD = {
    "client": "127.0.0.1",
    "tls_version": "TLSv1.3",
    "sni": "api.localhost",
    "protocol": "HTTP/2",
    "method": b"GET",
    "path": b"/api/x?q=1",
    "status": 200,
    "bytes_in": 0,
    "bytes_out": 123,
    "duration_ms": 1.23456,
    "service": "api",
    "upstream": "127.0.0.1:9000",
    "request_id": b"abc123",
}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_lines_have_the_documented_keys_in_order(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog.open(AccessLogSettings(format="json", path=str(path)))
    log.write(RECORD)
    log.write({**RECORD, "status": 404, "service": None, "extra": "kept"})
    assert path.read_text() == ""  # batched: nothing until a flush
    log.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert tuple(first) == FIELDS
    assert RFC3339_UTC.match(first["time"])
    assert first["method"] == "GET" and first["path"] == "/api/x?q=1" and first["request_id"] == "abc123"
    assert first["duration_ms"] == 1.235 and first["status"] == 200
    assert second["status"] == 404 and second["service"] is None and second["extra"] == "kept"


def test_text_line_is_readable_and_cannot_be_split(capsys):
    log = AccessLog.open(AccessLogSettings(format="text", path="-"))
    log.write({**RECORD, "time": 0})
    log.write({"time": 0, "method": "GET", "path": '/a\n"b c', "status": 400})
    log.close()
    first, second = capsys.readouterr().out.splitlines()
    assert first == (
        '1970-01-01T00:00:00.000Z 127.0.0.1 "GET /api/x?q=1 HTTP/2" 200 in=0 out=123 1.235ms service=api '
        "upstream=127.0.0.1:9000 sni=api.localhost tls=TLSv1.3 request_id=abc123"
    )
    assert second.startswith('1970-01-01T00:00:00.000Z - "GET /a\\x0a\\"b%20c" 400 in=- out=- -')


def test_json_to_stdout(capsys):
    log = AccessLog.open(AccessLogSettings(format="json", path="-"))
    log.write(RECORD)
    log.close()
    assert json.loads(capsys.readouterr().out)["sni"] == "api.localhost"


def test_a_full_buffer_is_written_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(access_log, "FLUSH_BYTES", 1000)
    path = tmp_path / "access.log"
    log = AccessLog.open(AccessLogSettings(path=str(path)))
    written = 0
    while not path.read_text():
        log.write(RECORD)
        written += 1
        assert written < 100
    assert len(path.read_text().splitlines()) == written
    log.close()


def test_the_loop_timer_flushes_a_partial_batch(tmp_path):
    path = tmp_path / "access.log"

    class Observed(AccessLog):
        flushed: asyncio.Event

        def flush(self) -> None:
            super().flush()
            self.flushed.set()

    async def main() -> str:
        log = Observed.open(AccessLogSettings(path=str(path)))
        log.flushed = asyncio.Event()
        log.write(RECORD)
        assert path.read_text() == ""
        await asyncio.wait_for(log.flushed.wait(), 5)
        content = path.read_text()
        log.close()
        return content

    assert json.loads(asyncio.run(main()))["status"] == 200


def test_reopen_follows_a_rotated_file(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog.open(AccessLogSettings(path=str(path)))
    log.write(RECORD)
    path.rename(tmp_path / "access.log.1")
    log.reopen()
    log.write({**RECORD, "status": 201})
    log.close()
    assert json.loads((tmp_path / "access.log.1").read_text())["status"] == 200
    assert json.loads(path.read_text())["status"] == 201


def test_unopenable_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        AccessLog.open(AccessLogSettings(path=str(tmp_path / "missing" / "access.log")), source="proxy.yaml")
    assert info.value.key == "access_log.path" and str(info.value).startswith("proxy.yaml: access_log.path:")


def test_format_time():
    assert format_time(1.5) == "1970-01-01T00:00:01.500Z"
    assert RFC3339_UTC.match(format_time())


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"path": b'/a"b\\c\x7f\xff\xfe?q=\xc3\xa9', "sni": "d\u00e9j\u00e0.localhost", "method": "GET"},
        {"sni": None, "service": None, "upstream": None, "request_id": None, "tls_version": None},
        {"time": "2026-11-22T23:02:01.123Z", "duration_ms": 0.0004},
        {"duration_ms": float("nan")},
        {"duration_ms": 7},
        {"duration_ms": 7.0}, {"duration_ms": 0.0005}, {"duration_ms": 2.675}, {"duration_ms": 0.1},
        {"duration_ms": 999999999.9995}, {"duration_ms": 1e300}, {"duration_ms": -1.0}, {"duration_ms": 123.4564999},
        {"status": True},
        {"time": 0.0}, {"time": 1.9995}, {"time": 1764650000.9999999}, {"time": 1764650000.0005},
        {"time": -1.5}, {"time": -0.0},
        {"bytes_out": 2**70, "duration_ms": 12345678.9876},
        {"sni": b"bytes\xff\"sni", "client": bytearray(b"1.2.3.4"), "upstream": 12},
        {"client_subject": "CN=al\u00efce,O=\"x\"", "client_fingerprint": "sha256:ab"},
    ],
)
@pytest.mark.parametrize("order", ["as the request path writes it", "any other order"])
def test_json_line_is_what_json_dumps_writes(changes, order):
    """The one-template fast path (a record with exactly FIELDS, in any order) and the
    general encoder agree, whatever the values."""
    from proxy.server.access_log import _fields, _json_line

    if order == "any other order":
        record = {**RECORD, "time": 1.5, **changes}
    else:
        record = {"time": 1.5, **RECORD, **changes}
        assert tuple(record)[: len(FIELDS)] == FIELDS
    expected = json.dumps(_fields(record), separators=(",", ":"), default=str) + "\n"
    assert _json_line(record) == expected


@pytest.mark.parametrize("room", [0, 4096])
def test_shared_field_fragments_change_nothing_whether_kept_or_not(monkeypatch, room):
    """Records sharing a connection's and a service's fields reuse their JSON (bounded);
    full or empty, the lines are json.dumps's, and a value of another type is not mixed
    up with a cached one."""
    from proxy.server.access_log import _fields, _json_line

    monkeypatch.setattr(access_log, "_fragments", {})
    monkeypatch.setattr(access_log, "_FRAGMENTS_MAX", room)
    records = [
        {"time": 1.5, **RECORD},
        {"time": 2.25, **RECORD, "path": b"/other", "request_id": b"id-with-dash"},
        {"time": 2.25, **RECORD, "method": "GET", "client": 1},
        {"time": 3.0, **RECORD, "sni": b"api.localhost", "upstream": None, "request_id": "x\"y"},
    ]
    for record in records * 2:
        expected = json.dumps(_fields(record), separators=(",", ":"), default=str) + "\n"
        assert _json_line(record) == expected
    assert len(access_log._fragments) <= room


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"client_subject": "CN=al\u00efce,O=\"x\"", "client_fingerprint": "sha256:ab"},
        {"path": b"/\xff\"q", "method": b"BREW", "request_id": b"not hex!", "sni": None, "upstream": None},
        {"time": "2026-11-22T23:02:01.123Z"}, {"duration_ms": float("inf")}, {"status": 200.0},
    ],
)
def test_a_request_path_tuple_is_logged_as_its_record(changes):
    """write_request's tuple (REQUEST_FIELDS, no dict on the request path) gives the line
    its record would, in both formats; no certificate keys when there was none."""
    from proxy.server.access_log import REQUEST_FIELDS, _fields, _json_line, _record_of, _text_line

    record = {"time": 1.5, **RECORD, "client_subject": None, "client_fingerprint": None, **changes}
    values = tuple(record[key] for key in REQUEST_FIELDS)
    as_dict = _record_of(values)
    assert ("client_subject" in as_dict) == ("client_subject" in changes)
    assert _json_line(values) == json.dumps(_fields(as_dict), separators=(",", ":"), default=str) + "\n"
    assert _text_line(values) == _text_line(as_dict)
