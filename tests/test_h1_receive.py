"""The HTTP/1 receive buffer: O(bytes read) however the bytes trickle in.

Work is counted, not timed: a pattern object that counts the bytes each search looks
at stands in for the engine's head-end pattern, and the buffer's own storage is checked
to grow in place.
"""

from __future__ import annotations

import re

import pytest

from proxy.http import httptools_engine
from proxy.http.engine import EndOfMessage, RequestHead, ResponseHead
from proxy.http.h1.receive import ReceiveBuffer

HEAD_END = re.compile(rb"\n\r?\n")
CRLF = re.compile(rb"\r\n")


class CountingPattern:
    """A compiled pattern that counts the bytes its searches are given to look at."""

    def __init__(self, pattern: re.Pattern) -> None:
        self.pattern = pattern
        self.scanned = 0
        self.searches = 0

    def search(self, data, pos: int = 0, endpos: int | None = None):
        end = len(data) if endpos is None else min(endpos, len(data))
        self.scanned += max(0, end - pos)
        self.searches += 1
        return self.pattern.search(data, pos, end)


# -- the buffer alone


def test_bytes_come_out_as_they_went_in():
    buffer = ReceiveBuffer()
    assert not buffer and len(buffer) == 0
    buffer.feed(b"hello ")
    buffer.feed(b"world")
    assert len(buffer) == 11
    assert buffer.take(3) == b"hel"
    buffer.feed(b"!")
    assert buffer.take(100) == b"lo world!"
    assert not buffer and buffer.take(5) == b""


def test_data_is_empty_exactly_when_nothing_is_unread():
    buffer = ReceiveBuffer()
    for step in (lambda: buffer.feed(b"abc"), lambda: buffer.take(1), lambda: buffer.feed(b"d"),
                 lambda: buffer.take(2), lambda: buffer.take(1), lambda: buffer.feed(b""), lambda: buffer.feed(b"e"),
                 lambda: buffer.take_through(CRLF, 1), lambda: buffer.feed(b"\r\n"), lambda: buffer.take_through(CRLF, 1)):
        step()
        assert bool(buffer.data) == (len(buffer) > 0)
    assert not buffer.data


def test_a_lone_read_taken_whole_is_not_copied():
    buffer = ReceiveBuffer()
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    buffer.feed(data)
    assert buffer.take(len(data)) is data


def test_find_returns_the_end_of_the_match_in_the_unread_bytes():
    buffer = ReceiveBuffer()
    buffer.feed(b"xxGET / HTTP/1.1\r\n\r\nrest")
    buffer.take(2)
    end = buffer.find(HEAD_END, 2)
    assert buffer.take(end) == b"GET / HTTP/1.1\r\n\r\n"
    assert buffer.find(HEAD_END, 2) == -1
    assert buffer.take_all() == b"rest"


@pytest.mark.parametrize("split", range(1, 4))
def test_a_match_split_across_reads_is_found(split):
    end = b"\r\n\r\n"
    buffer = ReceiveBuffer()
    buffer.feed(b"GET / HTTP/1.1" + end[:split])
    assert buffer.find(HEAD_END, 2) == -1
    buffer.feed(end[split:] + b"next")
    assert buffer.find(HEAD_END, 2) == len(b"GET / HTTP/1.1\r\n\r\n")


def test_a_head_trickled_one_byte_at_a_time_is_scanned_in_linear_time():
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n"
    counting = CountingPattern(HEAD_END)
    buffer = ReceiveBuffer()
    storage = set()
    for i in range(len(head)):
        buffer.feed(head[i : i + 1])
        storage.add(id(buffer.data))
        if buffer.find(counting, 2) >= 0:
            break
    assert counting.searches == len(head)
    assert counting.scanned <= 3 * len(head)  # each byte looked at about once (plus the overlap)
    assert len(storage) <= 3  # appended in place: one bytearray, not a new copy per read
    assert buffer.take_all() == head


def test_search_progress_is_forgotten_once_bytes_are_taken():
    buffer = ReceiveBuffer()
    buffer.feed(b"3;ext")
    assert buffer.find(CRLF, 1) == -1
    buffer.feed(b"\r\nabc\r\n")
    assert buffer.find(CRLF, 1) == len(b"3;ext\r\n")
    buffer.take(len(b"3;ext\r\n"))
    assert buffer.take(3) == b"abc"
    assert buffer.find(CRLF, 1) == 2


# -- the engines' fast paths use it


@pytest.fixture
def counting(monkeypatch) -> CountingPattern:
    counter = CountingPattern(httptools_engine._HEAD_END)
    monkeypatch.setattr(httptools_engine, "_HEAD_END", counter)
    return counter


BIG_REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 60000 + b"\r\n\r\n"
BIG_RESPONSE = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 60000 + b"\r\nContent-Length: 0\r\n\r\n"


def test_a_request_head_trickled_in_is_scanned_in_linear_time(counting):
    engine = httptools_engine.HttptoolsServerEngine(65536)
    events = []
    for i in range(len(BIG_REQUEST)):
        engine.feed(BIG_REQUEST[i : i + 1])
        while (event := engine.next_event()) is not None:
            events.append(event)
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert len(events[0].header(b"x-big")) == 60000
    assert counting.scanned <= 3 * len(BIG_REQUEST)


def test_a_response_head_trickled_in_is_scanned_in_linear_time(counting):
    engine = httptools_engine.HttptoolsClientEngine(65536)
    headers = [(b"host", b"a")]
    engine.send_head(RequestHead(b"GET", b"/", headers), headers, b"/")
    engine.send_end()
    events = []
    for i in range(len(BIG_RESPONSE)):
        engine.feed(BIG_RESPONSE[i : i + 1])
        while (event := engine.next_event()) is not None:
            events.append(event)
    assert isinstance(events[0], ResponseHead) and [type(e) for e in events[1:]] == [EndOfMessage]
    assert counting.scanned <= 3 * len(BIG_RESPONSE)
