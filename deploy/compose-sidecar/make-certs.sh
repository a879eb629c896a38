#!/bin/sh
# The sidecar recipe's one-shot "certs" service: a CA, component A's client certificate
# (CN=component-a, on the ingress's allow-list), an impostor's (CN=impostor, valid but not on
# it) and the egress's own server certificate for its local TLS port, made once with
# `tlsproxy certs` into the shared volume mounted at /certs. The ingress issues its server
# certificate from the CA itself (tls.auto). Idempotent: tlsproxy never overwrites files.
set -eu
[ -f /certs/ca/ca.pem ] || tlsproxy certs ca --dir /certs/ca --name "tlsproxy sidecar example CA"
[ -f /certs/clients/component-a.pem ] || tlsproxy certs issue --ca /certs/ca --client --out /certs/clients/component-a component-a
[ -f /certs/clients/impostor.pem ] || tlsproxy certs issue --ca /certs/ca --client --out /certs/clients/impostor impostor
[ -f /certs/egress/local.pem ] || tlsproxy certs issue --ca /certs/ca --out /certs/egress/local localhost 127.0.0.1
tlsproxy certs inspect /certs/clients/component-a.pem
