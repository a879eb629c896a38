"""Component A of the sidecar recipe: it speaks plain HTTP only, to its egress proxy on
loopback, and exits 0 only if

1. a request reaches component B over mutual TLS, and B sees component A's identity
   (X-Forwarded-Client-Cert, CN=component-a), not the one A tried to forge;
2. the same request sent with the impostor's certificate (the egress's /as-impostor service)
   is refused by the ingress with 403;
3. the gRPC half, when grpcio is in the image (Dockerfile.grpc beside this) and
   examples/grpc_echo_client.py is mounted beside this script: an insecure-channel (h2c) call to
   the same plain port reaches B's gRPC server over mutual TLS, B saw CN=component-a in its
   x-forwarded-client-cert metadata, and the impostor's call ends with PERMISSION_DENIED.
   Without grpcio it prints why the gRPC half was skipped and the REST result stands.

REST with Python's standard library only (the tlsproxy image has no curl). EGRESS names the
plain port.
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
    return check_grpc()


def check_grpc() -> int:
    """The gRPC half (see the module docstring); 0 when it passed or could not run here."""
    try:
        import grpc_echo_client as client  # examples/grpc_echo_client.py, mounted beside this
    except ImportError as missing:
        print(f"skip: gRPC half not run: {missing} (the image needs grpcio: Dockerfile.grpc)")
        return 0
    with client.open_channel(f"{HOST}:{PORT}", plaintext=True) as channel:
        client.wait_ready(channel, 10)
        status, text = client.echo_and_identify(channel)
        if status != "OK" or 'Subject="CN=component-a"' not in text:
            print(f"FAIL: gRPC through the sidecar pair: {status}: {text}")
            return 1
        print(f"ok: gRPC insecure channel -> egress (h2c) -> mTLS (h2) -> ingress -> B: {text}")
        status, text = client.echo_and_identify(channel, path_prefix="/as-impostor")
    if status != "PERMISSION_DENIED":
        print(f"FAIL: gRPC with the impostor's certificate: {status}: {text}, expected PERMISSION_DENIED")
        return 1
    print(f"ok: gRPC with the impostor's certificate: {status}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
