"""A raw HTTP/2 client for attacking the proxy: ``h2``'s client side over a real TLS
socket (ALPN h2), with outbound header validation and normalisation off so a test
can send what a well-behaved client never would (uppercase names, CR in values,
pseudo-headers out of order...), and raw frames (``send_raw``) for what h2 refuses
to build at all (a CONTINUATION flood, an HPACK bomb).

Every wait is bounded by the socket timeout; nothing sleeps. ``H2Client.response``
reads until a stream is complete, reset, or the connection ends, and returns what
arrived on it (``Answer``). Received DATA is acknowledged at once, except on the
streams in ``hold`` (a client that stops reading one stream: their DATA reopens the
connection's window, never the stream's).
"""

from __future__ import annotations

import contextlib
import time
import socket
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from upstream import WAIT

TIMEOUT = 5.0  # per recv: every test here is bounded


@dataclass
class Answer:
    """What arrived on one stream."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False  # END_STREAM received
    reset: int | None = None  # RST_STREAM error code received

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def client_context(pki, alpn=("h2",), cert=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.set_alpn_protocols(list(alpn))
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


class H2Client:
    """One HTTP/2 connection to the proxy on 127.0.0.1:``port``."""

    def __init__(self, pki, port: int, *, cert=None, sni: str = "localhost", settings: dict | None = None,
                 timeout: float = TIMEOUT, rcvbuf: int = 0) -> None:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
            self.sock = client_context(pki, cert=cert).wrap_socket(sock, server_hostname=sni)
        except BaseException:
            sock.close()
            raise
        assert self.sock.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.answers: dict[int, Answer] = {}
        self.hold: set[int] = set()  # streams whose DATA is not acknowledged
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.remote_settings: dict = {}
        self.closed = False  # EOF (or a reset / TLS error) from the proxy
        self.flush()

    # -- sending ---------------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.flush()
        self.sock.sendall(data)

    def request(self, path: str = "/echo", *, method: str = "GET", authority: str = "localhost",
                extra: list[tuple[str, str]] | None = None, body: bytes | None = None,
                end: bool = True, headers: list[tuple[bytes | str, bytes | str]] | None = None) -> int:
        """Open a stream: ``headers`` as given (pseudo-headers and all), else a plain request
        with ``extra`` fields; ``body`` sent as DATA; END_STREAM when ``end``."""
        stream_id = self.conn.get_next_available_stream_id()
        if headers is None:
            headers = [(":method", method), (":scheme", "https"), (":authority", authority), (":path", path)]
            headers += extra or []
        fields = [(_b(name), _b(value)) for name, value in headers]
        self.conn.send_headers(stream_id, fields, end_stream=end and not body)
        if body:
            self.send_body(stream_id, body, end=end)
        self.flush()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, *, end: bool) -> None:
        """Send ``body`` as the windows allow, reading (and acknowledging) as it waits."""
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.flush()
                self.receive()
                if stream_id in self.answers and (self.answers[stream_id].reset is not None or self.closed):
                    return
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            self.flush()
        if end:
            self.conn.end_stream(stream_id)
            self.flush()

    # -- receiving -------------------------------------------------------------------

    def receive(self) -> list:
        """One recv's events (none once the connection has ended)."""
        if self.closed:
            return []
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            data = b""
        if not data:
            self.closed = True
            return []
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True  # the proxy broke the protocol: the test will say so
            raise
        for event in events:
            self._note(event)
        with contextlib.suppress(h2.exceptions.ProtocolError, OSError):  # OSError: the proxy has closed
            self.flush()
        return events

    def _note(self, event) -> None:
        kind = type(event)
        if kind is h2.events.ResponseReceived or kind is h2.events.InformationalResponseReceived:
            answer = self.answers.setdefault(event.stream_id, Answer())
            answer.headers = list(event.headers)
            answer.status = int(answer.header(b":status"))
        elif kind is h2.events.DataReceived:
            answer = self.answers.setdefault(event.stream_id, Answer())
            answer.body += event.data
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                if event.stream_id not in self.hold:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif event.flow_controlled_length:  # the connection's window only: the others go on
                    self.conn.increment_flow_control_window(event.flow_controlled_length)
        elif kind is h2.events.StreamEnded:
            self.answers.setdefault(event.stream_id, Answer()).ended = True
        elif kind is h2.events.StreamReset:
            self.answers.setdefault(event.stream_id, Answer()).reset = int(event.error_code)
        elif kind is h2.events.ConnectionTerminated:
            self.goaway = event
        elif kind is h2.events.RemoteSettingsChanged:
            self.remote_settings.update({code: change.new_value for code, change in event.changed_settings.items()})

    def wait(self, done, timeout: float = WAIT) -> bool:
        """Receive until ``done()``, the connection ends or ``timeout``; whether ``done()``."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.closed or time.monotonic() > deadline:
                return False
            self.receive()
        return True

    def response(self, stream_id: int) -> Answer:
        """Everything that arrives on ``stream_id`` until it ends, is reset, or the connection ends."""
        def finished() -> bool:
            answer = self.answers.get(stream_id)
            return answer is not None and (answer.ended or answer.reset is not None)

        self.wait(finished)
        return self.answers.get(stream_id, Answer())

    def wait_goaway(self) -> h2.events.ConnectionTerminated | None:
        self.wait(lambda: self.goaway is not None)
        return self.goaway

    def read_until_closed(self) -> None:
        """Read (and decode) everything until the proxy ends the connection."""
        while not self.closed:
            try:
                self.receive()
            except h2.exceptions.ProtocolError:
                pass

    def ignore_stream_limit(self) -> None:
        """Let this client open more streams than the proxy's MAX_CONCURRENT_STREAMS
        (h2 would refuse to, client-side)."""
        self.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1 << 30
        self.conn.remote_settings.acknowledge()

    def survive_goaway(self) -> None:
        """Keep this client working after the proxy's GOAWAY: h2 closes its connection
        state on receiving one and then refuses every frame, even the DATA of the streams
        the GOAWAY promised to finish (a draining proxy's), and refuses to open streams
        (which a test of the proxy's refusal wants to do)."""
        machine = self.conn.state_machine
        closed = h2.connection.ConnectionState.CLOSED
        transitions = dict(type(machine)._transitions)
        for input_ in h2.connection.ConnectionInputs:
            transitions.setdefault((closed, input_), (None, closed))
        machine._transitions = transitions

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")
