"""How to make clients trust a CA, instead of turning verification off (pure text).

``trust_instructions`` is what ``certs trust`` prints without an action: per-client
snippets, then browsers, Java and a client certificate for mTLS in a browser.
``ca_banner`` is the two lines ``demo`` and ``serve`` print about the CA they issue from.
Changing trust stores is ``proxy.pki.trust_stores``.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from proxy.pki.trust_stores.model import entry_name


def trust_instructions(ca_pem: Path, ca_cert: x509.Certificate, url: str = "https://localhost:8443/") -> str:
    """Copy-paste ways to trust CA_PEM: shell, curl, requests, httpx, node, browsers, Java."""
    path = str(Path(ca_pem).absolute())
    quoted = shlex.quote(path)
    fingerprint = ca_cert.fingerprint(hashes.SHA256()).hex()
    name = entry_name(ca_cert)
    origin = url.rstrip("/")
    return "\n".join(
        [
            f"CA {ca_cert.subject.rfc4514_string()}  (SHA-256 {fingerprint})",
            "",
            "Trust it for everything started from this shell (note: SSL_CERT_FILE replaces the",
            "system bundle for OpenSSL-based tools, so only this CA is trusted there):",
            f"  export SSL_CERT_FILE={quoted} REQUESTS_CA_BUNDLE={quoted} "
            f"CURL_CA_BUNDLE={quoted} NODE_EXTRA_CA_CERTS={quoted}",
            "",
            "Or per client:",
            f"  curl:     curl --cacert {quoted} {url}",
            f"  requests: requests.get({url!r}, verify={path!r})",
            f"  httpx:    httpx.get({url!r}, verify=ssl.create_default_context(cafile={path!r}))",
            f"  python:   ssl.create_default_context(cafile={path!r})",
            f"  node:     NODE_EXTRA_CA_CERTS={quoted} node app.js",
            f"            (or https.get(url, {{ca: fs.readFileSync({path!r})}}))",
            "",
            "Install it into every trust store found (--store system,nss,java to choose; undo with",
            "--uninstall, see where it is with --check). The system store needs root, the browsers'",
            "databases are per user, so run them apart:",
            f"  sudo tlsproxy certs trust --ca {quoted} --install --store system    # curl, Python ssl, Go",
            f"  tlsproxy certs trust --ca {quoted} --install --store nss,java       # browsers, Java",
            "",
            "Browsers: Chromium, Chrome and Firefox on Linux read NSS databases, not the system store",
            "(--store nss does ~/.pki/nssdb and every Firefox profile). By hand:",
            f"  certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n {name} -i {quoted}",
            "  Firefox: Settings > Privacy & Security > Certificates > View Certificates > Authorities",
            "           > Import, tick 'Trust this CA to identify websites'",
            "  macOS and Windows: Chrome, Edge and Safari use the system store (--store system);",
            "           restart the browser after installing.",
            "",
            "Java reads its own cacerts (--store java: $JAVA_HOME or the java on PATH). By hand:",
            f"  keytool -importcert -noprompt -cacerts -storepass changeit -alias {name} -file {quoted}",
            f"  or per run: java -Djavax.net.ssl.trustStore=FILE ...  (FILE made with keytool -importcert "
            f"-keystore FILE -file {quoted})",
            "",
            *client_certificate_instructions(ca_cert, origin),
        ]
    )


def client_certificate_instructions(ca_cert: x509.Certificate, origin: str) -> list[str]:
    """Importing a client certificate (``certs issue --client --p12``) into a browser for mTLS."""
    cns = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer_cn = str(cns[0].value) if cns else ca_cert.subject.rfc4514_string()
    rule = json.dumps({"pattern": origin, "filter": {"ISSUER": {"CN": issuer_cn}}})
    policy = json.dumps({"AutoSelectCertificateForUrls": [rule]})
    return [
        "A client certificate for mTLS in a browser (make one with",
        "`tlsproxy certs issue --ca DIR --client --p12 --out certs/alice alice`, password changeit):",
        "  Chromium/Chrome on Linux: pk12util -d sql:$HOME/.pki/nssdb -i certs/alice.p12 -W changeit",
        "  Firefox: Settings > Privacy & Security > Certificates > View Certificates > Your Certificates > Import",
        "  macOS: security import certs/alice.p12 -P changeit   (into the login keychain)",
        "  Windows: certutil -user -p changeit -importPFX certs\\alice.p12",
        "  Chromium asks which certificate to send unless the AutoSelectCertificateForUrls policy picks",
        "  one, e.g. in /etc/chromium/policies/managed/tlsproxy.json (Chrome: /etc/opt/chrome/...):",
        f"    {policy}",
    ]


def ca_banner(ca_pem: Path, cwd: Path | None = None) -> list[str]:
    """``CA: /abs/ca.pem`` and the one command that trusts it (path relative to CWD when
    inside it, so the line pastes as it is)."""
    absolute = Path(os.path.abspath(ca_pem))
    shown = absolute
    base = Path(os.path.abspath(cwd or Path.cwd()))
    if absolute.is_relative_to(base):
        shown = absolute.relative_to(base)
    return [f"CA: {absolute}", f"trust it: tlsproxy certs trust --ca {shlex.quote(str(shown))} --install"]
