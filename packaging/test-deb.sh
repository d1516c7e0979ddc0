#!/usr/bin/env bash
# Builds the amd64 .deb and checks it the way an OT team meets it: install
# on this machine's root, files and user in place, unit verified, enabled
# but not started, an edited config kept across an upgrade, purge keeps the
# journal. Needs root (CI and the developer machines run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
check() {
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAILED: $what" >&2
  fi
}

if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "cargo-deb missing: installing it from crates.io" >&2
  cargo install cargo-deb --locked
fi
cargo deb -p plant-edge
deb=$(ls -t target/debian/plant-edge_*_amd64.deb | head -n 1)
echo "built $deb"

# The package's own metadata.
check "binary in /usr/bin" sh -c "dpkg-deb -c '$deb' | grep -q ' ./usr/bin/plant-edge$'"
check "unit shipped" sh -c "dpkg-deb -c '$deb' | grep -q 'lib/systemd/system/plant-edge.service$'"
check "sysusers shipped" sh -c "dpkg-deb -c '$deb' | grep -q 'usr/lib/sysusers.d/plant-edge.conf$'"
check "Grafana dashboard shipped" sh -c "dpkg-deb -c '$deb' | grep -q ' ./usr/share/plant-edge/monitoring/plant-edge-dashboard.json$'"
check "alert rules shipped" sh -c "dpkg-deb -c '$deb' | grep -q ' ./usr/share/plant-edge/monitoring/plant-edge-alerts.yml$'"
check "ERP examples shipped" sh -c "dpkg-deb -c '$deb' | grep -q ' ./usr/share/doc/plant-edge/examples/sap-s4hana-confirmation.toml$'"
check "config is a conffile" sh -c "dpkg-deb -f '$deb' Package >/dev/null && dpkg-deb --ctrl-tarfile '$deb' | tar -xO ./conffiles | grep -qx /etc/plant-edge/plant-edge.toml"

# Install over a clean state.
dpkg --purge plant-edge >/dev/null 2>&1 || true
rm -rf /var/lib/plant-edge
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb"
check "binary runs" /usr/bin/plant-edge --version
check "user exists" getent passwd plant-edge
check "user may open serial ports" sh -c "id -nG plant-edge | grep -qw dialout"
check "config readable by the service group only" sh -c "stat -c '%U:%G %a' /etc/plant-edge/plant-edge.toml | grep -qx 'root:plant-edge 640'"
check "installed unit verifies" systemd-analyze verify /lib/systemd/system/plant-edge.service
check "enabled on install" test -L /etc/systemd/system/multi-user.target.wants/plant-edge.service
check "shipped config validates" sh -c "mkdir -p /var/lib/plant-edge && /usr/bin/plant-edge validate -c /etc/plant-edge/plant-edge.toml"

# An edited config survives an upgrade (reinstall of the package).
echo "# edited by the plant" >> /etc/plant-edge/plant-edge.toml
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb"
check "edited config kept on upgrade" grep -q "edited by the plant" /etc/plant-edge/plant-edge.toml

# Purge removes the config but keeps the journal.
mkdir -p /var/lib/plant-edge/journal
touch /var/lib/plant-edge/journal/marker
dpkg --purge plant-edge
check "purge removes the config" test ! -e /etc/plant-edge/plant-edge.toml
check "purge keeps the journal" test -e /var/lib/plant-edge/journal/marker
rm -rf /var/lib/plant-edge

echo "deb: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
