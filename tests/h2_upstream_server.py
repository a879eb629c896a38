"""A scripted HTTP/2 (h2c) upstream for the HTTP/2-upstream tests: the h2 library on the
server side of real sockets, a thread per connection.

It answers every request with 200 and a JSON body naming the stream, the connection and
what it received (headers, body size) — with ``hold``, only once the test sets ``release``. ``max_streams``: its SETTINGS_MAX_CONCURRENT_STREAMS.
``goaway_after``: after that many requests on a connection, GOAWAY naming the last one
(streams after it are refused). It records the peak number of streams open at once on
each connection, and how many connections it accepted.
"""

from __future__ import annotations

import json
import socket
import threading

import h2.config
import h2.connection
import h2.events
import h2.settings

WAIT = 10.0


class H2Upstream:
    def __init__(self, *, max_streams: int = 100, goaway_after: int = 0, hold: bool = False) -> None:
        self.max_streams = max_streams
        self.goaway_after = goaway_after
        self.hold = hold
        self.release = threading.Event()  # set: answer held requests now
        self.connections = 0
        self.peaks: list[int] = []
        self.requests: list[dict] = []
        self.open_now = 0  # streams received and not yet answered, on all connections
        self.closed_by_peer = 0  # connections the proxy closed
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"h2c://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self.release.set()
        self._thread.join(WAIT)
        self._listener.close()

    def __enter__(self) -> H2Upstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
                index = self.connections
                self.peaks.append(0)
            threading.Thread(target=self._serve, args=(sock, index), daemon=True).start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2.connection.H2Connection(config=config)
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams}
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.05)
        open_streams: dict[int, dict] = {}
        ready: list[int] = []
        served = 0
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                    if not data:
                        with self._lock:
                            self.closed_by_peer += 1
                        return
                    events = conn.receive_data(data)
                except TimeoutError:
                    events = []
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        open_streams[event.stream_id] = {
                            "headers": [(k.decode(), v.decode()) for k, v in event.headers], "body": 0,
                        }
                        with self._lock:
                            self.peaks[index - 1] = max(self.peaks[index - 1], len(open_streams))
                            self.open_now += 1
                    elif isinstance(event, h2.events.DataReceived):
                        if event.stream_id in open_streams:
                            open_streams[event.stream_id]["body"] += len(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        ready.append(event.stream_id)
                    elif isinstance(event, h2.events.StreamReset):
                        open_streams.pop(event.stream_id, None)
                if ready and (not self.hold or self.release.is_set()):
                    for stream_id in ready:
                        request = open_streams.pop(stream_id, None)
                        if request is None:
                            continue
                        with self._lock:
                            self.open_now -= 1
                        served += 1
                        record = {"connection": index, "stream": stream_id, **request}
                        with self._lock:
                            self.requests.append(record)
                        body = json.dumps(record).encode()
                        conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/json"),
                                                      ("content-length", str(len(body)))])
                        conn.send_data(stream_id, body, end_stream=True)
                        if self.goaway_after and served == self.goaway_after:
                            conn.close_connection(last_stream_id=stream_id)
                    ready.clear()
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            sock.close()
