#!/usr/bin/env bash
# Runs an ARM .deb's binary on an emulated ARM machine and checks what an OT
# team would do first: --version, print-config, validate, a short run
# (simulated line → file archive) stopped with SIGTERM, journal stats and
# verify, that the archive holds exactly what the journal says it
# delivered, and that a journal export imports into a new journal with the
# same backlog.
#
#   cross/arm-smoke.sh arm64     # aarch64: WAGO/Moxa arm64, Raspberry Pi 4/5
#   cross/arm-smoke.sh armhf     # armv7: WAGO PFC200, Moxa UC-8100 (TI AM335x)
#
# Uses the newest dist/*_<arch>.deb, building it with cross/build.sh first
# if there is none. Full-system emulation (qemu-system-aarch64 -M virt
# -cpu cortex-a57, or qemu-system-arm -M virt -cpu cortex-a15; 2 cores),
# not qemu-user: on these machines qemu-user hangs at the first thread a
# guest creates, whatever the program (see "Cross-compiling here" in the
# design doc). The guest boots Debian's kernel for the architecture (arm64,
# or armmp for armhf) straight into an initramfs made of Debian's
# busybox-static, libc6 and libgcc-s1 for it and the .deb's files: no disk
# image, no network, everything from Debian's packages. A 32-bit problem
# (64-bit atomics, alignment, a size that overflows usize) shows here.
# Takes 2–4 minutes once the .deb exists (a cold cross build adds ~15).
set -euo pipefail
cd "$(dirname "$0")/.."

arch=${1:-arm64}
case "$arch" in
  arm64)
    target=aarch64-unknown-linux-gnu; triple=aarch64-linux-gnu; kernel_meta=linux-image-arm64
    qemu=(qemu-system-aarch64 -M virt -cpu cortex-a57); machine=aarch64 ;;
  armhf)
    target=armv7-unknown-linux-gnueabihf; triple=arm-linux-gnueabihf; kernel_meta=linux-image-armmp
    qemu=(qemu-system-arm -M virt -cpu cortex-a15); machine=armv7l ;;
  *) echo "usage: cross/arm-smoke.sh arm64|armhf" >&2; exit 2 ;;
esac

