"""HTTP/2 bounds (SPEC 4a): max_concurrent_streams, CONTINUATION floods, HPACK bombs,
rapid reset (CVE-2023-44487), PING / SETTINGS / empty-DATA floods. Each abuse is
answered (a refusal or GOAWAY) within a bound, and the proxy keeps serving other
connections; each has its twin, the same traffic at a reasonable rate, served."""

from __future__ import annotations

import ssl

import h2.errors
import h2.events
import h2.settings
import pytest
from h2client import H2Client
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, SettingsFrame
from upstream import ProxyThread, proxy_config, service

from proxy.config.model import Limits, Timeouts

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/echo")]


@pytest.fixture
def px(pki, upstream, tmp_path):
    with ProxyThread(proxy_config(pki, service("app", upstream), tmp_path)) as proxy:
        yield proxy


def served_on_a_new_connection(pki, px) -> None:
    with H2Client(pki, px.port) as client:
        answer = client.response(client.request("/echo"))
        assert answer.status == 200 and answer.ended


def settled(client: H2Client) -> None:
    """Wait for the proxy's SETTINGS (our ACK of them goes out with the next flush)."""
    assert client.wait(lambda: h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS in client.remote_settings)


# -- max_concurrent_streams ------------------------------------------------------------


def test_max_concurrent_streams_is_advertised_and_extra_streams_refused(pki, upstream, tmp_path):
    """Five streams held open at the upstream, then a sixth the client opens anyway:
    RFC 9113 5.1.2 makes it a stream error (PROTOCOL_ERROR or REFUSED_STREAM), so the
    sixth is refused and the five held ones still complete."""
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_concurrent_streams=5))
    with ProxyThread(config) as px, H2Client(pki, px.port) as client:
        settled(client)
        assert client.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 5
        held = [client.request("/held") for _ in range(5)]
        assert upstream.holding.wait(5)
        client.ignore_stream_limit()
        extra = client.request("/echo")
        refused = client.response(extra)
        assert refused.reset == h2.errors.ErrorCodes.REFUSED_STREAM, (refused, client.goaway)
        assert client.goaway is None
        upstream.let_go()
        for stream_id in held:
            assert client.response(stream_id).status == 200
        assert client.response(client.request("/echo")).status == 200  # a slot is free again
    assert [r["target"] for r in upstream.requests].count("/held") == 5


def test_max_concurrent_streams_0_means_unlimited(pki, upstream, tmp_path):
    """SPEC 3: 0 = unlimited — not SETTINGS_MAX_CONCURRENT_STREAMS 0, which would let no
    request through at all."""
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_concurrent_streams=0))
    with ProxyThread(config) as px, H2Client(pki, px.port) as client:
        settled(client)
        assert client.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] >= 2**31 - 1
        assert client.response(client.request("/echo")).status == 200


# -- header blocks ---------------------------------------------------------------------


def test_continuation_flood_ends_the_connection(pki, upstream, px):
    """HEADERS without END_HEADERS, then CONTINUATION frames without end: the proxy
    stops buffering them (h2 allows 64) and ends the connection."""
    block = Encoder().encode(BASE + [(b"x-pad", b"a" * 100)])
    frames = [HeadersFrame(1, data=block[:10]).serialize()]
    piece = block[10:11]
    frames += [ContinuationFrame(1, data=piece).serialize() for _ in range(5000)]
    with H2Client(pki, px.port) as client:
        settled(client)
        flood(client, b"".join(frames), 1)
        client.read_until_closed()
        assert client.goaway is None or client.goaway.error_code != h2.errors.ErrorCodes.NO_ERROR
    assert upstream.requests == []
    served_on_a_new_connection(pki, px)


def test_a_header_block_in_a_few_continuations_is_served(pki, upstream, px):
    """The twin: a 40 KB header block, which h2 splits into HEADERS and CONTINUATION
    frames of 16 KiB (the largest frame the proxy accepts)."""
    with H2Client(pki, px.port) as client:
        settled(client)
        answer = client.response(client.request("/echo", extra=[("x-pad", "a" * 40_000)]))
        assert answer.status == 200 and b"x-pad" in answer.body
    assert len(upstream.requests) == 1


def bomb(client: H2Client, references: int) -> int:
    """A request whose one 4000-byte header enters HPACK's dynamic table, then is
    referenced ``references`` more times (one byte each on the wire)."""
    big = (b"x-bomb", b"b" * 4000)
    return client.request(headers=BASE + [big] * (references + 1))


