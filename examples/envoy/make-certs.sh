#!/usr/bin/env bash
# Makes throwaway certificates for this example: a CA (certs/ca.crt, for curl --cacert) and the two
# certificates acme-sds.toml serves, web (www.example.com, example.com) and api (api.example.com), each a
# PEM chain and a key; also, to try the README's mutual-TLS setup, an SDS server certificate (sds-server:
# localhost, 127.0.0.1) and an Envoy client certificate (edge-1: spiffe://example.org/ns/edge/sa/edge-1).
# Writes into certs/ beside this script, or into the directory given.
set -euo pipefail
out="${1:-$(dirname "$0")/certs}"
mkdir -p "$out"
cd "$out"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=acme-sds example CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout ca.key -out ca.crt 2>/dev/null
leaf() { # leaf NAME SAN
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -days 30 \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$2" "${3:-serverAuth}") -out "$1.crt" 2>/dev/null
  rm "$1.csr"
}
leaf web DNS:www.example.com,DNS:example.com
leaf api DNS:api.example.com
leaf sds-server DNS:localhost,IP:127.0.0.1
leaf edge-1 URI:spiffe://example.org/ns/edge/sa/edge-1 clientAuth
chmod 644 ./*.crt
echo "made $out/{ca,web,api,sds-server,edge-1}.crt and their keys"
