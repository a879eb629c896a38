"""NAME -> subjectAltName entry, decided by the NAME's shape.

Users type ``localhost``, ``*.svc.local``, ``127.0.0.1``, ``spiffe://corp/ns/api``,
``uri:urn:example:x`` or ``ops@example.com``; the toolkit must put each into the right
GeneralName type, because TLS clients only match hostnames against DNS and IP entries
and mTLS allow-lists match URI / email entries by type. Anything that fits none of the
shapes is refused here, before any key is generated.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from cryptography import x509

from proxy.errors import PKIError

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_EMAIL_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")


def parse_name(name: str) -> x509.GeneralName:
    """Return the GeneralName for NAME, or raise PKIError saying why it is none of them."""
    text = name.strip()
    if not text:
        raise PKIError("empty NAME: give a DNS name, IP address, URI or email")
    if text.lower().startswith("uri:"):
        return x509.UniformResourceIdentifier(_check_uri(text[4:], name))
    if text.lower().startswith("spiffe://"):
        return x509.UniformResourceIdentifier(_check_uri(text, name))
    ip = _as_ip(text)
    if ip is not None:
        return x509.IPAddress(ip)
    if "@" in text:
        return x509.RFC822Name(_check_email(text, name))
    return x509.DNSName(_check_dns(text, name))


def parse_names(names: list[str]) -> list[x509.GeneralName]:
    """Parse every NAME, dropping exact duplicates but keeping the user's order."""
    seen: list[x509.GeneralName] = []
    for name in names:
        general = parse_name(name)
        if general not in seen:
            seen.append(general)
    return seen


def name_text(general: x509.GeneralName) -> str:
    """The inverse of parse_name for display: ``DNS:x``, ``IP:1.2.3.4``, ``URI:…``, ``email:…``."""
    if isinstance(general, x509.DNSName):
        return f"DNS:{general.value}"
    if isinstance(general, x509.IPAddress):
        return f"IP:{general.value}"
    if isinstance(general, x509.UniformResourceIdentifier):
        return f"URI:{general.value}"
    if isinstance(general, x509.RFC822Name):
        return f"email:{general.value}"
    return f"{type(general).__name__}:{general.value}"


def _as_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        return None


def _check_dns(text: str, original: str) -> str:
    """Validate a DNS name (LDH labels, IDNA for non-ASCII, ``*.`` only as the whole leftmost label)."""
    host = text.rstrip(".").lower()
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise PKIError(f"{original!r} is not a valid DNS name, IP address, URI or email") from None
    labels = host.split(".")
    if labels[0] == "*" and len(labels) >= 2:
        labels = labels[1:]
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise PKIError(f"{original!r} is not a valid DNS name, IP address, URI or email")
    return host


def _check_uri(uri: str, original: str) -> str:
    parts = urlsplit(uri)
    if not parts.scheme or not _URI_SCHEME.match(parts.scheme) or any(c.isspace() for c in uri):
        raise PKIError(f"{original!r} is not a valid URI (expected scheme:rest, e.g. spiffe://domain/path)")
    if parts.scheme.lower() == "spiffe" and not parts.netloc:
        raise PKIError(f"{original!r} is not a valid SPIFFE ID (expected spiffe://trust-domain/path)")
    if not (parts.netloc or parts.path):
        raise PKIError(f"{original!r} is not a valid URI (nothing after the scheme)")
    return uri


def _check_email(text: str, original: str) -> str:
    local, _, domain = text.rpartition("@")
    if not local or not _EMAIL_LOCAL.match(local):
        raise PKIError(f"{original!r} is not a valid email address")
    _check_dns(domain, original)
    return text
