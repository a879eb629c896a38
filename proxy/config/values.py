"""Parsers for single config values, shared by the YAML loader and the command line.

Each parser takes what the user wrote and returns the typed value, or raises
``InvalidValue`` with a reason in words. The reason never says *where* the value came
from: the caller knows that (a YAML node with file, line and key path, or a flag such
as ``--upstream``) and wraps the reason into a ``ConfigError`` or ``UsageError``. That
split is why the same checks serve both the YAML file and ``serve --listen/--upstream``.

``InvalidValue`` is internal to ``proxy.config``: it never leaves the package.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from typing import NoReturn

from proxy.config.model import ALLOW_KINDS, UPSTREAM_SCHEMES, AllowEntry, ListenAddress, Upstream


class InvalidValue(ValueError):
    """A value is wrong; the message is the reason, without file, line or key."""


def fail(reason: str) -> NoReturn:
    raise InvalidValue(reason)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a choice is close to ``word``, else ''.

    Only for words: "1.1" is not a typo of "1.3"."""
    if not any(c.isalpha() for c in word):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_choice(text: str, choices: Iterable[str]) -> str:
    """One of a fixed set of words (modes, engines, formats)."""
    choices = tuple(choices)
    if text in choices:
        return text
    fail(f"'{text}' is not one of {', '.join(choices)}{did_you_mean(text, choices)}")


# --- environment variables ------------------------------------------------------------

