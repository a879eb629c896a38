"""The OpenSSL settings Python 3.11's ``ssl`` module does not expose, set through
ctypes on an SSLContext's own ``SSL_CTX``:

- ``disable_session_cache``: SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF), so
  ``session_tickets: false`` also ends TLS 1.2 session-ID resumption;
- ``set_groups``: SSL_CTX_set1_groups_list(ctx, "X25519:P-256:P-384"), the key exchange
  groups of Mozilla's "intermediate" profile (``set_ecdh_curve`` takes one curve only);
- ``strict_alpn``: an ALPN selection that refuses a client whose offer has nothing in
  common with ours with the ``no_application_protocol`` alert (RFC 7301 3.2), as nginx
  and Go do. Python's own selection carries on without ALPN instead, so an h2-only
  client on an ``alpn: [http/1.1]`` listener would send HTTP/2 to an HTTP/1.1 server
  and get a 400 that says nothing useful.

And on an ``ssl.MemoryBIO`` (its ``BIO *``):

- ``release_memory_bio``: an empty memory BIO's buffer freed (BIO_set_mem_buf with a new,
  empty BUF_MEM). A memory BIO keeps the largest size it ever held: after a handshake,
  ~1.7 KiB per connection between the two (ClientHello in, our flight out) that an idle
  connection never uses again, measured with ``BIO_get_mem_ptr``; ``ssl`` offers no way
  to shrink it.

And on an ``ssl.SSLObject`` (its ``SSL *``):

- ``close_notify_sender``: one SSL_shutdown, which writes our close_notify and returns.
  ``SSLObject.unwrap`` calls SSL_shutdown a second time to wait for the peer's, which a
  memory BIO never has yet, and turns that into an SSLWantReadError: ~1 % of a
  connection's CPU (py-spy), for an exception we only drop.

The first two are macros over ``SSL_CTX_ctrl``. The library is the libssl the ``_ssl`` module
itself is linked against (same process, same copy). The ``SSL_CTX`` pointer is the first
field after PyObject_HEAD in CPython's PySSLContext; it is only trusted after
SSL_CTX_get_options on it returns exactly ``context.options``, so a different layout
fails closed (each function returns False) instead of corrupting memory elsewhere (the
read is of our own object's memory either way).
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable, Sequence

_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_SESS_CACHE_OFF = 0
_BIO_CTRL_PENDING = 10
_BIO_C_SET_BUF_MEM = 114
_BIO_CLOSE = 1
_BIO_TYPE_MEM = 1 | 0x0400
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_ALERT_FATAL = 2
# int (*cb)(SSL *, const unsigned char **out, unsigned char *outlen,
#           const unsigned char *in, unsigned int inlen, void *arg)
_ALPN_SELECT = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p,
)
_libssl: ctypes.CDLL | None = None


def disable_session_cache(context: ssl.SSLContext) -> bool:
    """SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF); True when done."""
    try:
        lib, pointer = _ssl_ctx(context)
        if pointer is None:
            return False
        lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
        return lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) == _SSL_SESS_CACHE_OFF
    except (OSError, AttributeError, ValueError):
        return False


def set_groups(context: ssl.SSLContext, groups: Sequence[str]) -> bool:
    """SSL_CTX_set1_groups_list(ctx, "A:B:C"): the only key exchange groups this context
    accepts, in TLS 1.2 (ECDHE curves) and 1.3 (key shares); True when OpenSSL took
    the list (it refuses a list naming a group it does not know)."""
    try:
        lib, pointer = _ssl_ctx(context)
        if pointer is None:
            return False
        names = ":".join(groups).encode("ascii")
        return lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(names)) == 1
    except (OSError, AttributeError, ValueError):
        return False


def strict_alpn(context: ssl.SSLContext, protocols: Sequence[str]) -> bool:
    """Select the first of ``protocols`` (our order) that the client offers; when it
    offers ALPN but none of them, fail the handshake with ``no_application_protocol``.
    A client that offers no ALPN at all is served (HTTP/1.1). True when installed;
    otherwise the context keeps Python's lenient selection."""
    ours = [protocol.encode("ascii") for protocol in protocols]
    if b"http/1.1" in ours:
        ours.append(b"http/1.0")  # what curl --http1.0 offers: served as HTTP/1.1 clients are (nginx too)

    def select(_ssl, out, outlen, offer, offer_length, _arg):  # called by OpenSSL, in the handshake
        try:
            offered = ctypes.string_at(offer, offer_length)
            starts = {}
            index = 0
            while index < len(offered):
                size = offered[index]
                starts.setdefault(offered[index + 1:index + 1 + size], index + 1)
                index += 1 + size
            for protocol in ours:
                start = starts.get(protocol)
                if start is not None:
                    out[0] = offer + start  # into the client's list: it outlives this call
                    outlen[0] = len(protocol)
                    return _SSL_TLSEXT_ERR_OK
        except Exception:  # noqa: BLE001 - nothing may escape into OpenSSL
            pass
        return _SSL_TLSEXT_ERR_ALERT_FATAL

    try:
        lib, pointer = _ssl_ctx(context)
        if pointer is None:
            return False
        callback = _ALPN_SELECT(select)
        lib.SSL_CTX_set_alpn_select_cb(pointer, callback, None)
    except (OSError, AttributeError, ValueError):
        return False
    context._tlsproxy_alpn_select = callback  # type: ignore[attr-defined]  # lives as long as the context
    return True


