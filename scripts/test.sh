#!/usr/bin/env bash
# The test command of README.md: formatting, lints, then every test of the
# workspace. Installs what it needs on a fresh machine of this kind.
set -euo pipefail
cd "$(dirname "$0")/.."

# A clean build of the workspace (debug tests and the release build for
# the .deb) leaves about 2.5 GiB in target/; say so up front instead of
# failing in the linker with "No space left on device".
NEEDED_GIB=4
free_gib=$(df --output=avail -BG . | tail -1 | tr -dc '0-9')
if [ "${free_gib:-0}" -lt "$NEEDED_GIB" ]; then
  echo "only ${free_gib} GiB free on $(df --output=target . | tail -1); the tests need about ${NEEDED_GIB} GiB (target/ of a clean build)" >&2
  exit 1
fi
# Incremental compilation only pays off for repeated builds; a clean run
# would just write gigabytes of incremental state.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest missing: installing it from crates.io" >&2
  cargo install cargo-nextest --locked
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

# The MQTT tests talk to a real Mosquitto broker (Debian's package); the
# tests start their own instances on free loopback ports.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "mosquitto missing: installing Debian's package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends mosquitto
  # The package starts a system broker on 1883; the tests do not need it.
  systemctl disable --now mosquitto >/dev/null 2>&1 || service mosquitto stop >/dev/null 2>&1 || true
fi

# The unit tests use systemd-analyze (verify, security --offline).
if [ ! -x /usr/bin/systemd-analyze ]; then
  echo "systemd-analyze missing: installing Debian's systemd package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends systemd
fi

# The status page is tested in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then
  echo "chromium missing: installing Debian's package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium
fi

# The monitoring test checks the shipped alert rules with promtool, from
# Debian's prometheus package: extracted into target/, not installed (the
# package would start a Prometheus server).
if [ -z "${PROMTOOL:-}" ]; then
  if command -v promtool >/dev/null 2>&1; then
    PROMTOOL=$(command -v promtool)
  else
    PROMTOOL="$PWD/target/tools/prometheus/usr/bin/promtool"
    if [ ! -x "$PROMTOOL" ]; then
      echo "promtool missing: extracting it from Debian's prometheus package" >&2
      mkdir -p target/tools
      apt-get update -qq
      (cd target/tools && rm -f prometheus_*.deb && apt-get download -qq prometheus)
      dpkg-deb -x target/tools/prometheus_*.deb target/tools/prometheus
    fi
  fi
  export PROMTOOL
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Among them: the handshake chaos test (a PLC restarting mid-run while the
# agent is SIGKILLed 32 times, reconciled against what the PLC saw
# acknowledged), the disk-full test (mounts a 64 MiB tmpfs: needs root)
# and the unreadable-journal test (runs the agent as nobody via setpriv).
cargo nextest run --workspace --no-fail-fast

# The .deb as an OT team meets it: built, installed on this machine,
# upgraded over itself, purged (needs root, as CI and the dev machines are).
packaging/test-deb.sh