# $${ is a literal "${"; ${NAME} and ${NAME:-default} are substituted.
_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Substitute ``${VAR}`` and ``${VAR:-default}`` (default when unset or empty).

    An unset variable without a default is an error rather than an empty string:
    silently listening on ``:`` or proxying to ``http://`` is worse than refusing.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match.group(1)
        parsed = _ENV_BODY.fullmatch(body) if body is not None else None
        if parsed is None:
            fail(f"malformed variable reference '{match.group(0)}' (use ${{NAME}} or ${{NAME:-default}})")
        name, default = parsed.group(1), parsed.group(2)
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            fail(f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        return value

    return _ENV_REF.sub(replace, text)


# --- numbers and durations ------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object, *, allow_zero: bool = True) -> float:
    """``250ms``, ``10s``, ``2m``, ``1h`` or a plain number of seconds -> float seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        fail(f"'{value}' is not a duration (e.g. 250ms, 10s, 2m, or seconds)")
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            fail(f"'{value}' is not a duration (e.g. 250ms, 10s, 2m, or seconds)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        fail(f"'{value}' is not a duration (must be a finite number of seconds >= 0)")
    if seconds == 0 and not allow_zero:
        fail(f"'{value}' must be longer than zero")
    return seconds


def parse_int(value: object, *, minimum: int = 0) -> int:
    """A whole number >= ``minimum``; booleans and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(f"'{value}' is not a whole number")
    if value < minimum:
        fail(f"{value} is less than {minimum}")
    return value


def parse_workers(value: object, cpu_count: int | None) -> int:
    """``workers``: a count >= 1, or ``auto`` for one per core."""
    if value == "auto":
        return max(1, cpu_count or 1)
    if isinstance(value, str):
        fail(f"'{value}' is neither a number of processes nor 'auto'")
    return parse_int(value, minimum=1)


# --- addresses and URLs ---------------------------------------------------------------

_HOSTNAME_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return 0 < len(text) <= 253 and all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


def _split_host_port(text: str, *, what: str) -> tuple[str, str | None]:
    """``host:port`` / ``[v6]:port`` / ``host`` -> (bare host, port text or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            fail(f"'{text}' has an unclosed '[' in the {what}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            fail(f"'{host}' in brackets is not an IPv6 address")
        if rest and not rest.startswith(":"):
            fail(f"'{text}' has junk after ']' in the {what}")
        return host, rest[1:] if rest else None
    if text.count(":") > 1:
        fail(f"'{text}': an IPv6 address goes in brackets, e.g. [::1]:8443")
    host, sep, port = text.partition(":")
    return host, port if sep else None


def _check_host(host: str, original: str) -> None:
    if ":" in host:
        return  # already validated as IPv6 by _split_host_port
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    if not _is_hostname(host):
        fail(f"'{original}' does not name a valid host")


def _parse_port(text: str, original: str, *, minimum: int) -> int:
    if not text.isascii() or not text.isdigit() or not minimum <= int(text) <= 65535:
        fail(f"'{original}' has an invalid port (expected {minimum}-65535)")
    return int(text)


def parse_listen(text: str) -> ListenAddress:
    """``HOST:PORT`` or ``[v6]:PORT`` to bind; port 0 means "any free port" (tests)."""
    host, port = _split_host_port(text.strip(), what="listen address")
    if port is None or not host:
        fail(f"'{text}' is not HOST:PORT (e.g. 0.0.0.0:8443 or [::]:8443)")
    _check_host(host, text)
    return ListenAddress(host=host, port=_parse_port(port, text, minimum=0))


def parse_upstream(text: str) -> Upstream:
    """``http://host[:port][/]`` (or ``https://``, ``h2c://``) -> Upstream. An upstream is
    an origin only: no path (the request path is forwarded as is), no query, no
    credentials. Default ports: 80 for http:// and h2c://, 443 for https://."""
    url = text.strip()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in UPSTREAM_SCHEMES:
        fail(f"'{text}' is not an http:// URL")
    shape = f"{scheme}://host[:port]"
    authority, slash, path = rest.partition("/")
    if path or any(c in authority for c in "?#"):
        fail(f"'{text}' has a path or query; an upstream is {shape} only")
    if "@" in authority:
        fail(f"'{text}' contains credentials; an upstream is {shape} only")
    host, port = _split_host_port(authority, what="upstream URL")
    if not host:
        fail(f"'{text}' has no host")
    _check_host(host, text)
    default_port = 443 if scheme == "https" else 80
    port_number = default_port if port is None else _parse_port(port, text, minimum=1)
    return Upstream(url=f"{scheme}://{authority}", host=host, port=port_number, scheme=scheme)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``: reachable from this machine only."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_server_name(text: str) -> str:
    """``upstream_tls.server_name``: a DNS name or an IP address (verified as an IP SAN)."""
    name = text.strip()
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if not _is_hostname(name):
        fail(f"'{text}' is not a DNS name or IP address")
    return name.lower().rstrip(".")


def parse_host_pattern(text: str) -> str:
    """A service host to match against Host and SNI: lowercased, port dropped.

    A leading ``*.`` matches one extra label (the usual certificate wildcard); IPv6
    literals are stored bare (``::1``), as ``proxy.forwarding.routing`` compares them.
    """
    raw = text.strip().lower()
    host, port = _split_host_port(raw, what="host")
    if port is not None:
        _parse_port(port, text, minimum=1)
    if ":" in host:
        return host
    name = host[2:] if host.startswith("*.") else host
    _check_host(name, text)
    return host.rstrip(".")


def parse_path_prefix(text: str) -> str:
    if not text.startswith("/"):
        fail(f"'{text}' must start with '/'")
    if any(c in text for c in "?# \t\r\n"):
        fail(f"'{text}' must be a plain path (no query, fragment or whitespace)")
    # Requests are routed on their normalised path (proxy.forwarding.paths); a prefix
    # must be written the same way or it could never match.
    if any(c in text for c in "%;\\") or "//" in text or any(s in (".", "..") for s in text.split("/")):
        fail(
            f"'{text}' must be a normalised path: decoded (no %-escapes), without ;parameters, "
            "backslashes, '//' or '.'/'..' segments (requests are matched that way)"
        )
    return text


# --- headers --------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_header_name(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        fail(f"'{text}' is not a valid header name")
    return text


def parse_header_value(text: str) -> str:
    if any(c in text for c in "\r\n\0"):
        fail(f"{text!r}: header values must not contain CR, LF or NUL")
    return text.strip(" \t")


# --- client certificate allow-lists ---------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_fingerprint(text: str) -> str:
    """``sha256:AB:CD:…`` or plain hex -> 64 lowercase hex digits."""
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    value = value.replace(":", "")
    if not _HEX64.fullmatch(value):
        fail(f"'{text}' is not a SHA-256 fingerprint (64 hex digits, optionally 'sha256:' and colons)")
    return value


def _parse_dns_pattern(text: str) -> str:
    value = text.strip().lower()
    name = value[2:] if value.startswith("*.") else value
    if "*" in name:
        fail(f"'{text}': a wildcard is only allowed as a leading '*.'")
    if not _is_hostname(name):
        fail(f"'{text}' is not a DNS name")
    return value


def _parse_nonempty(text: str) -> str:
    if not text.strip():
        fail("must not be empty")
    return text


def _parse_email(text: str) -> str:
    if "@" not in text or text.startswith("@") or text.endswith("@"):
        fail(f"'{text}' is not an email address")
    return text


_ALLOW_PARSERS = {
    "cn": _parse_nonempty,
    "ou": _parse_nonempty,
    "uri": _parse_nonempty,
    "email": _parse_email,
    "dns": _parse_dns_pattern,
    "fingerprint": parse_fingerprint,
}
assert set(_ALLOW_PARSERS) == set(ALLOW_KINDS)


def parse_allow_entry(kind: str, text: str) -> AllowEntry:
    """One ``{kind: value}`` allow-list entry; the kind was checked by the caller."""
    return AllowEntry(kind=kind, value=_ALLOW_PARSERS[kind](text))


_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_service_name(text: str) -> str:
    """Service names appear in logs, metrics labels and error bodies: keep them plain."""
    if not _SERVICE_NAME.fullmatch(text):
        fail(f"'{text}' is not a service name (letters, digits, '-', '_', '.')")
    return text
