"""Listening sockets, and what happens between accept() and the first request.

The proxy owns its listening sockets (rather than ``loop.create_server``) because it
runs the TLS state machine itself (``TLSChannel``: so a failed handshake still sends
its alert). The first chunk the client sends decides (``tls_accept``):

* ``0x16`` (a TLS handshake record) -> the handshake; a failure is logged with the
  client's address and the reason in words (``proxy.tls.handshake``);
* anything else is plain HTTP on the TLS port -> a plain ``400`` (PLAIN_HTTP_RESPONSE)
  telling the user to use https://, then close.

``max_connections`` is a count of slots taken before ``accept()`` (and given back while
a listener has nothing to accept): above the limit the proxy stops accepting and new
clients wait in the kernel's backlog.

A failed ``accept()`` is logged and the loop goes on: errors that concern one pending
connection (a client that reset it first, a firewall's EPERM, EPROTO...) at once; out of
descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) after ACCEPT_BACKOFF, with the
listener unwatched meanwhile (the pending connection would wake the loop all along), as
nginx does. Only a listener that is itself unusable (EBADF, EINVAL, ENOTSOCK) ends the
loop, quietly: whoever awaits it (``RunningProxy.close``) still drains.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from proxy.config.model import ListenAddress

log = logging.getLogger("tlsproxy")

BACKLOG = 1024
PLAIN_HTTP_BODY = b"This is an HTTPS port: use https:// instead of http://\n"
PLAIN_HTTP_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(PLAIN_HTTP_BODY)).encode() + b"\r\n"
    b"Connection: close\r\n\r\n" + PLAIN_HTTP_BODY
)
# After refusing plain HTTP, how long to wait for the client to close first (closing
# with unread bytes would make the kernel send a reset that can destroy the 400).
LINGER_SECONDS = 2.0
ACCEPT_BACKOFF = 0.5  # seconds without accepting after running out of descriptors
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LISTENER_UNUSABLE = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT})

SocketHandler = Callable[[socket.socket, tuple], Awaitable[None]]


_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


def bind(address: ListenAddress, *, reuse_port: bool = False, dual_stack: bool = True) -> socket.socket:
    """A non-blocking listening socket. ``[::]`` takes IPv4 too (IPV6_V6ONLY off), as Caddy
    and Go servers do and as users of ``[::]:PORT`` expect, unless ``dual_stack`` is False
    (an IPv4 listener on the same port is listed too); on a host without IPv6 it falls back
    to ``0.0.0.0``. Other IPv6 addresses are IPv6-only. ``reuse_port``: several sockets (one
    per worker) share the address."""
    wildcard = address.host == "::" and dual_stack
    try:
        return _bind(address, reuse_port=reuse_port, v6only=not wildcard)
    except OSError as exc:
        if not wildcard or exc.errno not in _NO_IPV6:
            raise
        log.warning("no IPv6 on this host: listening on 0.0.0.0:%d instead of [::]:%d", address.port, address.port)
        return _bind(ListenAddress("0.0.0.0", address.port), reuse_port=reuse_port, v6only=True)


def _bind(address: ListenAddress, *, reuse_port: bool, v6only: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class BoundListeners:
    """The proxy's listening sockets, bound once: by ``start_proxy``, or by the parent of
    several workers before it forks them (so they share the sockets, port 0 included).
    ``tls``: ``listen``; ``plain``: ``listen_plain``; ``redirect``: ``redirect_http``."""

    def __init__(
        self, tls: list[socket.socket], redirect: socket.socket | None, plain: Sequence[socket.socket] = ()
    ) -> None:
        self.tls = tls
        self.redirect = redirect
        self.plain = list(plain)

    @classmethod
    def bind(
        cls,
        listen: Sequence[ListenAddress],
        redirect: ListenAddress | None,
        *,
        reuse_port: bool = False,
        plain: Sequence[ListenAddress] = (),
    ) -> BoundListeners:
        sockets: list[socket.socket] = []
        addresses = (*listen, *plain, *([redirect] if redirect is not None else []))
        # [::]:P next to an IPv4 listener on the same port P stays IPv6-only (both bind).
        ipv4_ports = {address.port for address in addresses if ":" not in address.host and address.port}
        try:
            for address in addresses:
                sockets.append(bind(address, reuse_port=reuse_port, dual_stack=address.port not in ipv4_ports))
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        tls, rest = sockets[: len(listen)], sockets[len(listen) :]
        return cls(tls, rest[-1] if redirect is not None else None, rest[: len(plain)])

    def bind_again(self) -> BoundListeners:
        """Another set on the same (now known) ports, for one more worker: with
        SO_REUSEPORT the kernel spreads new connections over the sets."""
        def same(sock: socket.socket) -> ListenAddress:
            host, port = sock.getsockname()[:2]
            return ListenAddress(host, port)

        return BoundListeners.bind(
            [same(sock) for sock in self.tls],
            same(self.redirect) if self.redirect is not None else None,
            reuse_port=True,
            plain=[same(sock) for sock in self.plain],
        )

    def close(self) -> None:
        for sock in (*self.tls, *self.plain, *([self.redirect] if self.redirect else [])):
            sock.close()


class ConnectionSlots:
    """``limits.max_connections``: the free connection slots the listeners share.

    What asyncio.Semaphore does for them, without its costs per connection: a coroutine
    for every ``acquire`` and a generator for every ``locked()`` (~0.8 % of a new TLS
    connection's CPU in py-spy). A slot is taken without waiting when one is free, which
    is nearly always."""

    __slots__ = ("free", "_waiters")

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiters: deque[asyncio.Future] = deque()

    def take(self) -> bool:
        """Take a free slot now, if there is one."""
        if self.free > 0:
            self.free -= 1
            return True
        return False

    async def take_when_free(self) -> None:
        """Wait until a slot is given back, and take it."""
        while self.free <= 0:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the slot is the next one's
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.free -= 1

    def give_back(self) -> None:
        self.free += 1
        self._wake_one()

    def _wake_one(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                return


async def accept_loop(
    sock: socket.socket,
    handler: SocketHandler,
    tasks: set[asyncio.Task],
    slots: ConnectionSlots | None = None,
) -> None:
    """Accept connections forever, one task each (kept in ``tasks`` until it ends)."""
    loop = asyncio.get_running_loop()

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        if slots is not None:
            slots.give_back()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A bug in a connection's handling: say so once, with the traceback; the
            # connection is gone but the proxy goes on serving the others.
            log.error("internal error in a connection handler", exc_info=exc)

    # socket.accept() builds the new socket from the listener's family/type properties,
    # which convert to enums on every call (a few % of a handshake's CPU in py-spy): take
    # them once and wrap the accepted descriptor ourselves (in an _AcceptedSocket).
    # Non-blocking mode and TCP_NODELAY are left to the transport (uvloop and asyncio
    # both set them).
    family, sock_type, proto = int(sock.family), int(sock.type), sock.proto
    listen_fd = sock.fileno()
    # The listener stays registered with the loop between waits: adding and removing it
    # per wait cost four epoll_ctl() calls and a poll handle (strace). It is removed only
    # while the limiter is full, where its level-triggered readiness would spin the loop.
    readable: asyncio.Future | None = None
    watching = False

    def wake() -> None:
        if readable is not None and not readable.done():
            readable.set_result(None)

    try:
        while True:
            if slots is not None and not slots.take():
                if watching:
                    loop.remove_reader(listen_fd)
                    watching = False
                await slots.take_when_free()
            try:
                fd, peer = sock._accept()
                conn = _AcceptedSocket(family, sock_type, proto, fileno=fd)
            except (BlockingIOError, InterruptedError):
                # Nothing to accept: the slot goes back while this listener waits. The
                # listeners share the slots, and one held by a listener that has no
                # connection would keep another's waiting in its backlog (limit 1, two
                # listeners: the second was never served).
                if slots is not None:
                    slots.give_back()
                if not watching:
                    loop.add_reader(listen_fd, wake)
                    watching = True
                readable = loop.create_future()
                await readable  # (cancelled: the proxy is closing; no slot is held)
                continue
            except OSError as exc:
                if slots is not None:
                    slots.give_back()
                code = exc.errno
                if code in _LISTENER_UNUSABLE:
                    log.error("stopped accepting connections on %s: %s", _name(sock), exc.strerror or exc)
                    return
                if code in _OUT_OF_RESOURCES:
                    log.error("cannot accept connections on %s: %s; retrying in %gs",
                              _name(sock), exc.strerror or exc, ACCEPT_BACKOFF)
                    if watching:  # the pending connection would wake the loop all along
                        loop.remove_reader(listen_fd)
                        watching = False
                    await asyncio.sleep(ACCEPT_BACKOFF)
                elif code == errno.ECONNABORTED:  # routine: the client gave up first
                    log.debug("accept() on %s: %s", _name(sock), exc.strerror or exc)
                else:
                    log.warning("accept() on %s failed: %s; still accepting", _name(sock), exc.strerror or exc)
                continue
            task = loop.create_task(handler(conn, peer))
            tasks.add(task)
            task.add_done_callback(finished)
    finally:
        if watching:
            loop.remove_reader(listen_fd)


class _AcceptedSocket(socket.socket):
    """An accepted socket whose ``family`` and ``type`` are the C object's ints, not
    socket.socket's enum conversions: uvloop's connect_accepted_socket reads them three
    times per connection (~0.6 % of a new TLS connection's CPU in py-spy). Still a
    socket.socket, so uvloop detaches rather than closes it when the transport closes."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "a closed listener"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
