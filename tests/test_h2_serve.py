"""`tlsproxy serve` draining HTTP/2 as a user sees it: a real process, SIGTERM with a
stream in flight to a slow upstream. The client (a raw h2 client over TLS, so the frames
can be seen) gets GOAWAY naming its stream, the response still arrives whole, and the
process exits 0."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl

import h2.config
import h2.connection
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame
from test_proxy_serve import LISTENING, Served
from upstream import WAIT


class H2Client:
    """HTTP/2 over TLS (ALPN h2) to 127.0.0.1:port, trusting ``ca``. Requests go out
    through h2; what comes back is read frame by frame (hyperframe, and h2's HPACK
    decoder), because h2's own state machine refuses every frame after a GOAWAY —
    where RFC 9113 6.8 says the streams it names still complete (httpcore#46)."""

    def __init__(self, port: int, ca) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self._buffer = b""

    def get(self, path: str, authority: str) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", "GET"), (":scheme", "https"), (":authority", authority),
                                           (":path", path)], end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        return stream_id

    def frames(self) -> list:
        """The next frames received (HEADERS with ``.fields`` decoded); [] once the server closed."""
        data = self.sock.recv(65536)
        if not data:
            return []
        self._buffer += data
        frames = []
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                break
            frame.parse_body(memoryview(self._buffer[9:9 + length]))
            self._buffer = self._buffer[9 + length:]
            if isinstance(frame, HeadersFrame):
                frame.fields = dict(self.conn.decoder.decode(frame.data, raw=True))
            elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                self.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
            frames.append(frame)
        return frames or self.frames()

    def close(self) -> None:
        self.sock.close()


def test_sigterm_sends_goaway_and_the_h2_stream_in_flight_completes(pki, upstream, tmp_path):
    cert, key = pki.server
    args = ["--listen", "127.0.0.1:0", "--upstream", upstream.url, "--cert", str(cert), "--key", str(key)]
    with Served(args, tmp_path) as served:
        port = served.wait_for(LISTENING).group(1)
        client = H2Client(int(port), pki.ca_pem)
        try:
            stream_id = client.get("/held?in-flight", f"localhost:{port}")
            assert upstream.holding.wait(WAIT)  # the request is at the upstream, unanswered
            served.proc.send_signal(signal.SIGTERM)
            goaway = None
            while goaway is None:  # the upstream still holds the answer: GOAWAY comes first
                frames = client.frames()
                assert frames, "the proxy closed the connection before sending GOAWAY"
                goaway = next((f for f in frames if isinstance(f, GoAwayFrame)), None)
                assert not any(isinstance(f, (HeadersFrame, DataFrame, RstStreamFrame)) for f in frames), frames
            assert goaway.error_code == 0 and goaway.last_stream_id == stream_id
            upstream.let_go()
            head, body, ended = None, b"", False
            while not ended:
                frames = client.frames()
                assert frames, "the connection closed before the stream in flight completed"
                for frame in frames:
                    assert not isinstance(frame, RstStreamFrame), frame
                    if isinstance(frame, HeadersFrame) and frame.stream_id == stream_id:
                        head = frame.fields
                    elif isinstance(frame, DataFrame) and frame.stream_id == stream_id:
                        body += frame.data
                    ended = ended or (frame.stream_id == stream_id and "END_STREAM" in frame.flags)
            assert head[b":status"] == b"200"
            assert json.loads(body)["target"] == "/held?in-flight"
            while client.frames():  # then the proxy closes the connection
                pass
        finally:
            client.close()
        assert served.proc.wait(WAIT) == 0
        served.wait_for(re.compile("stopping"))
