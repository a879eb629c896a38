#!/bin/sh
# The compose example's one-shot "certs" service: a CA and a client certificate, made once
# with `tlsproxy certs` into the shared volume mounted at /certs. The proxy issues its own
# server certificate from this CA on start (tls.auto), so clients trust /certs/ca/ca.pem.
# Idempotent: a second `up` keeps what the first one made (tlsproxy never overwrites files).
set -eu
[ -f /certs/ca/ca.pem ] || tlsproxy certs ca --dir /certs/ca --name "tlsproxy compose example CA"
[ -f /certs/clients/client.pem ] || tlsproxy certs issue --ca /certs/ca --client --out /certs/clients/client client
tlsproxy certs inspect /certs/clients/client.pem
