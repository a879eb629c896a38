"""The admin's ``/trust`` page: how to trust the local CA on each platform (HTML, no JS).

Pure: PEM in, bytes out; ``admin`` routes ``/trust``, ``/ca.crt`` and ``/ca.der`` here.
Phones install a CA from DER served as ``application/x-x509-ca-cert`` (``/ca.crt``);
desktops and tools take the PEM (``/ca.pem``). The page is served over plain HTTP, so it
says to compare the fingerprint before trusting. Every value put in the HTML is escaped.
"""

from __future__ import annotations

from html import escape

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from proxy.pki.trust_stores.model import entry_name

HTML = b"text/html; charset=utf-8"
DER = b"application/x-x509-ca-cert"  # what Android and iOS offer to install

_STYLE = """
body{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
code,pre{font-family:ui-monospace,monospace;font-size:.9rem;background:#f4f4f4}
pre{padding:.6rem;white-space:pre-wrap;overflow-wrap:anywhere}
.fp{word-break:break-all}.warn{background:#fff4d6;padding:.6rem;border-left:4px solid #e0a800}
a.dl{display:inline-block;margin:.2rem .6rem .2rem 0;padding:.4rem .8rem;border:1px solid #36c;border-radius:4px}
"""


def first_certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def ca_der(pem: bytes) -> bytes:
    """The CA (the first certificate of the PEM) as DER, for /ca.crt and /ca.der."""
    return first_certificate(pem).public_bytes(serialization.Encoding.DER)


def der_filename(pem: bytes) -> bytes:
    """A Content-Disposition naming the download after the CA (same name as in the stores)."""
    return f'attachment; filename="{entry_name(first_certificate(pem))}.crt"'.encode()


def colon_hex(digest: bytes) -> str:
    """``AB:CD:…``: how browsers and phones display fingerprints."""
    return ":".join(f"{byte:02X}" for byte in digest)


def render_trust_page(pem: bytes) -> bytes:
    cert = first_certificate(pem)
    name = entry_name(cert)
    subject = cert.subject.rfc4514_string()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    title = str(cns[0].value) if cns else subject
    sha256 = colon_hex(cert.fingerprint(hashes.SHA256()))
    sha1 = colon_hex(cert.fingerprint(hashes.SHA1()))  # Windows shows the SHA-1 thumbprint
    until = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    sections = [
        ("Linux (curl, Python, Go, system tools)", [
            _p("Download <code>ca.pem</code>, then with tlsproxy installed:"),
            _pre("sudo tlsproxy certs trust --ca ca.pem --install --store system\n"
                 "tlsproxy certs trust --ca ca.pem --install --store nss,java   # browsers, Java"),
            _p("Or by hand, Debian/Ubuntu/Alpine:"),
            _pre(f"sudo cp ca.pem /usr/local/share/ca-certificates/{name}.crt && sudo update-ca-certificates"),
            _p("Fedora/RHEL:"),
            _pre(f"sudo cp ca.pem /etc/pki/ca-trust/source/anchors/{name}.crt && sudo update-ca-trust"),
            _p("Arch:"),
            _pre("sudo trust anchor --store ca.pem"),
            _p("Chromium and Chrome on Linux read their own NSS database, not the system store:"),
            _pre(f"certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n {name} -i ca.pem"),
        ]),
        ("macOS (Safari, Chrome, curl)", [
            _pre("sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain ca.pem"),
            _p("Or open <code>ca.crt</code> in Keychain Access, add it to the System keychain, open it and "
               "set <em>When using this certificate</em> to <em>Always Trust</em>."),
        ]),
        ("Windows (Edge, Chrome, .NET)", [
            _p("In an administrator prompt:"),
            _pre("certutil -addstore -f ROOT ca.crt"),
            _p("Or open <code>ca.crt</code>, <em>Install Certificate</em>, <em>Local Machine</em>, "
               "<em>Place all certificates in the following store</em>: "
               "<em>Trusted Root Certification Authorities</em>."),
        ]),
        ("Firefox (every platform)", [
            _p("Settings, Privacy &amp; Security, Certificates, <em>View Certificates</em>, <em>Authorities</em>, "
               "<em>Import</em> <code>ca.pem</code>, tick <em>Trust this CA to identify websites</em>. On Linux "
               "<code>tlsproxy certs trust --install --store nss</code> does every profile at once; on macOS "
               "and Windows, <code>security.enterprise_roots.enabled</code> in <code>about:config</code> makes "
               "Firefox use the system store."),
        ]),
        ("Android", [
            _p("Download <code>ca.crt</code>, then Settings, Security, <em>Encryption &amp; credentials</em> "
               "(or <em>More security settings</em>), <em>Install a certificate</em>, <em>CA certificate</em>. "
               "Chrome trusts it; other apps only when their network security config trusts user CAs."),
        ]),
        ("iOS and iPadOS", [
            _p("Open <code>ca.crt</code> in Safari and allow the download, then Settings, "
               "<em>Profile Downloaded</em>, <em>Install</em>. Then Settings, General, About, "
               "<em>Certificate Trust Settings</em>: turn on full trust for this CA."),
        ]),
        ("Java", [
            _pre(f"tlsproxy certs trust --ca ca.pem --install --store java\n"
                 f"keytool -importcert -noprompt -cacerts -storepass changeit -alias {name} -file ca.pem"),
        ]),
        ("A client certificate for mTLS", [
            _p("Import the <code>.p12</code> from <code>tlsproxy certs issue --client --p12</code> "
               "(password <code>changeit</code> unless you chose one):"),
            _pre("pk12util -d sql:$HOME/.pki/nssdb -i alice.p12 -W changeit   # Chromium/Chrome on Linux"),
            _p("Firefox: <em>View Certificates</em>, <em>Your Certificates</em>, <em>Import</em>. Chromium asks "
               "which certificate to send unless the <code>AutoSelectCertificateForUrls</code> policy picks one."),
        ]),
    ]
    body = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Trust {escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Trust the CA “{escape(title)}”</h1>",
        "<p>This proxy's certificates are issued by a local CA. Trust it once on each device and "
        "browsers and tools accept the proxy without warnings, and without turning verification off.</p>",
        '<p><a class="dl" href="/ca.pem" download>ca.pem</a> (PEM: Linux, macOS, Firefox, tools) '
        '<a class="dl" href="/ca.crt">ca.crt</a> (DER: Android, iOS, Windows; also '
        '<a href="/ca.der">/ca.der</a>)</p>',
        "<dl>",
        f"<dt>Subject</dt><dd><code>{escape(subject)}</code></dd>",
        f'<dt>SHA-256 fingerprint</dt><dd><code class="fp" id="sha256">{escape(sha256)}</code></dd>',
        f'<dt>SHA-1 fingerprint</dt><dd><code class="fp">{escape(sha1)}</code></dd>',
        f"<dt>Valid until</dt><dd>{escape(until)}</dd>",
        "</dl>",
        '<p class="warn">This page comes over plain HTTP: before trusting, compare the SHA-256 fingerprint '
        "with the one on the proxy's host (<code>tlsproxy certs inspect certs/ca/ca.pem</code>) or on the "
        "device's install screen.</p>",
    ]
    for title, parts in sections:
        body.append(f"<h2>{escape(title)}</h2>")
        body.extend(parts)
    body.append("</body></html>\n")
    return "\n".join(body).encode("utf-8")


def _p(trusted_html: str) -> str:
    """A paragraph of fixed HTML written here (values from the certificate go through escape)."""
    return f"<p>{trusted_html}</p>"


def _pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"
