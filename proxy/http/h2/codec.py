"""The HTTP/2 frame machine for the server side, behind a small interface.

``ServerCodec`` wraps ``h2`` (python-hyper's sans-IO HTTP/2, h11's sibling): bytes in,
our events out; calls in, bytes to send out. The session (``proxy.server.h2_session``)
sees only this module's events and methods, so a faster codec can replace ``h2`` here
without touching the I/O or the request path.

What h2 is told, and why:

* header validation off (``validate_inbound_headers``), and its content-length check
  off for requests: h2 treats a malformed request as a connection error, which would
  end every other stream of the client too. The rules are checked per stream instead
  (``proxy.http.h2.messages.request_head``, and ``h2_stream`` counts the DATA against
  content-length), so a malformed request is refused on its own stream, with a reason.
* outbound normalisation off: the response fields are built lowercase and without
  connection-specific headers (``messages.response_fields``); checking them again
  costs time per response.
* windows: ``stream_window`` per stream and ``connection_window`` for the connection
  bound what a client can send before the proxy acknowledges it; the session
  acknowledges DATA only once the upstream has taken it (``ack``).
* the HPACK decoder stops at ``header_list_limit`` decoded bytes (an HPACK "bomb" of
  references to one large table entry would otherwise inflate without bound), and the
  encoder's dynamic table is kept at ``MAX_ENCODER_TABLE`` whatever size the client
  allows (it would otherwise grow with every new response header, up to 4 GiB).
* a GOAWAY for draining is written beside h2 (``goaway``): h2 refuses to send anything
  after its own GOAWAY, and the streams already open must still get their responses.
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from proxy.errors import ConnectionFailed

Fields = list[tuple[bytes, bytes]]

# RFC 9113 7: error codes the proxy sends.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 3.4: a client's first bytes
DEFAULT_WINDOW = 65535  # RFC 9113 6.9.2: every window's size before SETTINGS change it
MAX_ENCODER_TABLE = 4096  # our HPACK encoder's dynamic table, whatever the client allows
# Streams past the advertised MAX_CONCURRENT_STREAMS that h2 lets through for the session
# to refuse one by one; a client past even that (in one read) has its connection ended.
STREAM_SLACK = 100

_ERROR_NAMES = {
    0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM",
    0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR", 0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED",
}


def error_name(code: int) -> str:
    return _ERROR_NAMES.get(code, f"error {code:#x}")


# -- events (what the session acts on) -------------------------------------------------


@dataclass(slots=True)
class StreamOpened:
    """A request's header block; ``ended``: it has no body (END_STREAM on HEADERS)."""

    stream_id: int
    fields: Fields
    ended: bool


@dataclass(slots=True)
class StreamData:
    """A piece of request body; ``flow_length`` (padding included) is what to ``ack``."""

    stream_id: int
    data: bytes
    flow_length: int


@dataclass(slots=True)
class ResponseOpened:
    """A response's header block (client side); ``ended``: no body or trailers follow."""

    stream_id: int
    fields: Fields
    ended: bool


@dataclass(slots=True)
class InformationalReceived:
    """A 1xx response head (client side)."""

    stream_id: int
    fields: Fields


@dataclass(slots=True)
class StreamTrailers:
    stream_id: int
    fields: Fields


@dataclass(slots=True)
class StreamEnded:
    """The client's half of the stream is complete (END_STREAM)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    code: int


@dataclass(slots=True)
class WindowOpened:
    """The client made room to send more: on one stream, or on all (``stream_id`` 0)."""

    stream_id: int


@dataclass(slots=True)
class SettingsReceived:
    """The peer's SETTINGS arrived (the first one is its preface: limits now known)."""


@dataclass(slots=True)
class PeerClosing:
    """The client sent GOAWAY: no new streams; ``last_stream_id`` is the last it will see answered."""

    last_stream_id: int
    code: int


Event = (
    StreamOpened | ResponseOpened | InformationalReceived | StreamData | StreamTrailers | StreamEnded
    | StreamReset | WindowOpened | PeerClosing | SettingsReceived
)


