#!/usr/bin/env bash
# Runs the arm64 .deb's binary on an emulated arm64 machine and checks what
# an OT team would do first: --version, print-config, validate, a short run
# (simulated line → file archive) stopped with SIGTERM, journal stats and
# verify, and that the archive holds exactly what the journal says it
# delivered.
#
#   cross/arm64-smoke.sh                 # uses the newest dist/*_arm64.deb,
#                                        # building it with cross/build.sh first if none
#
# Full-system emulation (qemu-system-aarch64, -M virt, 2 cores), not
# qemu-user: on these machines qemu-user hangs at the first thread a guest
# creates, whatever the program (see "Cross-compiling here" in the design
# doc). The guest boots Debian's arm64 kernel straight into an initramfs
# made of Debian's arm64 busybox-static, libc6 and libgcc-s1 and the .deb's
# files: no disk image, no network, everything from Debian's packages.
# Takes 2–4 minutes once the .deb exists (a cold cross build adds ~15).
set -euo pipefail
cd "$(dirname "$0")/.."

deb=$(ls -t dist/plant-edge_*_arm64.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  cross/build.sh aarch64-unknown-linux-gnu
  deb=$(ls -t dist/plant-edge_*_arm64.deb | head -n 1)
fi

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  apt-get update -qq
fi
if ! command -v qemu-system-aarch64 >/dev/null || ! command -v cpio >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-arm cpio
fi

work=target/arm64-smoke
rm -rf "$work"
mkdir -p "$work/debs" "$work/root" "$work/kernel"
kernel_pkg=$(apt-cache depends linux-image-arm64:arm64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -n 1)
kernel_pkg=${kernel_pkg%:arm64}
# apt's download user cannot write into target/: download as root, quietly.
(cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg:arm64" busybox-static:arm64 libc6:arm64 libgcc-s1:arm64)
dpkg-deb -x "$work"/debs/linux-image-*.deb "$work/kernel"
for pkg in "$work"/debs/busybox-static_*.deb "$work"/debs/libc6_*.deb "$work"/debs/libgcc-s1_*.deb "$deb"; do
  dpkg-deb -x "$pkg" "$work/root"
done
# The kernel's modules are not needed (no disk, no network); the libc's
# locale and gconv data are not either.
rm -rf "$work/root/usr/share" "$work/root/usr/lib/aarch64-linux-gnu/gconv"

cat > "$work/root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/sbin /usr/bin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
say() { echo "SMOKE $*"; }
say "arch=$(uname -m)"
say "cpus=$(nproc)"
say "version=$(plant-edge --version)"
plant-edge print-config > /tmp/default.toml && say "print-config=ok lines=$(wc -l < /tmp/default.toml)"
cat > /tmp/smoke.toml <<'TOML'
[agent]
site = "smoke"
gateway = "arm64"
state_dir = "/tmp/state"
metrics_listen = "off"
shutdown_timeout = "10s"

[sinks.archive]
kind = "file"
path = "/tmp/state/archive/events.jsonl"
rotate_bytes = "64MiB"

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
tail -n 5 /tmp/agent.log
say done
poweroff -f
EOF
chmod 755 "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.gz"

log="$work/console.log"
timeout 900 qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 2 -m 1024 \
  -nographic -no-reboot -nic none -kernel "$work"/kernel/boot/vmlinuz-* -initrd "$work/initrd.gz" \
  -append "console=ttyAMA0 rdinit=/init panic=-1 quiet" > "$log" 2>&1 || true

field() { sed -n "s/^SMOKE $1=\([^ ]*\).*/\1/p" "$log" | tr -d '\r' | head -n 1; }
grep '^SMOKE' "$log" | tr -d '\r' | grep -v stats-json || true
fail() { echo "arm64 smoke FAILED: $*"; echo "console log: $log"; exit 1; }
grep -q '^SMOKE done' "$log" || fail "the guest did not finish"
[ "$(field arch)" = aarch64 ] || fail "not an arm64 guest"
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
[ $((delivered + pending)) = "$appended" ] || fail "appended $appended != delivered $delivered + pending $pending"
echo "arm64 smoke passed: $archived events archived = delivered, $appended appended, $pending pending ($version, $(field arch), $(field cpus) cores)"
