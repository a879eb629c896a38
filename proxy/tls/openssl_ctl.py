"""The two OpenSSL settings Python 3.11's ``ssl`` module does not expose, set through
ctypes on an SSLContext's own ``SSL_CTX``:

- ``disable_session_cache``: SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF), so
  ``session_tickets: false`` also ends TLS 1.2 session-ID resumption;
- ``set_groups``: SSL_CTX_set1_groups_list(ctx, "X25519:P-256:P-384"), the key exchange
  groups of Mozilla's "intermediate" profile (``set_ecdh_curve`` takes one curve only).

Both are macros over ``SSL_CTX_ctrl``. The library is the libssl the ``_ssl`` module
itself is linked against (same process, same copy). The ``SSL_CTX`` pointer is the first
field after PyObject_HEAD in CPython's PySSLContext; it is only trusted after
SSL_CTX_get_options on it returns exactly ``context.options``, so a different layout
fails closed (each function returns False) instead of corrupting memory elsewhere (the
read is of our own object's memory either way).
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Sequence

_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_SESS_CACHE_OFF = 0
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
    return lib
