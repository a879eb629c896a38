"""The admin's /trust onboarding page: its HTML parsed with the stdlib's html.parser
(well-formed, escaped, the links and steps it promises), and /trust, /ca.crt, /ca.der
served by a real admin listener."""

from __future__ import annotations

from html.parser import HTMLParser

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from test_admin import TIMEOUT, AdminThread, Knobs

from proxy.pki.build import create_ca
from proxy.pki.store import certs_pem
from proxy.pki.trust_stores.model import entry_name
from proxy.server.trust_page import colon_hex, render_trust_page

VOID = {"meta", "br", "hr", "img", "link", "input"}


class Page(HTMLParser):
    """Tags, links, headings and text of a page; ``errors`` for unbalanced tags."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "a":
            self.links.append(dict(attrs).get("href"))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] in ("h1", "h2"):
            self.headings.append(data)


def test_the_page_is_well_formed_and_has_what_it_promises(pki) -> None:
    page = Page(render_trust_page(pki.ca_pem.read_bytes()).decode())
    assert page.errors == [] and page.stack == []
    assert "script" not in page.tags  # works without JavaScript
    assert {"/ca.pem", "/ca.crt", "/ca.der"} <= set(page.links)
    text = "".join(page.text)
    assert colon_hex(pki.ca_cert.fingerprint(hashes.SHA256())) in text
    assert pki.ca_cert.subject.rfc4514_string() in text
    for platform in ("Linux", "macOS", "Windows", "Firefox", "Android", "iOS"):
        assert any(heading.startswith(platform) for heading in page.headings), page.headings
    assert "tlsproxy certs trust --ca ca.pem --install --store system" in text
    assert f"certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n {entry_name(pki.ca_cert)} -i ca.pem" in text
    assert "certutil -addstore -f ROOT ca.crt" in text and "Certificate Trust Settings" in text


def test_everything_from_the_certificate_is_escaped() -> None:
    hostile = '<script>alert("x")</script> & <b>'
    cert, _key = create_ca(hostile)
    html = render_trust_page(certs_pem([cert])).decode()
    page = Page(html)
    assert "script" not in page.tags and "b" not in page.tags and page.errors == []
    shown = cert.subject.rfc4514_string()
    assert "<script" in shown and shown in "".join(page.text)  # shown as text, not markup
    assert "<script" not in html and "<b>" not in html


def test_the_admin_listener_serves_the_page_and_der_for_phones(pki) -> None:
    knobs = Knobs(ca=pki.ca_pem.read_bytes())
    admin = AdminThread(knobs)
    try:
        with requests.Session() as session:
            session.trust_env = False
            page = session.get(f"{admin.url}/trust", timeout=TIMEOUT)
            assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
            assert colon_hex(pki.ca_cert.fingerprint(hashes.SHA256())) in page.text
            for path in ("/ca.crt", "/ca.der"):
                der = session.get(f"{admin.url}{path}", timeout=TIMEOUT)
                assert der.status_code == 200 and der.headers["content-type"] == "application/x-x509-ca-cert"
                assert x509.load_der_x509_certificate(der.content) == pki.ca_cert
                assert f'filename="{entry_name(pki.ca_cert)}.crt"' in der.headers["content-disposition"]
            assert session.head(f"{admin.url}/trust", timeout=TIMEOUT).status_code == 200
            knobs.ca = None  # certificates from files: no local CA, nothing to onboard
            for path in ("/trust", "/ca.crt", "/ca.der"):
                gone = session.get(f"{admin.url}{path}", timeout=TIMEOUT)
                assert (gone.status_code, gone.text) == (404, "no local CA is in use\n")
    finally:
        admin.close()
        admin.stop_loop()


def test_der_matches_the_pem(pki) -> None:
    from proxy.server.trust_page import ca_der

    assert ca_der(pki.ca_pem.read_bytes()) == pki.ca_cert.public_bytes(serialization.Encoding.DER)