def test_hpack_bomb_is_refused_within_a_bound(pki, upstream, px):
    """~30 KB on the wire that would decode to 400 MB: the decoder stops at its
    limit (2 x max_header_bytes) and the connection ends with GOAWAY."""
    with H2Client(pki, px.port) as client:
        settled(client)
        stream_id = bomb(client, 100_000)
        client.read_until_closed()
        answer = client.answers.get(stream_id)
        assert client.goaway is not None or (answer is not None and answer.status == 431)
        if client.goaway is not None:
            assert client.goaway.error_code in (CALM, h2.errors.ErrorCodes.COMPRESSION_ERROR,
                                                h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert upstream.requests == []
    served_on_a_new_connection(pki, px)


def test_small_hpack_bomb_over_max_header_bytes_gets_431_on_its_stream(pki, upstream, tmp_path):
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_header_bytes=8192))
    with ProxyThread(config) as px, H2Client(pki, px.port) as client:
        settled(client)
        answer = client.response(bomb(client, 4))  # 20 KB decoded: over 8 KiB, under the hard limit
        assert answer.status == 431 and answer.ended
        twin = client.response(client.request("/echo", extra=[("x-bomb", "b" * 4000)]))  # one copy: 4 KB
        assert twin.status == 200
    assert len(upstream.requests) == 1


# -- rapid reset (CVE-2023-44487) ------------------------------------------------------


def open_and_reset(client: H2Client, count: int) -> None:
    """``count`` streams opened and reset at once, all in one write."""
    for _ in range(count):
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, BASE, end_stream=True)
        client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    client.flush()


def test_rapid_reset_gets_goaway_enhance_your_calm(pki, upstream, px):
    with H2Client(pki, px.port) as client:
        settled(client)
        open_and_reset(client, 2000)
        assert client.wait_goaway() is not None, "no GOAWAY after 2000 streams reset at once"
        assert client.goaway.error_code == CALM
    served_on_a_new_connection(pki, px)


def test_a_few_resets_are_allowed(pki, upstream, px):
    """The twin: a page navigation cancelling its loads now and then."""
    with H2Client(pki, px.port) as client:
        settled(client)
        open_and_reset(client, 50)
        answer = client.response(client.request("/echo"))
        assert answer.status == 200 and client.goaway is None


# -- control frame floods --------------------------------------------------------------


def flood(client: H2Client, frame: bytes, count: int) -> None:
    try:
        client.send_raw(frame * count)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass  # the proxy stopped reading (GOAWAY sent) before it read them all


@pytest.mark.parametrize("frame", [
    PingFrame(0, opaque_data=b"12345678").serialize(),
    SettingsFrame(0).serialize(),
    SettingsFrame(0, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535}).serialize(),
], ids=["ping", "settings-empty", "settings-window"])
def test_control_frame_flood_gets_goaway_enhance_your_calm(pki, upstream, px, frame):
    with H2Client(pki, px.port) as client:
        settled(client)
        flood(client, frame, 20_000)
        assert client.wait_goaway() is not None
        assert client.goaway.error_code == CALM
    served_on_a_new_connection(pki, px)


def test_a_few_pings_are_answered(pki, upstream, px):
    with H2Client(pki, px.port) as client:
        settled(client)
        acks = []
        client.send_raw(PingFrame(0, opaque_data=b"12345678").serialize() * 100)
        while len(acks) < 100 and not client.closed:  # each recv bounded by the socket timeout
            acks.extend(event for event in client.receive() if isinstance(event, h2.events.PingAckReceived))
        assert len(acks) == 100 and client.goaway is None
        assert client.response(client.request("/echo")).status == 200


def test_empty_data_flood_gets_goaway_enhance_your_calm(pki, upstream, px):
    """Empty DATA frames without END_STREAM (CVE-2019-9518): each costs the proxy work,
    none moves a byte; they count as control frames."""
    with H2Client(pki, px.port) as client:
        settled(client)
        stream_id = client.request("/echo", method="POST", end=False)
        flood(client, DataFrame(stream_id, data=b"").serialize(), 20_000)
        assert client.wait_goaway() is not None, "an empty DATA flood was never stopped"
        assert client.goaway.error_code == CALM
    served_on_a_new_connection(pki, px)


def test_streams_reset_before_they_started_do_not_keep_the_connection_busy(pki, upstream, tmp_path):
    """Streams opened and reset in the same read are cancelled before their task ever
    ran: they must still be forgotten, or each leaks for the connection's lifetime and
    the connection never counts as idle (the idle timeout never closes it)."""
    config = proxy_config(pki, service("app", upstream), tmp_path, timeouts=Timeouts(idle=0.5))
    with ProxyThread(config) as px, H2Client(pki, px.port) as client:
        settled(client)
        open_and_reset(client, 50)
        assert client.response(client.request("/echo")).status == 200
        client.read_until_closed()  # each recv bounded by the client's 5 s timeout
        assert client.goaway is not None and client.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        assert client.closed


def test_more_early_resets_than_max_concurrent_streams_leave_the_connection_serving(pki, upstream, tmp_path):
    """A reset stream is closed (RFC 9113 5.1): it no longer counts against
    max_concurrent_streams, whether or not its task had started."""
    config = proxy_config(pki, service("app", upstream), tmp_path, limits=Limits(max_concurrent_streams=10))
    with ProxyThread(config) as px, H2Client(pki, px.port) as client:
        settled(client)
        for _ in range(5):
            open_and_reset(client, 8)
        answer = client.response(client.request("/echo"))
        assert answer.status == 200, answer