class _ServerConnection(h2.connection.H2Connection):
    """h2's connection, but a request's content-length is not held against its DATA here:
    h2 fails the whole connection when they disagree (every other stream of the client
    with it), where RFC 9113 8.1.1 makes it an error of that stream. The session counts
    the DATA per stream instead (``h2_stream.StreamDownstream``) and refuses that one;
    the value itself is checked in ``messages.request_head``."""

    def _begin_new_stream(self, stream_id, allowed_ids):  # noqa: ANN001 - h2's signature
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream._initialize_content_length = _no_length_check  # noqa: SLF001 - see the docstring
        return stream


def _no_length_check(_headers: object) -> None:
    """(h2's H2Stream._initialize_content_length, off: the expected length stays None.)"""


class _Codec:
    """What both sides share: events in, frames out, windows."""

    __slots__ = ("_conn", "_extra", "control_frames")

    def __init__(
        self,
        *,
        client_side: bool,
        validate_inbound: bool,
        settings: dict[int, int],
        header_list_limit: int,
        connection_window: int,
        enforced: dict[int, int] | None = None,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=validate_inbound,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            split_outbound_cookies=False,
        )
        conn = self._conn = (_ServerConnection if not client_side else h2.connection.H2Connection)(config=config)
        conn.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        conn.decoder.max_header_list_size = header_list_limit
        conn.initiate_connection()  # our SETTINGS, as advertised
        if enforced is not None:  # what h2 itself holds the peer to, from now on
            conn.local_settings = h2.settings.Settings(client=client_side, initial_values={**settings, **enforced})
        if connection_window > DEFAULT_WINDOW:
            conn.increment_flow_control_window(connection_window - DEFAULT_WINDOW)
        self._extra: list[bytes] = []  # frames written beside h2 (a draining GOAWAY)
        self.control_frames = 0  # PING / SETTINGS / PRIORITY / empty DATA / unknown frames received: flood accounting

    def feed(self, data: bytes) -> list[Event]:
        """Events for ``data`` received; ``ConnectionFailed`` when the client broke the
        protocol (h2 has queued the GOAWAY: send ``bytes_to_send()`` and close)."""
        try:
            received = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", PROTOCOL_ERROR)
            raise ConnectionFailed(f"HTTP/2 protocol error ({error_name(int(code))}): {exc}") from None
        events: list[Event] = []
        append = events.append
        for event in received:
            kind = type(event)
            if kind is h2.events.DataReceived:
                if event.data:
                    append(StreamData(event.stream_id, event.data, event.flow_controlled_length))
                else:
                    if event.flow_controlled_length:  # padding only: nothing to wait for
                        self.ack(event.stream_id, event.flow_controlled_length)
                    if event.stream_ended is None:  # moves nothing: flood accounting (CVE-2019-9518)
                        self.control_frames += 1
            elif kind is h2.events.RequestReceived:
                append(StreamOpened(event.stream_id, event.headers, event.stream_ended is not None))
            elif kind is h2.events.ResponseReceived:
                append(ResponseOpened(event.stream_id, event.headers, event.stream_ended is not None))
            elif kind is h2.events.InformationalResponseReceived:
                append(InformationalReceived(event.stream_id, event.headers))
            elif kind is h2.events.StreamEnded:
                append(StreamEnded(event.stream_id))
            elif kind is h2.events.WindowUpdated:
                append(WindowOpened(event.stream_id))
            elif kind is h2.events.StreamReset:
                append(StreamReset(event.stream_id, int(event.error_code)))
            elif kind is h2.events.TrailersReceived:
                append(StreamTrailers(event.stream_id, event.headers))
            elif kind is h2.events.ConnectionTerminated:
                append(PeerClosing(event.last_stream_id or 0, int(event.error_code)))
            elif kind is h2.events.RemoteSettingsChanged:
                self.control_frames += 1
                table = event.changed_settings.get(h2.settings.SettingCodes.HEADER_TABLE_SIZE)
                if table is not None and table.new_value > MAX_ENCODER_TABLE:
                    self._conn.encoder.header_table_size = MAX_ENCODER_TABLE
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    append(WindowOpened(0))  # every stream's window moved
                append(SettingsReceived())
            else:  # PING, SETTINGS ack, PRIORITY, unknown frames...
                self.control_frames += 1
        return events

    # -- sending ---------------------------------------------------------------------

    def send_headers(self, stream_id: int, fields: Fields, *, end: bool = False) -> None:
        self._conn.send_headers(stream_id, fields, end_stream=end)

    def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """``data`` must fit ``window(stream_id)`` and ``max_frame``."""
        self._conn.send_data(stream_id, data, end_stream=end)

    def window(self, stream_id: int) -> int:
        """How much DATA may be sent on the stream now (its window and the connection's)."""
        try:
            return self._conn.local_flow_control_window(stream_id)
        except h2.exceptions.StreamClosedError:
            return 0

    @property
    def max_frame(self) -> int:
        return self._conn.max_outbound_frame_size

    def ack(self, stream_id: int, flow_length: int) -> None:
        """The body bytes received on the stream were taken: the client may send more."""
        self._conn.acknowledge_received_data(flow_length, stream_id)

    def reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM, unless the stream is closed already (then there is nothing to end)."""
        try:
            self._conn.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def goaway(self, last_stream_id: int, code: int = NO_ERROR) -> None:
        """Announce the end: streams after ``last_stream_id`` will not be served; the ones
        before it are answered as usual (h2's own GOAWAY would forbid that)."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = code
        self._extra.append(frame.serialize())

    def fail(self, code: int) -> None:
        """A connection error of ours (e.g. ENHANCE_YOUR_CALM): GOAWAY, nothing after it."""
        self._conn.close_connection(error_code=code)

    def bytes_to_send(self) -> bytes:
        data = self._conn.data_to_send()
        if self._extra:
            data += b"".join(self._extra)
            self._extra.clear()
        return data


class ServerCodec(_Codec):
    """One client connection's HTTP/2 state (the proxy is the server)."""

    __slots__ = ()

    def __init__(
        self, *, max_concurrent_streams: int, header_list_limit: int, stream_window: int, connection_window: int
    ) -> None:
        super().__init__(
            client_side=False,
            validate_inbound=False,  # per stream instead: proxy.http.h2.messages.request_head
            settings={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,  # WebSockets stay on HTTP/1.1
            },
            header_list_limit=header_list_limit,
            connection_window=connection_window,
            # h2 treats a stream past its own MAX_CONCURRENT_STREAMS as a connection error
            # (every other stream would end with it); RFC 9113 5.1.2 makes it a stream error.
            # So h2 holds a looser bound, and the session refuses each stream past the
            # advertised one with REFUSED_STREAM.
            enforced={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams + STREAM_SLACK},
        )

    @property
    def highest_stream_id(self) -> int:
        return self._conn.highest_inbound_stream_id


class ClientCodec(_Codec):
    """One upstream connection's HTTP/2 state (the proxy is the client). Inbound
    validation stays on: an upstream that breaks the rules (a connection header, an
    uppercase name) fails its connection, and the requests on it get 502."""

    __slots__ = ()

    def __init__(self, *, header_list_limit: int, stream_window: int, connection_window: int) -> None:
        super().__init__(
            client_side=True,
            validate_inbound=True,
            settings={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # an upstream opens no streams to us
            },
            header_list_limit=header_list_limit,
            connection_window=connection_window,
        )

    def next_stream_id(self) -> int:
        return self._conn.get_next_available_stream_id()

    @property
    def room(self) -> int:
        """How many more streams the upstream accepts now (its MAX_CONCURRENT_STREAMS)."""
        conn = self._conn
        return conn.remote_settings.max_concurrent_streams - conn.open_outbound_streams
