"""One access-log line per request, written in batches off the request path.

``json``: one object per line with the keys of ``FIELDS`` (then any extra keys the
caller added: ``client_subject`` and ``client_fingerprint`` when the client presented a
verified certificate); ``text``: one readable line, nginx-like::

    2026-11-22T23:02:01.123Z 127.0.0.1 "GET /api/x HTTP/2" 200 in=0 out=123 1.234ms service=api
      upstream=127.0.0.1:9000 sni=api.localhost tls=TLSv1.3 request_id=4f0c…
      [client_subject=CN=alice client_fingerprint=sha256:…]

Records are queued as the caller built them and formatted at flush time, one batch
at once (a request pays for appending a dict, not for a JSON encoder run), then
written with one ``write`` per batch when the queue passes FLUSH_BYTES (estimated at
LINE_ESTIMATE per record), on a loop timer FLUSH_INTERVAL after the first unwritten
record, and on close. A file is opened O_APPEND and each batch is one ``os.write``, so several worker
processes appending to the same file do not tear each other's lines. ``reopen`` lets
a log rotator move the file away (hook it to SIGUSR1, as nginx does).

Stdout is usually a pipe (a container runtime, a log shipper), and a reader that stops
reading would block a ``write`` — and with it the event loop and every connection. So
batches for stdout go through ``PipeWriter``: a thread of its own does the blocking
writes, and the loop only appends to its queue, bounded by MAX_QUEUED_BYTES. When the
queue is full, batches are dropped and counted (``dropped_lines``), and a warning says
so when it starts and how many were lost once lines get through again: as with nginx's
buffered log, losing lines is better than freezing the proxy.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from typing import Any

from proxy.config.model import AccessLogSettings
from proxy.errors import ConfigError, os_error_reason

FIELDS = (
    "time",
    "client",
    "tls_version",
    "sni",
    "protocol",
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
# Written only when a client certificate was verified (SPEC section 3).
CLIENT_CERT_FIELDS = ("client_subject", "client_fingerprint")
# A request path record: these values in a tuple (``write_request``), the last two None
# without a verified client certificate.
REQUEST_FIELDS = FIELDS + CLIENT_CERT_FIELDS
FLUSH_BYTES = 64 * 1024
LINE_ESTIMATE = 320  # bytes per queued record, for FLUSH_BYTES (a typical JSON line)
FLUSH_INTERVAL = 0.2
FILE_MODE = 0o640
MAX_QUEUED_BYTES = 4 * 1024 * 1024  # stdout batches waiting for a slow reader
CLOSE_WAIT = 2.0  # how long close() waits for a stdout reader to take the rest

log = logging.getLogger("tlsproxy")

# Text lines stay one line and unambiguous whatever a client put in its request.
_TEXT_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}
_TEXT_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord(" "): "%20"})


class AccessLog:
    """Formats records and hands them to the output in batches."""

    def __init__(self, settings: AccessLogSettings, fd: int | None) -> None:
        self.settings = settings
        self._fd = fd  # None: stdout, looked up at flush time (tests swap sys.stdout)
        self._format = _json_line if settings.format == "json" else _text_line
        self._pending: list[tuple | dict[str, Any]] = []  # records, formatted at flush time
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._stdout: PipeWriter | None = None  # made at the first batch for stdout

    @classmethod
    def open(cls, settings: AccessLogSettings, *, source: object = "<config>") -> AccessLog:
        """Open the log; ConfigError (key ``access_log.path``) when the file cannot be opened."""
        if settings.format not in ("json", "text"):
            raise ConfigError(source, None, "access_log.format", f"{settings.format!r} is not json or text")
        return cls(settings, None if settings.path == "-" else _open_append(settings.path, source))

    def write(self, record: dict[str, Any]) -> None:
        """Queue one request's record; ``time`` (epoch seconds or text) defaults to now.

        The record is formatted later: the caller must not change it afterwards."""
        if "time" not in record:
            record = {"time": time.time(), **record}
        self.write_request(record)

    def write_request(self, values: tuple | dict[str, Any]) -> None:
        """Queue one request's record as REQUEST_FIELDS values: the request path's, a
        tuple to make rather than a dict (``write`` queues its dicts here too)."""
        if self._closed:
            return
        self._pending.append(values)
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
        lines = len(self._pending)
        data = "".join(map(self._format, self._pending))
        self._pending.clear()
        self._pending_bytes = 0
        try:
            if self._fd is not None:
                _write_all(self._fd, data.encode("utf-8"))
                return
            writer = self._stdout_writer()
            if writer is not None:
                writer.put(data.encode("utf-8"), lines)
            else:  # no descriptor (a test's captured stdout): it cannot block
                sys.stdout.write(data)
                sys.stdout.flush()
        except OSError as exc:  # disk full, closed pipe: requests must go on regardless
            print(f"tlsproxy: access log {self.settings.path}: cannot write: {exc}", file=sys.stderr)

    @property
    def dropped_lines(self) -> int:
        """Lines dropped because stdout was not read fast enough."""
        return self._stdout.dropped_lines if self._stdout is not None else 0

    def _stdout_writer(self) -> PipeWriter | None:
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            return None
        writer = self._stdout
        if writer is None or writer.fd != fd:  # (tests swap sys.stdout)
            if writer is not None:
                writer.close(CLOSE_WAIT)
            sys.stdout.flush()  # whatever was printed before goes first
            writer = self._stdout = PipeWriter(fd)
        return writer

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
        if self._stdout is not None:
            self._stdout.close(CLOSE_WAIT)


class PipeWriter:
    """Writes batches to a descriptor from a thread of its own (see the module docstring):
    ``put`` never blocks; at most MAX_QUEUED_BYTES wait (the batch being written included)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dropped_lines = 0
        self._reported = 0  # dropped_lines when a warning last said it
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._closing = False
        self._failed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tlsproxy access log", daemon=True)
        self._thread.start()

    def put(self, data: bytes, lines: int) -> None:
        with self._changed:
            if self._failed:
                return
            dropped, reported = self.dropped_lines, self._reported
            if self._queued + len(data) > MAX_QUEUED_BYTES:
                self.dropped_lines += lines
            else:
                self._queue.append(data)
                self._queued += len(data)
                self._changed.notify()
                self._reported = dropped
        # Said outside the lock: the log's own output may be slow too.
        if self.dropped_lines != dropped and dropped == reported:
            log.warning("access log: stdout is not being read; dropping lines until it is")
        elif dropped != reported and self._reported == dropped:
            log.warning("access log: stdout is read again; %d lines dropped in all", dropped)

    def close(self, timeout: float) -> None:
        """Let the thread write what is queued, for up to ``timeout`` seconds."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout)
        with self._changed:
            unwritten = sum(data.count(b"\n") for data in self._queue)
        if self.dropped_lines or unwritten:
            log.warning("access log: %d lines could not be written to stdout", self.dropped_lines + unwritten)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                data = self._queue[0]
            try:
                _write_all(self.fd, data)
            except OSError as exc:  # the reader is gone (EPIPE): nothing more can be written
                print(f"tlsproxy: access log to stdout: cannot write: {exc}", file=sys.stderr)
                with self._changed:
                    self._failed = True
                    self._queue.clear()
                    self._queued = 0
                return
            with self._changed:
                self._queue.popleft()
                self._queued -= len(data)


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


# JSON for the fields a connection's or a service's records share, and for methods:
# ``("client", "tls_version", "sni", "protocol")`` values -> '"client":...,"protocol":...'.
# A batch's records mostly repeat them, so each record makes one tuple and finds its
# fragments in a dict instead of escaping each value (callgrind: 40k -> ~15k instructions
# per record). Keyed by the values alone: a connection's four never equal a service's
# two. Bounded: once full, new values are escaped every time.
_fragments: dict[tuple, str] = {}
_FRAGMENTS_MAX = 4096
_CONNECTION_KEYS = ("client", "tls_version", "sni", "protocol")
_SERVICE_KEYS = ("service", "upstream")


def _fragment(values: tuple, keys: tuple[str, ...]) -> str:
    """``"key":value`` pairs for ``values`` (TypeError for a value that is not text, bytes or None)."""
    text = ",".join(f'"{key}":{_json_text(value)}' for key, value in zip(keys, values))
    if len(_fragments) < _FRAGMENTS_MAX:
        _fragments[values] = text
    return text


@lru_cache(maxsize=8)
def _second_text(seconds: int) -> str:
    return '"%s.' % _utc_second(seconds)


def _json_line(record: dict[str, Any] | tuple) -> str:
    """What ``json.dumps(_fields(record), separators=(",", ":"), default=str)`` gives
    (for a tuple: that of ``_record_of(record)``). A request path record (a
    REQUEST_FIELDS tuple) or a dict with exactly the FIELDS goes through one template;
    anything else takes json.dumps."""
    if type(record) is tuple:
        return _json_values(record)
    if record.keys() == _FIELD_SET:  # (with the certificate's keys: their order is the dict's)
        return _json_values(tuple(map(record.get, REQUEST_FIELDS)))
    return json.dumps(_fields(record), separators=(",", ":"), default=str) + "\n"


def _json_values(values: tuple) -> str:
    """The line for a REQUEST_FIELDS tuple: the usual one (text, bytes or None where text
    goes; ints for status and sizes; a finite float duration; an epoch time) as one
    template, the fields a connection's or a service's records share from
    ``_fragments``, with no Python call per field; any other values through json.dumps."""
    (stamp, client, tls_version, sni, protocol, method, path, status, bytes_in, bytes_out, duration, service,
     upstream, request_id, subject, fingerprint) = values
    if (
        type(status) is int and type(bytes_in) is int and type(bytes_out) is int
        and type(duration) is float and math.isfinite(duration) and type(stamp) is float and stamp >= 0.0
    ):
        fragment = _fragments.get
        connection = (client, tls_version, sni, protocol)
        upstream_of = (service, upstream)
        seconds = int(stamp)
        if 0.0 <= duration < 1e9:
            # repr(round(duration, 3)) without its two extra float <-> decimal
            # conversions: for such values the shortest repr of the rounded float is its
            # 3-decimal form, zeros stripped.
            milliseconds = ("%.3f" % duration).rstrip("0")
            if milliseconds[-1] == ".":
                milliseconds += "0"
        else:
            milliseconds = repr(round(duration, 3))
        if type(request_id) is bytes and request_id.isalnum():  # a generated id is hex: nothing to escape
            request_id = f'"{request_id.decode("ascii")}"'
        else:
            request_id = _json_text(request_id)
        try:
            line = (
                f'{{"time":{_second_text(seconds)}{_MILLISECONDS[int((stamp - seconds) * 1000)]}Z",'
                f"{fragment(connection) or _fragment(connection, _CONNECTION_KEYS)},"
                f'"method":{_METHODS.get(method) or _json_text(method)},'
                f'"path":{_json_text(path)},"status":{status},'
                f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"duration_ms":{milliseconds},'
                f"{fragment(upstream_of) or _fragment(upstream_of, _SERVICE_KEYS)},"
                f'"request_id":{request_id}'
            )
            if subject is None and fingerprint is None:
                return line + "}\n"
            return f'{line},"client_subject":{_json_text(subject)},"client_fingerprint":{_json_text(fingerprint)}}}\n'
        except TypeError:
            pass  # a value of another type (or unhashable): the general encoder
    return json.dumps(_fields(_record_of(values)), separators=(",", ":"), default=str) + "\n"


# A time's milliseconds, as the line writes them ("%03d" per record is ~0.4 us of ~2 us).
_MILLISECONDS = tuple("%03d" % n for n in range(1000))

# The methods' JSON, the usual ones (others are escaped each time).
_METHODS = {
    spelling: encode_basestring_ascii(name)
    for name in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")
    for spelling in (name, name.encode("ascii"))
}


def _record_of(values: tuple) -> dict[str, Any]:
    """A REQUEST_FIELDS tuple as the dict ``write`` takes (no client certificate keys
    when there was none)."""
    record = dict(zip(REQUEST_FIELDS, values))
    if values[-2] is None and values[-1] is None:
        del record["client_subject"], record["client_fingerprint"]
    return record


def _text_line(record: dict[str, Any] | tuple) -> str:
    f = _fields(_record_of(record) if type(record) is tuple else record)
    request = f"{_text(f['method'])} {_text(f['path'])}"
    if f["protocol"]:
        request += f" {_text(f['protocol'])}"
    duration = f["duration_ms"]
    return (
        f'{f["time"]} {_text(f["client"])} "{request}" {_text(f["status"])} '
        f'in={_text(f["bytes_in"])} out={_text(f["bytes_out"])} '
        f'{"-" if duration is None else f"{duration}ms"} '
        f'service={_text(f["service"])} upstream={_text(f["upstream"])} sni={_text(f["sni"])} '
        f'tls={_text(f["tls_version"])} request_id={_text(f["request_id"])}'
        + "".join(f" {key}={_text(f[key])}" for key in CLIENT_CERT_FIELDS if key in f)
        + "\n"
    )


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value).translate(_TEXT_ESCAPES)


def _open_append(path: str, source: object) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise ConfigError(source, None, "access_log.path", f"cannot open {path} for appending: {os_error_reason(exc)}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