deb=$(ls -t dist/plant-edge_*_"$arch".deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  cross/build.sh "$target"
  deb=$(ls -t dist/plant-edge_*_"$arch".deb | head -n 1)
fi

if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
  dpkg --add-architecture "$arch"
  apt-get update -qq
fi
if ! command -v "${qemu[0]}" >/dev/null || ! command -v cpio >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-arm cpio
fi

work=target/$arch-smoke
rm -rf "$work"
mkdir -p "$work/debs" "$work/root" "$work/kernel"
kernel_pkg=$(apt-cache depends "$kernel_meta:$arch" | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -n 1)
kernel_pkg=${kernel_pkg%:$arch}
# apt's download user cannot write into target/: download as root, quietly.
(cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg:$arch" "busybox-static:$arch" "libc6:$arch" "libgcc-s1:$arch")
dpkg-deb -x "$work"/debs/linux-image-*.deb "$work/kernel"
for pkg in "$work"/debs/busybox-static_*.deb "$work"/debs/libc6_*.deb "$work"/debs/libgcc-s1_*.deb "$deb"; do
  dpkg-deb -x "$pkg" "$work/root"
done
# The kernel's modules are not needed (no disk, no network); the libc's
# locale and gconv data are not either.
rm -rf "$work/root/usr/share" "$work/root/usr/lib/$triple/gconv"

cat > "$work/root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/sbin /usr/bin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ip link set lo up
say() { echo "SMOKE $*"; }
say "arch=$(uname -m)"
say "cpus=$(nproc)"
say "version=$(plant-edge --version)"
plant-edge print-config > /tmp/default.toml && say "print-config=ok lines=$(wc -l < /tmp/default.toml)"
cat > /tmp/smoke.toml <<'TOML'
[agent]
site = "smoke"
gateway = "smoke"
state_dir = "/tmp/state"
metrics_listen = "off"
shutdown_timeout = "10s"

[sinks.archive]
kind = "file"
path = "/tmp/state/archive/events.jsonl"
rotate_bytes = "64MiB"

# No broker in the guest: everything waits for it (the backlog to export).
[sinks.cloud]
kind = "mqtt"
host = "127.0.0.1"
port = 1883

[sources.press]
kind = "simulated"
line = "L1"
machine = "press1"
interval = "100ms"
good_per_tick = 3
scrap_every = 4
TOML
mkdir -p /tmp/state
plant-edge validate -c /tmp/smoke.toml; say "validate=$?"
plant-edge run -c /tmp/smoke.toml > /tmp/agent.log 2>&1 &
pid=$!
sleep 20
kill -TERM $pid
wait $pid; say "run-exit=$?"
say "archived=$(cat /tmp/state/archive/*.jsonl | wc -l)"
plant-edge journal --state /tmp/state stats --json > /tmp/stats.json; say "stats=$?"
say "stats-json=$(tr -d '\n ' < /tmp/stats.json)"
plant-edge journal --state /tmp/state verify; say "verify=$?"
plant-edge journal --state /tmp/state export --out /tmp/backlog.ndjson; say "export=$?"
plant-edge journal --state /tmp/moved import /tmp/backlog.ndjson; say "import=$?"
say "export-lines=$(wc -l < /tmp/backlog.ndjson)"
plant-edge journal --state /tmp/moved stats --json > /tmp/moved.json; say "moved-json=$(tr -d '\n ' < /tmp/moved.json)"
tail -n 5 /tmp/agent.log
say done
poweroff -f
EOF
chmod 755 "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.gz"

log="$work/console.log"
timeout 900 "${qemu[@]}" -smp 2 -m 1024 \
  -nographic -no-reboot -nic none -kernel "$work"/kernel/boot/vmlinuz-* -initrd "$work/initrd.gz" \
  -append "console=ttyAMA0 rdinit=/init panic=-1 quiet" > "$log" 2>&1 || true

field() { sed -n "s/^SMOKE $1=\([^ ]*\).*/\1/p" "$log" | tr -d '\r' | head -n 1; }
grep '^SMOKE' "$log" | tr -d '\r' | grep -v -e stats-json -e moved-json || true
fail() { echo "$arch smoke FAILED: $*"; echo "console log: $log"; exit 1; }
grep -q '^SMOKE done' "$log" || fail "the guest did not finish"
[ "$(field arch)" = "$machine" ] || fail "not an $machine guest"
version=$(sed -n 's/^SMOKE version=//p' "$log" | tr -d '\r' | head -n 1)
case "$version" in plant-edge\ *) ;; *) fail "--version" ;; esac
[ "$(field validate)" = 0 ] || fail "validate"
[ "$(field run-exit)" = 0 ] || fail "run did not stop cleanly on SIGTERM"
[ "$(field stats)" = 0 ] || fail "journal stats"
[ "$(field verify)" = 0 ] || fail "journal verify"
stats=$(field stats-json)
delivered=$(echo "$stats" | sed -n 's/.*"delivered":\([0-9]*\).*/\1/p')
appended=$(echo "$stats" | sed -n 's/.*"appended":\([0-9]*\).*/\1/p')
pending=$(echo "$stats" | sed -n 's/.*"pending_events":\([0-9]*\).*/\1/p')
archived=$(field archived)
[ "${archived:-0}" -gt 0 ] || fail "nothing archived"
[ "$archived" = "$delivered" ] || fail "archive holds $archived events, journal delivered $delivered"
[ "$pending" = "$appended" ] || fail "appended $appended, but $pending wait for the (absent) broker"
[ "$(field export)" = 0 ] || fail "journal export"
[ "$(field import)" = 0 ] || fail "journal import"
moved=$(field moved-json)
moved_pending=$(echo "$moved" | sed -n 's/.*"pending_events":\([0-9]*\).*/\1/p')
[ "$moved_pending" = "$pending" ] || fail "imported journal holds $moved_pending pending events, the exported one $pending"
echo "$arch smoke passed: $archived events archived = delivered, $appended appended, $pending pending for the absent broker, exported and imported ($version, $(field arch), $(field cpus) cores)"
