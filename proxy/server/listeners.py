"""Listening sockets, and what happens between accept() and the first request.

The proxy owns its listening sockets (rather than ``loop.create_server``) because it
runs the TLS state machine itself (``TLSChannel``: so a failed handshake still sends
its alert). The first chunk the client sends decides (``tls_accept``):

* ``0x16`` (a TLS handshake record) -> the handshake; a failure is logged with the
  client's address and the reason in words (``proxy.tls.handshake``);
* anything else is plain HTTP on the TLS port -> a plain ``400`` (PLAIN_HTTP_RESPONSE)
  telling the user to use https://, then close.

``max_connections`` is a semaphore taken before ``accept()``: above the limit the
proxy stops accepting and new clients wait in the kernel's backlog.

A failed ``accept()`` is logged and the loop goes on: errors that concern one pending
connection (a client that reset it first, a firewall's EPERM, EPROTO...) at once; out of
descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) after ACCEPT_BACKOFF, with the
listener unwatched meanwhile (the pending connection would wake the loop all along), as
nginx does. Only a listener that is itself unusable (EBADF, EINVAL, ENOTSOCK) ends the
loop, quietly: whoever awaits it (``RunningProxy.close``) still drains.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
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


def bind(address: ListenAddress, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket; IPv6 listeners are IPv6-only (list both to get
    both). ``reuse_port``: several sockets (one per worker) share the address."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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
        try:
            for address in (*listen, *plain, *([redirect] if redirect is not None else [])):
                sockets.append(bind(address, reuse_port=reuse_port))
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


async def accept_loop(
    sock: socket.socket,
    handler: SocketHandler,
    tasks: set[asyncio.Task],
    limiter: asyncio.Semaphore | None = None,
) -> None:
    """Accept connections forever, one task each (kept in ``tasks`` until it ends)."""
    loop = asyncio.get_running_loop()

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        if limiter is not None:
            limiter.release()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A bug in a connection's handling: say so once, with the traceback; the
            # connection is gone but the proxy goes on serving the others.
            log.error("internal error in a connection handler", exc_info=exc)

    # socket.accept() builds the new socket from the listener's family/type properties,
    # which convert to enums on every call (a few % of a handshake's CPU in py-spy): take
    # them once and wrap the accepted descriptor ourselves. Non-blocking mode and
    # TCP_NODELAY are left to the transport (uvloop and asyncio both set them).
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
            if limiter is not None:
                if watching and limiter.locked():
                    loop.remove_reader(listen_fd)
                    watching = False
                await limiter.acquire()
            try:
                while True:
                    try:
                        fd, peer = sock._accept()
                        break
                    except (BlockingIOError, InterruptedError):
                        if not watching:
                            loop.add_reader(listen_fd, wake)
                            watching = True
                        readable = loop.create_future()
                        await readable
                conn = socket.socket(family, sock_type, proto, fileno=fd)
            except BaseException as exc:
                if limiter is not None:
                    limiter.release()
                if not isinstance(exc, OSError):
                    raise  # cancelled: the proxy is closing
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


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "a closed listener"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
