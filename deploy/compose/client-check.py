"""The compose example's client: proves mutual TLS from the outside, and exits 0 only if

1. a request with the client certificate is admitted and the upstream sees who sent it, and
2. a request without one is refused (handshake alert, or a 403).

Python's standard library only (the tlsproxy image has no curl). PROXY_URL names the proxy;
the CA and the client certificate come from the shared volume at /certs.
"""

import json
import os
import ssl
import sys
import urllib.error
import urllib.request

URL = os.environ.get("PROXY_URL", "https://tlsproxy:8443/")
CA = os.environ.get("CA_FILE", "/certs/ca/ca.pem")
CERT = os.environ.get("CLIENT_CERT", "/certs/clients/client.pem")
KEY = os.environ.get("CLIENT_KEY", "/certs/clients/client.key")


def fetch(context: ssl.SSLContext) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(URL + "compose-check", context=context, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def main() -> int:
    with_cert = ssl.create_default_context(cafile=CA)
    with_cert.load_cert_chain(CERT, KEY)
    status, body = fetch(with_cert)
    if status != 200:
        print(f"FAIL: with the client certificate: HTTP {status}: {body[:300]!r}")
        return 1
    headers = json.loads(body)["headers"]
    identity = headers.get("x-forwarded-client-cert", "")
    print(f"ok: with the client certificate: 200, upstream saw x-forwarded-client-cert: {identity}")
    if "CN=client" not in identity:
        print("FAIL: the upstream did not receive the client's identity")
        return 1

    try:
        status, body = fetch(ssl.create_default_context(cafile=CA))
    except (ssl.SSLError, urllib.error.URLError, ConnectionError) as exc:
        print(f"ok: without a client certificate: refused in the handshake ({exc})")
        return 0
    if status == 403:
        print(f"ok: without a client certificate: 403 {body[:200]!r}")
        return 0
    print(f"FAIL: without a client certificate: HTTP {status}, expected a refusal")
    return 1


if __name__ == "__main__":
    sys.exit(main())
