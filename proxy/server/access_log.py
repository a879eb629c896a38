"""One access-log line per request, written in batches off the request path.

``json``: one object per line with the keys of ``FIELDS`` (then any extra keys the
caller added); ``text``: one readable line, nginx-like::

    2026-11-22T23:02:01.123Z 127.0.0.1 "GET /api/x" 200 in=0 out=123 1.234ms service=api
      upstream=127.0.0.1:9000 sni=api.localhost tls=TLSv1.3 request_id=4f0c…

Records are queued as the caller built them and formatted at flush time, one batch
at once (a request pays for appending a dict, not for a JSON encoder run), then
written with one ``write`` per batch when the queue passes FLUSH_BYTES (estimated at
LINE_ESTIMATE per record), on a loop timer FLUSH_INTERVAL after the first unwritten
record, and on close. A file is opened O_APPEND and each batch is one ``os.write``, so several worker
processes appending to the same file do not tear each other's lines. ``reopen`` lets
a log rotator move the file away (hook it to SIGUSR1, as nginx does).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from typing import Any

from proxy.config.model import AccessLogSettings
from proxy.errors import ConfigError

FIELDS = (
    "time",
    "client",
    "tls_version",
    "sni",
    "method",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "service",
    "upstream",
    "request_id",
)
FLUSH_BYTES = 64 * 1024
LINE_ESTIMATE = 320  # bytes per queued record, for FLUSH_BYTES (a typical JSON line)
FLUSH_INTERVAL = 0.2
FILE_MODE = 0o640

# Text lines stay one line and unambiguous whatever a client put in its request.
_TEXT_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}
_TEXT_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord(" "): "%20"})


class AccessLog:
    """Formats records and hands them to the output in batches."""

    def __init__(self, settings: AccessLogSettings, fd: int | None) -> None:
        self.settings = settings
        self._fd = fd  # None: stdout, looked up at flush time (tests swap sys.stdout)
        self._format = _json_line if settings.format == "json" else _text_line
        self._pending: list[dict[str, Any]] = []  # records, formatted at flush time
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @classmethod
    def open(cls, settings: AccessLogSettings, *, source: object = "<config>") -> AccessLog:
        """Open the log; ConfigError (key ``access_log.path``) when the file cannot be opened."""
        if settings.format not in ("json", "text"):
            raise ConfigError(source, None, "access_log.format", f"{settings.format!r} is not json or text")
        return cls(settings, None if settings.path == "-" else _open_append(settings.path, source))

    def write(self, record: dict[str, Any]) -> None:
        """Queue one request's record; ``time`` (epoch seconds or text) defaults to now.

        The record is formatted later: the caller must not change it afterwards."""
        if self._closed:
            return
        if "time" not in record:
            record = {"time": time.time(), **record}
        self._pending.append(record)
        self._pending_bytes += LINE_ESTIMATE
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (tests, tools): close() writes it
            self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Write everything queued now, as one write."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        data = "".join(map(self._format, self._pending))
        self._pending.clear()
        self._pending_bytes = 0
        try:
            if self._fd is None:
                sys.stdout.write(data)
                sys.stdout.flush()
            else:
                _write_all(self._fd, data.encode("utf-8"))
        except OSError as exc:  # disk full, closed pipe: requests must go on regardless
            print(f"tlsproxy: access log {self.settings.path}: cannot write: {exc}", file=sys.stderr)

    def reopen(self) -> None:
        """Flush, then open the path again (after a log rotator renamed it)."""
        self.flush()
        if self._fd is not None:
            old, self._fd = self._fd, _open_append(self.settings.path, "<config>")
            os.close(old)

    def close(self) -> None:
        self.flush()
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def format_time(value: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-22T23:02:01.123Z``."""
    if value is None:
        value = time.time()
    seconds = int(value)
    return "%s.%03dZ" % (_utc_second(seconds), (value - seconds) * 1000)


@lru_cache(maxsize=8)
def _utc_second(seconds: int) -> str:
    """``2026-11-22T23:02:01``: a batch's records mostly share their second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    """The record in FIELDS order (extras after), bytes as text, time as RFC 3339."""
    stamp = record.get("time")
    out: dict[str, Any] = {"time": stamp if isinstance(stamp, str) else format_time(stamp)}
    for key in FIELDS[1:]:
        out[key] = _plain(record.get(key))
    for key, value in record.items():
        if key not in out:
            out[key] = _plain(value)
    if isinstance(out["duration_ms"], float):
        out["duration_ms"] = round(out["duration_ms"], 3)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return value


_FIELD_SET = frozenset(FIELDS)


def _json_text(value: Any) -> str:
    """A str / bytes / None value as JSON (what json.dumps writes for it); TypeError otherwise."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is bytes:
        return encode_basestring_ascii(value.decode("utf-8", "backslashreplace"))
    if value is None:
        return "null"
    raise TypeError(kind)


def _json_line(record: dict[str, Any]) -> str:
    """What ``json.dumps(_fields(record), separators=(",", ":"), default=str)`` gives,
    written as one template for the usual record (exactly the FIELDS; text, bytes or
    None where text goes; ints for status and sizes; a finite float duration): one
    format per record instead of a JSON encoder run. Anything else takes json.dumps."""
    if record.keys() == _FIELD_SET:
        status, bytes_in, bytes_out = record["status"], record["bytes_in"], record["bytes_out"]
        duration = record["duration_ms"]
        stamp = record["time"]
        if (
            type(status) is int and type(bytes_in) is int and type(bytes_out) is int
            and type(duration) is float and math.isfinite(duration)
        ):
            try:
                return (
                    f'{{"time":{_json_text(stamp if type(stamp) is str else format_time(stamp))},'
                    f'"client":{_json_text(record["client"])},"tls_version":{_json_text(record["tls_version"])},'
                    f'"sni":{_json_text(record["sni"])},"method":{_json_text(record["method"])},'
                    f'"path":{_json_text(record["path"])},"status":{status},'
                    f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"duration_ms":{round(duration, 3)!r},'
                    f'"service":{_json_text(record["service"])},"upstream":{_json_text(record["upstream"])},'
                    f'"request_id":{_json_text(record["request_id"])}}}\n'
                )
            except TypeError:
                pass  # a value of another type: the general encoder
    return json.dumps(_fields(record), separators=(",", ":"), default=str) + "\n"


def _text_line(record: dict[str, Any]) -> str:
    f = _fields(record)
    request = f"{_text(f['method'])} {_text(f['path'])}"
    duration = f["duration_ms"]
    return (
        f'{f["time"]} {_text(f["client"])} "{request}" {_text(f["status"])} '
        f'in={_text(f["bytes_in"])} out={_text(f["bytes_out"])} '
        f'{"-" if duration is None else f"{duration}ms"} '
        f'service={_text(f["service"])} upstream={_text(f["upstream"])} sni={_text(f["sni"])} '
        f'tls={_text(f["tls_version"])} request_id={_text(f["request_id"])}\n'
    )


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value).translate(_TEXT_ESCAPES)


def _open_append(path: str, source: object) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise ConfigError(source, None, "access_log.path", f"cannot open {path} for appending: {exc.strerror or exc}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
