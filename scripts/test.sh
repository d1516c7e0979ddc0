#!/usr/bin/env bash
# The test command of README.md: formatting, lints, then every test of the
# workspace. Installs what it needs on a fresh machine of this kind.
set -euo pipefail
cd "$(dirname "$0")/.."

# A clean build of the workspace (debug tests, the release build for the
# .deb, the VM image) leaves about 4 GiB in target/ and the tests' temporary
# journals need more while they run (a CI run with 2.9 GiB free failed in
# the linker); say so up front instead of "No space left on device".
NEEDED_GIB=8
free_gib=$(df --output=avail -BG . | tail -1 | tr -dc '0-9')
if [ "${free_gib:-0}" -lt "$NEEDED_GIB" ]; then
  echo "only ${free_gib} GiB free on $(df --output=target . | tail -1); the tests need about ${NEEDED_GIB} GiB (target/ of a clean build)" >&2
  exit 1
fi
# Incremental compilation only pays off for repeated builds; a clean run
# would just write gigabytes of incremental state.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# apt-get update fails as a whole when any one index cannot be fetched (a
# mirror mid-sync for a foreign architecture added by cross/build.sh was
# seen here), although the indexes the tests need are fine. Go on with what
# it has: a package that cannot be found still stops the install below.
apt_update() {
  apt-get update -qq || echo "apt-get update reported errors (above); installing from the package lists it has" >&2
}

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
  apt_update
  apt-get install -y -qq --no-install-recommends mosquitto
  # The package starts a system broker on 1883; the tests do not need it.
  systemctl disable --now mosquitto >/dev/null 2>&1 || service mosquitto stop >/dev/null 2>&1 || true
fi

# The unit tests use systemd-analyze (verify, security --offline).
if [ ! -x /usr/bin/systemd-analyze ]; then
  echo "systemd-analyze missing: installing Debian's systemd package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt_update
  apt-get install -y -qq --no-install-recommends systemd
fi

# The status page is tested in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then
  echo "chromium missing: installing Debian's package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt_update
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
      apt_update
      (cd target/tools && rm -f prometheus_*.deb && apt-get download -qq prometheus)
      dpkg-deb -x target/tools/prometheus_*.deb target/tools/prometheus
    fi
  fi
  export PROMTOOL
fi

# The gateway image is built from Debian's archive (mmdebstrap) and booted
# by tests/tests/gateway_vm.rs under qemu's software emulation with UEFI
# firmware (ovmf), driven over ssh.
vm_tools=(mmdebstrap:mmdebstrap qemu-system-x86_64:qemu-system-x86 mkfs.vfat:dosfstools
  mcopy:mtools sfdisk:fdisk ssh:openssh-client mkfs.ext4:e2fsprogs)
missing=()
for tool in "${vm_tools[@]}"; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || [ -x "/sbin/${tool%%:*}" ] || missing+=("${tool##*:}")
done
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing+=(ovmf)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian's ${missing[*]} for the gateway image and its VM test" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt_update
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

# The .deb as an OT team meets it: built, installed on this machine,
# upgraded over itself, purged (needs root, as CI and the dev machines are).
packaging/test-deb.sh

# The gateway image with that .deb, built while the tests compile (it is
# mostly downloads and unpacking, they are mostly CPU).
deb=$(ls -t target/debian/plant-edge_*_amd64.deb | head -n 1)
mkdir -p target/image
packaging/image/build.sh amd64 "$deb" target/image/gateway-amd64.img > target/image/build.log 2>&1 &
image_build=$!
cargo nextest run --workspace --no-run
if ! wait "$image_build"; then
  cat target/image/build.log >&2
  echo "the gateway image did not build (log above)" >&2
  exit 1
fi
tail -n 1 target/image/build.log

# Among them: the gateway VM test (the image booted under a real systemd:
# status, credentials, SIGKILL, watchdog, bad config, an ERP outage across
# a reboot, three power cuts, reconciled against the PLC), the handshake
# chaos test (a PLC restarting mid-run while the agent is SIGKILLed 32
# times), the disk-full test (mounts a 64 MiB tmpfs: needs root) and the
# unreadable-journal test (runs the agent as nobody via setpriv).
cargo nextest run --workspace --no-fail-fast
