"""Component A of the sidecar recipe: it speaks plain HTTP only, to its egress proxy on
loopback, and exits 0 only if

1. a request reaches component B over mutual TLS, and B sees component A's identity
   (X-Forwarded-Client-Cert, CN=component-a), not the one A tried to forge;
2. the same request sent with the impostor's certificate (the egress's /as-impostor service)
   is refused by the ingress with 403.

Python's standard library only (the tlsproxy image has no curl). EGRESS names the plain port.
"""

import http.client
import json
import os
import sys

HOST, _, PORT = os.environ.get("EGRESS", "127.0.0.1:8080").rpartition(":")


def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, int(PORT), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def main() -> int:
    status, body = get("/orders", {"X-Forwarded-Client-Cert": 'Subject="CN=admin"'})
    if status != 200:
        print(f"FAIL: through the sidecar pair: HTTP {status}: {body[:300]!r}")
        return 1
    identity = json.loads(body)["headers"].get("x-forwarded-client-cert", "")
    print(f"ok: plain HTTP -> egress -> mTLS -> ingress -> B: 200, B saw x-forwarded-client-cert: {identity}")
    if 'Subject="CN=component-a"' not in identity or "admin" in identity:
        print("FAIL: component B did not receive component A's verified identity (alone)")
        return 1
    status, body = get("/as-impostor/orders")
    if status != 403:
        print(f"FAIL: with the impostor's certificate: HTTP {status}, expected 403: {body[:300]!r}")
        return 1
    print(f"ok: with the impostor's certificate: 403 {body.strip().decode()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
