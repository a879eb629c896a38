"""The receive buffer of the HTTP/1 engines: O(bytes read), however the bytes trickle in.

Modelled on h11's ``_receivebuffer.py``. Two costs made a head trickled in one byte at
a time quadratic: copying the whole buffer to append each read, and searching it for
the end of the head from its first byte every time. Here reads are appended to one
``bytearray`` in place, taking bytes moves a read offset (the rest is not copied), and a
search resumes where the last failed one stopped, less the pattern's overlap.

The usual case, one read holding a whole message, costs no copy at all: a lone read is
kept as the ``bytes`` it arrived in until a second read has to be appended to it.
"""

from __future__ import annotations

import re


class ReceiveBuffer:
    """Unread bytes from one peer."""

    __slots__ = ("data", "_start", "_searched")

    def __init__(self) -> None:
        # A lone read as it came, or reads appended; empty exactly when nothing is unread
        # (every take that empties the buffer resets it), so ``if buffer.data`` is a test
        # without a method call for the hot paths. Read it through take / take_through.
        self.data: bytes | bytearray = b""
        self._start = 0  # read offset: data[:_start] is taken
        self._searched = 0  # data[:_searched] holds no match of the search in progress

    def __len__(self) -> int:
        return len(self.data) - self._start

    def __bool__(self) -> bool:
        return len(self.data) > self._start

    def feed(self, data: bytes) -> None:
        buf = self.data
        start = self._start
        if start == len(buf):  # empty: keep the read as it came
            self.data = data
            self._start = self._searched = 0
            return
        if type(buf) is bytes:  # a second read: from now on, append in place
            buf = bytearray(memoryview(buf)[start:])
        elif start:
            del buf[:start]  # (CPython moves the bytearray's start: no copy)
        self._searched = max(0, self._searched - start)
        self._start = 0
        buf += data
        self.data = buf

    def take(self, count: int) -> bytes:
        """The next ``count`` bytes (all there are, if fewer)."""
        buf = self.data
        start = self._start
        end = start + count
        if end >= len(buf):
            self.data = b""
            self._start = self._searched = 0
            if type(buf) is bytes:
                return buf[start:] if start else buf
            return bytes(memoryview(buf)[start:])
        self._start = end
        self._searched = 0
        return buf[start:end] if type(buf) is bytes else bytes(memoryview(buf)[start:end])

    def take_through(self, pattern: re.Pattern, overlap: int) -> bytes | None:
        """The unread bytes up to and including ``pattern``'s first match, or None
        (``find`` then ``take``)."""
        end = self.find(pattern, overlap)
        return None if end < 0 else self.take(end)

    def take_all(self) -> bytes:
        return self.take(len(self.data))

    def startswith(self, prefix: bytes) -> bool:
        return self.data.startswith(prefix, self._start)

    def first(self) -> int:
        """The first unread byte's value (the buffer must not be empty)."""
        return self.data[self._start]

    def peek(self, count: int) -> bytes:
        """A copy of the next ``count`` bytes (or fewer), left unread."""
        start = self._start
        return bytes(self.data[start : start + count])

    def find(self, pattern: re.Pattern, overlap: int) -> int:
        """The offset in the unread bytes just past ``pattern``'s first match, or -1.

        A search that fails remembers how far it looked, so the next one (after more
        bytes arrive) starts there less ``overlap``: the longest match, minus one byte,
        that the end of the buffer could hold the start of. Taking bytes starts afresh.
        """
        buf = self.data
        start = self._start
        pos = self._searched - overlap
        match = pattern.search(buf, pos if pos > start else start)
        if match is None:
            self._searched = len(buf)
            return -1
        return match.end() - start

    def match(self, pattern: re.Pattern, end: int) -> re.Match | None:
        """``pattern`` matched against exactly the next ``end`` unread bytes."""
        start = self._start
        return pattern.fullmatch(self.data, start, start + end)
