"""TLSChannel: a Channel that runs server-side TLS itself (ssl.MemoryBIO) over TCP.

Why not ``loop.start_tls`` / ``connect_accepted_socket(ssl=...)``: measured with
uvloop 0.23 and asyncio (Python 3.11, OpenSSL 3), when the server side of a handshake
fails — no client certificate in ``require`` mode, an untrusted or expired one, a TLS
version the listener refuses — they abort the transport without sending the alert
OpenSSL produced, so the client sees "connection reset" instead of e.g.
``certificate required``. SPEC section 6 promises the alert. Owning the SSLObject lets
us flush the alert before closing; it is the same MemoryBIO mechanism uvloop and
asyncio use internally, with the same OpenSSL work per record.

Also, closing sends close_notify and then closes TCP at once, without waiting for
the client's close_notify (which idle HTTP clients never send).

Writes queue as plaintext in ``Channel``'s write queue (the one coalescing layer) and are
encrypted when it sends them (at the end of the loop iteration, large amounts at once):
what was queued small is joined into one TLS record, and a response followed by closing
the connection (``Connection: close``) leaves in one send() with the close_notify,
instead of two (a send is a few % of a handshake's CPU). The outgoing TLS buffer is
emptied into the transport at every send, so it holds nothing between them.
"""

from __future__ import annotations

import asyncio
import ctypes
import ssl

from proxy.server.channel import (
    FORWARD_READ_SIZE, READ_LIMIT, SEND_NOW, WRITE_LIMIT, Channel, ConnectionLost, PerLoop, _time_out,
)
from proxy.tls.openssl_ctl import close_notify_sender, memory_bio_releaser

_RECORD = 16 * 1024 + 256  # room for one TLS record's plaintext
# A MemoryBIO keeps the largest size it ever held, for its life (as RSS): received bytes go
# into the TLS buffer a record's worth at a time, so it does not grow past ~2 records.
_BIO_STEP = 16 * 1024
# Plaintext is encrypted up to this much in one SSL_write and taken out of the outgoing
# MemoryBIO in one read: a receive's worth while forwarding (FORWARD_READ_SIZE). One write
# per record instead costs a Python-level write/read pair per 16 KiB (1 MiB responses,
# paired on one core: +4.4 % requests per CPU second). The buffer it grows (~255 KiB with
# BUF_MEM's growth) is freed by ``_GrownBuffers`` within a second.
_ENCRYPT_STEP = FORWARD_READ_SIZE
# Frees an empty MemoryBIO's buffer: what the ClientHello and our flight left there
# (~1.7 KiB a connection) is not held by an idle connection (see _going_idle).
_release_bio = memory_bio_releaser()
# glibc's malloc_trim (None elsewhere, e.g. musl): see _GrownBuffers.
try:
    _TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _TRIM = None
# Our close_notify without SSLObject.unwrap's second SSL_shutdown and its exception.
_write_close_notify = close_notify_sender()
TLS_HANDSHAKE_RECORD = 0x16
HANDSHAKE_LINGER = 1.0  # after a failed handshake's alert (see _fail_handshake)


class PlainHTTP(ConnectionError):
    """The client's first byte is not a TLS handshake record: plain HTTP on the TLS port
    (``TLSChannel.refuse_plain_http`` answers it)."""


class NothingReceived(ConnectionError):
    """The client closed, or the handshake timed out, before it sent a single byte."""


