"""WebSocketEcho: a real WebSocket server (the websockets package) on 127.0.0.1, in a
thread, for the tests that tunnel WebSockets through the proxy. It answers each message
with "echo:<message>", records what it received, and sets ``round_trip`` when a message
starts with "got:" (a page telling it that the echo came back)."""

from __future__ import annotations

import asyncio
import contextlib
import threading

WAIT = 10.0


class WebSocketEcho:
    def __enter__(self) -> WebSocketEcho:
        from websockets.asyncio.server import serve  # (the tests using this skip without it)

        self.received: list[str] = []
        self.round_trip = threading.Event()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def echo(connection) -> None:
            async for message in connection:
                self.received.append(message)
                if message.startswith("got:"):
                    self.round_trip.set()
                else:
                    await connection.send(f"echo:{message}")

        async def main() -> None:
            self.server = await serve(echo, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            await self.server.serve_forever()

        self.thread = threading.Thread(target=self._run, args=(main(),), daemon=True)
        self.thread.start()
        assert ready.wait(WAIT)
        return self

    def _run(self, main) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(main)

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.thread.join(WAIT)
        self.loop.close()