def memory_bio_releaser() -> Callable[[ssl.MemoryBIO], None] | None:
    """A function that frees an *empty* MemoryBIO's buffer (a later write allocates
    what it needs again); None when this Python's MemoryBIO cannot be reached safely.

    The ``BIO *`` is the first field after PyObject_HEAD in CPython's PySSLMemoryBIO; it
    is trusted once a probe BIO read that way is a memory BIO holding exactly what was
    written to it, so a different layout fails closed (nothing is released)."""
    try:
        lib = _openssl()
        probe = ssl.MemoryBIO()
        probe.write(b"probe")
        pointer = _bio_pointer(probe)
        if not pointer or lib.BIO_method_type(pointer) != _BIO_TYPE_MEM:
            return None
        if lib.BIO_ctrl(pointer, _BIO_CTRL_PENDING, 0, None) != probe.pending:
            return None
    except (OSError, AttributeError, ValueError):
        return None
    new_buffer, control = lib.BUF_MEM_new, lib.BIO_ctrl

    def release(bio: ssl.MemoryBIO) -> None:
        if bio.pending:
            return  # unread bytes live in that buffer
        buffer = new_buffer()
        if buffer:  # BIO_set_mem_buf(bio, buffer, BIO_CLOSE): the old BUF_MEM is freed
            control(_bio_pointer(bio), _BIO_C_SET_BUF_MEM, _BIO_CLOSE, buffer)

    return release


_BIO_OFFSET = object.__basicsize__
# PySSLSocket: PyObject_HEAD, the socket's weakref, then SSL *.
_SSL_OFFSET = object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)


def close_notify_sender() -> Callable[[ssl.SSLObject], None] | None:
    """A function that writes our close_notify into an SSLObject's outgoing BIO with one
    SSL_shutdown (errors dropped, as ``unwrap``'s callers here drop them); None when the
    ``SSL *`` cannot be reached safely.

    The pointer is read at PySSLSocket's SSL field; it is trusted once a probe
    SSLObject's pointer, read that way, is an SSL whose SSL_CTX is the probe context's
    own (checked as ``_ssl_ctx`` checks it), so a different layout fails closed."""
    try:
        lib = _openssl()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _, context_pointer = _ssl_ctx(context)
        if context_pointer is None:
            return None
        probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
        pointer = ctypes.c_void_p.from_address(id(probe._sslobj) + _SSL_OFFSET).value
        if not pointer or lib.SSL_get_SSL_CTX(pointer) != context_pointer:
            return None
    except (OSError, AttributeError, ValueError):
        return None
    shutdown, clear_errors, from_address, offset = lib.SSL_shutdown, lib.ERR_clear_error, ctypes.c_void_p.from_address, _SSL_OFFSET

    def send(ssl_object: ssl.SSLObject) -> None:
        if shutdown(from_address(id(ssl_object._sslobj) + offset).value) < 0:
            clear_errors()  # (what unwrap would have raised: nothing is left for the next call)

    return send


def _bio_pointer(bio: ssl.MemoryBIO) -> int | None:
    return ctypes.c_void_p.from_address(id(bio) + _BIO_OFFSET).value


def _ssl_ctx(context: ssl.SSLContext) -> tuple[ctypes.CDLL, int | None]:
    """libssl and CONTEXT's SSL_CTX pointer (None when it cannot be trusted)."""
    lib = _openssl()
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(context.options):
        return lib, None
    return lib, pointer


def _openssl() -> ctypes.CDLL:
    global _libssl
    if _libssl is None:
        _libssl = _load_libssl()
    return _libssl


def _load_libssl() -> ctypes.CDLL:
    """The libssl the ``_ssl`` module is linked against; OSError when there is none."""
    module = ssl._ssl  # type: ignore[attr-defined]
    lib = ctypes.CDLL(getattr(module, "__file__", None))
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.BIO_ctrl.restype = ctypes.c_long
    lib.BIO_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.BIO_method_type.restype = ctypes.c_int
    lib.BIO_method_type.argtypes = [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    lib.SSL_shutdown.restype = ctypes.c_int
    lib.SSL_shutdown.argtypes = [ctypes.c_void_p]
    lib.ERR_clear_error.restype = None
    lib.ERR_clear_error.argtypes = []
    lib.BUF_MEM_new.restype = ctypes.c_void_p
    lib.BUF_MEM_new.argtypes = []
    lib.SSL_CTX_set_alpn_select_cb.restype = None
    lib.SSL_CTX_set_alpn_select_cb.argtypes = [ctypes.c_void_p, _ALPN_SELECT, ctypes.c_void_p]
    return lib