class TLSChannel(Channel):
    """Server-side TLS on a plain TCP transport; ``await handshake()`` first."""

    __slots__ = (
        "_incoming", "_outgoing", "ssl_object", "_handshaken", "_handshake_error", "_handshake_waiter",
        "_first_byte_at", "plain_http", "_handshake_timeout", "_handshake_timer", "_grown",
    )

    def __init__(self, context: ssl.SSLContext, read_limit: int = READ_LIMIT, write_limit: int = WRITE_LIMIT):
        super().__init__(read_limit, write_limit)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshaken = False
        self._handshake_error: BaseException | None = None
        self._handshake_waiter: asyncio.Future | None = None
        # Loop time of the client's first byte (0: none yet). The first chunk decides
        # TLS or plain HTTP, instead of a separate MSG_PEEK wait before the transport.
        self._first_byte_at = 0.0
        self.plain_http = False
        self._handshake_timeout = 0.0
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._grown = False  # listed in _GrownBuffers: a large send grew the outgoing buffer

    async def handshake(self, timeout: float) -> None:
        """Complete the handshake or raise what failed it (ssl.SSLError, TimeoutError,
        ConnectionResetError). On failure the alert has been sent and TCP closed.

        ``timeout`` bounds the wait for the first byte, then (again) the handshake from
        it. Raises NothingReceived when the client closed or timed out before sending
        anything (TCP closed), PlainHTTP when its first byte is not a TLS handshake
        record (TCP open: ``refuse_plain_http``)."""
        if not self._handshaken and self._handshake_error is None:
            # One plain timer rather than ``asyncio.timeout`` (a Timeout object, a
            # reschedule and a task cancel/uncancel per connection: measurable per handshake).
            loop = self.loop or asyncio.get_running_loop()
            waiter = self._handshake_waiter = loop.create_future()
            self._handshake_timeout = timeout
            timer = loop.call_later(timeout, self._handshake_timer_fired) if timeout else None
            self._handshake_timer = timer
            try:
                await waiter
            except TimeoutError:
                self.abort()
                if not self._first_byte_at:
                    raise NothingReceived("no byte before the handshake timeout") from None
                raise
            finally:
                self._handshake_waiter = None
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                    self._handshake_timer = None
        if self._handshake_error is not None:
            if not self._first_byte_at and not isinstance(self._handshake_error, NothingReceived):
                raise NothingReceived(str(self._handshake_error))
            raise self._handshake_error

    def _handshake_timer_fired(self) -> None:
        self._handshake_timer = None
        waiter = self._handshake_waiter
        if waiter is None or waiter.done():
            return
        first = self._first_byte_at
        if first:
            # The first byte restarts the handshake timeout (as the separate peek did).
            deadline = first + self._handshake_timeout
            if self.loop.time() < deadline - 0.001:
                self._handshake_timer = self.loop.call_at(deadline, self._handshake_timer_fired)
                return
        waiter.set_exception(TimeoutError())

    async def refuse_plain_http(self, response: bytes, linger: float) -> None:
        """Plain HTTP on the TLS port: send ``response``, shut our side, wait up to
        ``linger`` seconds for the client to close first (closing with unread bytes
        would make the kernel send a reset that can destroy the answer), then close."""
        transport = self.transport
        try:
            if transport is None or transport.is_closing():
                return
            transport.write(response)
            if transport.can_write_eof():
                transport.write_eof()
            if not (self._eof or self.closed):
                waiter = self._read_waiter = self.loop.create_future()
                timer = self.loop.call_later(linger, _time_out, waiter)
                try:
                    await waiter
                except TimeoutError:
                    pass
                finally:
                    self._read_waiter = None
                    timer.cancel()
        finally:
            if transport is not None:
                transport.close()

    # -- protocol callbacks from the TCP transport -------------------------------------

    def buffer_updated(self, nbytes: int) -> None:
        # No bytes object: the TLS buffer copies straight from the receive buffer. The
        # usual case (a request, after the handshake) skips data_received's checks.
        if self._handshaken and nbytes <= _BIO_STEP and self._handshake_error is None:
            self._incoming.write(self._receive_view[:nbytes])
            self._decrypt()
        else:
            self.data_received(self._receive_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes from TCP (``Channel.data_received`` takes the decrypted ones)."""
        if self._handshake_error is not None:
            return  # failed: the alert is on its way out (or plain HTTP), the rest is ignored
        if not self._first_byte_at:
            self._first_byte_at = self.loop.time()
            if data[0] != TLS_HANDSHAKE_RECORD:
                self.plain_http = True
                self._handshake_error = PlainHTTP("plain HTTP on the TLS port")
                self._wake_handshake()
                return
        if not self._handshaken:
            self._incoming.write(data)
            self._continue_handshake()
            if not self._handshaken:
                return
            self._decrypt()
        elif len(data) <= _BIO_STEP:
            self._incoming.write(data)
            self._decrypt()
        else:
            view = memoryview(data)
            for start in range(0, len(view), _BIO_STEP):
                if self.closed:
                    return
                self._incoming.write(view[start:start + _BIO_STEP])
                self._decrypt()

    def eof_received(self) -> bool:
        if self.plain_http:
            self._eof = True
            self._wake_reader()
            return True  # the 400 can still go out
        if not self._handshaken:
            self._fail_handshake(ConnectionResetError("client closed the connection during the handshake"))
            return False
        super().eof_received()
        return True  # TCP half-close: the response can still go out

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._handshaken and self._handshake_error is None:
            self._handshake_error = ConnectionResetError("client closed the connection during the handshake")
            self._wake_handshake()
        super().connection_lost(exc)

    # -- TLS -----------------------------------------------------------------------------

    def _going_idle(self) -> None:
        """A read is about to wait: free the TLS buffers the handshake grew (the first
        time only: a request each way regrows them a little, and freeing them per request
        would cost more than it saves). Not at the handshake's end: a connection whose
        request is already there when it first reads, and that then closes, never pays
        for it. (Under bench/run.py's handshake load most requests come a moment after
        the Finished, so most connections still do: ~0.7 % of a connection's CPU in
        py-spy, about what the one-call close_notify saves.)"""
        _release_bio(self._incoming)
        _release_bio(self._outgoing)

    def _continue_handshake(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._send_records()
            return
        except (ssl.SSLError, OSError) as exc:
            self._fail_handshake(exc)
            return
        self._handshaken = True
        self._going_idle_due = _release_bio is not None  # (the BIOs' buffers have the handshake's size)
        self._send_records()  # our Finished (and TLS 1.3 session tickets)
        self._wake_handshake()

    def _fail_handshake(self, exc: BaseException) -> None:
        if self._handshake_error is not None:  # the client closed while we lingered: done
            if self.transport is not None:
                self.transport.close()
            return
        self._handshake_error = exc
        self._send_records()  # the alert OpenSSL wrote: this is the point of this class
        self.closed = True
        self._eof = True
        transport = self.transport
        if transport is not None:
            if transport.can_write_eof() and not transport.is_closing():
                # The alert, then FIN, and what the client still sends is read and dropped
                # until it closes (or HANDSHAKE_LINGER): in TLS 1.3 a client whose
                # certificate is refused has already sent its request, and closing with
                # it unread would reset the connection, destroying the alert on its way.
                transport.write_eof()
                self.loop.call_later(HANDSHAKE_LINGER, transport.close)
            else:
                transport.close()  # after the buffered alert is written
        self._wake_handshake()

    def _wake_handshake(self) -> None:
        waiter = self._handshake_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _decrypt(self) -> None:
        # The C object's read and pending: ssl.SSLObject's are one more Python frame each.
        ssl_object = self.ssl_object._sslobj
        incoming = self._incoming
        pieces = []
        eof = False
        try:
            # Stop when no received byte is left undecrypted rather than reading on
            # into SSLWantReadError: an exception per received chunk is measurable.
            # A partial record still ends in SSLWantReadError.
            while incoming.pending or ssl_object.pending():
                piece = ssl_object.read(_RECORD)
                if not piece:
                    break
                pieces.append(piece)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify
            eof = True
        except ssl.SSLError:
            self._send_records()
            self.abort()
            return
        if self._outgoing.pending:
            self._send_records()  # e.g. a TLS 1.3 key update answer
        if pieces:
            Channel.data_received(self, pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if eof:
            Channel.eof_received(self)

    # -- sending: the plaintext queue is encrypted as it goes out ------------------------

    def send_now(self, data: bytes | memoryview) -> None:
        """As ``Channel.send_now``, without its copy: encrypting is the copy."""
        if self.closed or self.write_shut or self.transport.is_closing():
            raise ConnectionLost("connection closed")
        self._unsent.append(data)
        self._unsent_bytes += len(data)
        self._send_queued()  # (the queue is emptied: nothing keeps the view)

    def _send_queued(self) -> None:
        records = self._encrypt_queued() if self._unsent else []
        if self._outgoing.pending:
            records.append(self._outgoing.read())
        self._write_records(records)

    def _encrypt_queued(self) -> list[bytes]:
        """Empty the plaintext queue into TLS records (small pieces joined into one)."""
        unsent, size = self._unsent, self._unsent_bytes
        self._drop_queued()
        if not unsent or not self._handshaken or self.closed:
            return []
        if size < SEND_NOW and len(unsent) > 1:
            unsent = [b"".join(unsent)]  # one record for a small response, not one per piece
        # The C object's write: ssl.SSLObject.write is one more Python frame per record.
        write = self.ssl_object._sslobj.write
        outgoing = self._outgoing
        read = outgoing.read
        records = []
        try:
            for piece in unsent:
                if len(piece) <= _ENCRYPT_STEP:
                    write(piece)
                    if outgoing.pending >= _ENCRYPT_STEP:
                        records.append(read())
                    continue
                view = memoryview(piece)
                for start in range(0, len(view), _ENCRYPT_STEP):
                    write(view[start:start + _ENCRYPT_STEP])
                    records.append(read())
        except ssl.SSLError:
            self.abort()
            return []
        if outgoing.pending:
            records.append(outgoing.read())
        if size > _BIO_STEP and not self._grown and _release_bio is not None:
            self._grown = True  # the outgoing buffer may have grown past ~2 records
            _GrownBuffers.of(self.loop).add(self)
        return records

    def _write_records(self, records: list[bytes]) -> None:
        transport = self.transport
        if records and transport is not None and not transport.is_closing():
            if len(records) == 1:
                transport.write(records[0])
            else:
                transport.writelines(records)  # one send (uvloop: writev), no joined copy

    def _send_records(self) -> None:
        """Hand the outgoing TLS buffer (records, alerts, close_notify) to the transport."""
        data = self._outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def close_and_wait(self, timeout: float) -> None:
        """As ``Channel.close_and_wait``, except that when closing left nothing unsent
        (the usual case: the last send went straight out) there is nothing to wait for:
        the transport is gone at the next loop iteration whatever the peer does. That
        saves a future, a timer and a task wake-up per connection."""
        self.close()
        transport = self.transport
        if transport is None or self.closed or not transport.get_write_buffer_size():
            return
        await super().close_and_wait(timeout)

    def _send_close_notify(self) -> None:
        """What is queued and then close_notify, in one write."""
        records = self._encrypt_queued()
        if _write_close_notify is not None:
            _write_close_notify(self.ssl_object)
        else:
            try:
                self.ssl_object.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: the peer's close_notify is not awaited
        records.append(self._outgoing.read())
        self._write_records(records)

    def shutdown_write(self) -> None:
        """What is queued, then close_notify, then a FIN: the TLS half-close (the peer
        may go on sending; ``ssl`` reads after our close_notify as before)."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing() or self.write_shut:
            return
        if self._handshaken:
            self._send_close_notify()
        self.write_shut = True
        if transport.can_write_eof():
            transport.write_eof()

    def close(self) -> None:
        """Send what is pending and close_notify together, then close TCP once the
        write buffer is out."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._handshaken and not self.closed and not self.write_shut:
            self._send_close_notify()
        transport.close()


class _GrownBuffers(PerLoop):
    """The TLS channels whose outgoing MemoryBIO a large send grew, freed together once a
    second (what the buffer holds is always sent before a send returns: it is empty then).

    Why not at once, or when the connection next waits for a request: the next large
    response would regrow it, record by record, each growth a realloc, a copy and a
    zero-fill. Freed at every wait, back-to-back 1 MiB responses (paired, same core) made
    12 % fewer requests per CPU second than when it was never freed; once a second costs a
    connection at most one regrowth per second. An idle connection, or a client that
    stopped reading, holds no such buffer a second later.

    Then ``malloc_trim``: the freed buffers are holes in the C heap that glibc would keep
    as RSS. 300 clients stalled on 8 MiB responses (bench/slow_readers.py): 420 KiB RSS
    each without it, 334 KiB with it (the 256 KiB bound and the connection's objects)."""

    __slots__ = ("_loop", "_channels", "_timer")
    _by_loop: dict[asyncio.AbstractEventLoop, _GrownBuffers] = {}
    EVERY = 1.0  # seconds

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._channels: list[TLSChannel] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, channel: TLSChannel) -> None:
        self._channels.append(channel)
        if self._timer is None:
            self._timer = self._loop.call_later(self.EVERY, self._free)

    def _free(self) -> None:
        self._timer = None
        channels, self._channels = self._channels, []
        for channel in channels:
            channel._grown = False
            if not channel.closed:
                _release_bio(channel._outgoing)
        if _TRIM is not None:
            _TRIM(0)
