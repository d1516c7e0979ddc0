#!/usr/bin/env bash
# Builds the arm64 gateway image (packaging/image/build.sh) and boots it on
# an emulated arm64 machine the way a gateway boots it: UEFI firmware
# (Debian's AAVMF), systemd-boot, Debian 12 under systemd. A configuration
# dropped on its PLANTEDGE partition (a simulated line into a file archive)
# must be installed at first boot, the service must come up and archive
# events, and the data partition must be grown to the disk.
#
#   cross/arm64-image-smoke.sh      # uses the newest dist/*_arm64.deb, building it first if none
#
# Slow: the image's package scripts run under qemu-user through binfmt_misc
# (single-threaded tools, which it runs; see the design doc), and the boot is
# full-system TCG emulation: about 35 minutes to build and 3 to boot on two
# cores (measured with other work beside it), so it is a
# separate command, not part of the test script.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=$(ls -t dist/plant-edge_*_arm64.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  cross/build.sh aarch64-unknown-linux-gnu
  deb=$(ls -t dist/plant-edge_*_arm64.deb | head -n 1)
fi

need=()
for pkg in mmdebstrap qemu-system-arm qemu-efi-aarch64 qemu-user-static binfmt-support arch-test dosfstools mtools fdisk openssh-client; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The arm64 packages' maintainer scripts run through binfmt_misc.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true

image=target/image/gateway-arm64.img
mkdir -p target/image
if [ ! -f "$image" ] || [ "$deb" -nt "$image" ] || [ -n "$(find packaging/image -newer "$image" -type f)" ]; then
  packaging/image/build.sh arm64 "$deb" "$image"
fi

work=target/arm64-image-smoke
rm -rf "$work"
mkdir -p "$work"
cp --sparse=always "$image" "$work/gateway.img"
truncate -s 3G "$work/gateway.img"
ssh-keygen -q -t ed25519 -N '' -f "$work/key"
cp "$work/key.pub" "$work/authorized_keys"
cat > "$work/plant-edge.toml" <<'EOF'
[agent]
site = "arm-plant"
gateway = "gw-arm64"
state_dir = "/var/lib/plant-edge"

[sinks.archive]
kind = "file"
path = "/var/lib/plant-edge/archive/events.jsonl"

[sources.press]
kind = "simulated"
line = "L1"
machine = "press1"
interval = "500ms"
good_per_tick = 2
EOF
packaging/image/config-partition.sh "$work/gateway.img" put "$work/authorized_keys" "$work/plant-edge.toml" 2>/dev/null
cp /usr/share/AAVMF/AAVMF_VARS.fd "$work/vars.fd"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
started=$(date +%s)
qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 2 -m 1024 -accel tcg,thread=multi \
  -display none -no-reboot \
  -drive if=pflash,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd \
  -drive if=pflash,format=raw,file="$work/vars.fd" \
  -drive file="$work/gateway.img",format=raw,if=virtio,cache=unsafe \
  -nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:"$port"-:22 \
  -serial file:"$work/console.log" &
qemu=$!
trap 'kill $qemu 2>/dev/null || true' EXIT

on_gateway() {
  ssh -q -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ConnectTimeout=10 -i "$work/key" -p "$port" root@127.0.0.1 "$@"
}
until on_gateway true 2>/dev/null; do
  if ! kill -0 $qemu 2>/dev/null; then
    tail -n 40 "$work/console.log" >&2
    echo "FAILED: qemu exited before ssh answered" >&2
    exit 1
  fi
  if [ $(( $(date +%s) - started )) -gt 1800 ]; then
    tail -n 40 "$work/console.log" >&2
    echo "FAILED: no ssh within 30 minutes" >&2
    exit 1
  fi
  sleep 10
done
echo "arm64 gateway: ssh after $(( $(date +%s) - started )) s"

failed=0
check() {
  local what=$1; shift
  if on_gateway "$@" >/dev/null 2>&1; then
    echo "ok: $what"
  else
    echo "FAILED: $what" >&2
    failed=1
  fi
}
check "an arm64 machine" '[ "$(uname -m)" = aarch64 ]'
check "the dropped config installed" 'for i in $(seq 60); do [ -f /boot/plant-config/plant-edge-result.txt ] && break; sleep 2; done; head -n 1 /boot/plant-config/plant-edge-result.txt | grep -q ^INSTALLED'
check "the service active (READY=1)" 'for i in $(seq 120); do systemctl is-active -q plant-edge && exit 0; sleep 2; done; exit 1'
check "events archived" 'for i in $(seq 120); do [ -s /var/lib/plant-edge/archive/events.jsonl ] && exit 0; sleep 2; done; exit 1'
check "the data partition grown" '[ "$(df -BM --output=size /var/lib/plant-edge | tail -n 1 | tr -dc 0-9)" -gt 1000 ]'
check "a clean stop" 'systemctl stop plant-edge && [ "$(systemctl show -p ExecMainStatus --value plant-edge)" = 0 ]'
on_gateway 'cat /boot/plant-config/plant-edge-result.txt; plant-edge --version; systemd-analyze' || true
on_gateway 'systemctl poweroff' || true
wait $qemu || true
trap - EXIT
[ "$failed" = 0 ] || exit 1
echo "arm64 gateway image: booted and forwarding in $(( $(date +%s) - started )) s"
