#!/usr/bin/env bash
# Builds a flashable gateway disk image (GPT, UEFI) from Debian 12's archive
# and a plant-edge .deb, without loop mounts: each file system is made from a
# directory (mkfs.ext4 -d, mkfs.vfat + mcopy) and written into the disk at
# its partition's offset.
#
#   packaging/image/build.sh amd64|arm64 PLANT_EDGE_DEB OUTPUT.img
#
# Partitions (README "Gateway image"):
#   1 ESP        FAT32  systemd-boot, kernel, initrd
#   2 plant-root ext4   Debian 12, systemd, ssh, plant-edge (re-flashed on update)
#   3 PLANTEDGE  FAT    first-boot configuration dropped from a laptop
#   4 plant-data ext4   /var/lib/plant-edge (the journal), grown to the disk
#                       at first boot, kept across a re-flash of 1–3
#
# Needs root (mmdebstrap makes files of several owners) and Debian's
# mmdebstrap, dosfstools, mtools, fdisk, e2fsprogs; arm64 on an amd64 host
# also needs qemu-user-static with binfmt_misc for the packages' scripts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

arch=${1:?usage: build.sh amd64|arm64 PLANT_EDGE_DEB OUTPUT.img}
deb=$(realpath "${2:?the plant-edge .deb to install}")
out=${3:?the image file to write}
case $arch in
  amd64) efi_name=BOOTX64.EFI; boot_efi=systemd-bootx64.efi; console=ttyS0 ;;
  arm64) efi_name=BOOTAA64.EFI; boot_efi=systemd-bootaa64.efi; console=ttyAMA0 ;;
  *) echo "build.sh: architecture must be amd64 or arm64, not '$arch'" >&2; exit 2 ;;
esac
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

# Sizes in MiB. The root holds about 450 MiB; the data partition starts
# small so the image stays small and is grown to the disk at first boot.
esp_mib=160
root_mib=${ROOT_MIB:-1024}
config_mib=32
data_mib=64

work=$(mktemp -d "${TMPDIR:-/tmp}/plant-edge-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

echo "image: Debian 12 $arch root file system (mmdebstrap)" >&2
# Partition UUIDs are fixed so the boot entry and fstab can name them
# before the disk exists. The apt timers are masked: a gateway does not
# fetch package lists on its own, its updates come as images.
mmdebstrap --quiet --arch="$arch" --variant=minbase \
  --include=systemd-sysv,udev,dbus,linux-image-"$arch",initramfs-tools,systemd-boot-efi,openssh-server,systemd-timesyncd,systemd-resolved,iproute2,ifupdown-,dosfstools,e2fsprogs,cloud-guest-utils,fdisk,less,nano,ca-certificates \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" && echo MODULES=most > "$1/etc/initramfs-tools/conf.d/modules"' \
  --customize-hook="copy-in $deb /tmp" \
  --customize-hook='chroot "$1" dpkg -i /tmp/'"$(basename "$deb")" \
  --customize-hook='rm -f "$1"/tmp/*.deb' \
  --customize-hook="sync-in $here/rootfs /" \
  --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd systemd-resolved plant-edge-firstboot.service plant-edge-grow-data.service ssh' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
  --customize-hook='echo plant-gateway > "$1/etc/hostname"' \
  --customize-hook='ln -sf /run/systemd/resolve/stub-resolv.conf "$1/etc/resolv.conf"' \
  --customize-hook='rm -rf "$1"/var/lib/plant-edge/* "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  bookworm "$root" "$mirror" "${mirror%/debian}/debian-security bookworm-security main"

echo "image: file systems" >&2
# The ESP: systemd-boot, the kernel and initrd, one boot entry.
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n 1)
esp=$work/esp.img
mkfs.vfat -F 32 -n ESP -C "$esp" $((esp_mib * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mcopy -i "$esp" "$root/usr/lib/systemd/boot/efi/$boot_efi" "::/EFI/BOOT/$efi_name"
mcopy -i "$esp" "$kernel" ::/vmlinuz
mcopy -i "$esp" "$initrd" ::/initrd.img
printf 'default plant-edge.conf\ntimeout 0\n' > "$work/loader.conf"
printf 'title plant-edge gateway (Debian 12)\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=PARTUUID=%s ro console=tty0 console=%s,115200\n' \
  "$(cat "$here/uuids/root")" "$console" > "$work/entry.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
mcopy -i "$esp" "$work/entry.conf" ::/loader/entries/plant-edge.conf

# The configuration partition: empty but for a README an OT engineer sees
# on the laptop, and a marker for where the outcome will appear.
config=$work/config.img
mkfs.vfat -n PLANTEDGE -C "$config" $((config_mib * 1024)) >/dev/null
mcopy -i "$config" "$here/PLANTEDGE-README.txt" ::/README.txt

# The data partition: the journal's own file system, owned by nobody yet
# (systemd's StateDirectory= hands it to the service user).
mkdir -p "$work/data"
mkfs.ext4 -q -L plant-data -d "$work/data" "$work/data.img" ${data_mib}M

mkfs.ext4 -q -L plant-root -d "$root" "$work/root.img" ${root_mib}M

echo "image: disk $out" >&2
total_mib=$((1 + esp_mib + root_mib + config_mib + data_mib + 1))
rm -f "$out"
truncate -s ${total_mib}M "$out"
esp_start=1
root_start=$((esp_start + esp_mib))
config_start=$((root_start + root_mib))
data_start=$((config_start + config_mib))
sfdisk --quiet "$out" <<EOF
label: gpt
start=${esp_start}MiB, size=${esp_mib}MiB, type=uefi, name=ESP, uuid=$(cat "$here/uuids/esp")
start=${root_start}MiB, size=${root_mib}MiB, type=linux, name=plant-root, uuid=$(cat "$here/uuids/root")
start=${config_start}MiB, size=${config_mib}MiB, type=linux, name=PLANTEDGE, uuid=$(cat "$here/uuids/config")
start=${data_start}MiB, size=${data_mib}MiB, type=linux, name=plant-data, uuid=$(cat "$here/uuids/data")
EOF
# The config partition is typed "Microsoft basic data" so that a laptop
# mounts it; sfdisk's type alias for that differs between versions.
sfdisk --quiet --part-type "$out" 3 EBD0A0A2-B9E5-4433-87C0-68B6B72699C7
for part in esp:$esp_start root:$root_start config:$config_start data:$data_start; do
  dd if="$work/${part%%:*}.img" of="$out" bs=1M seek="${part##*:}" conv=notrunc,sparse status=none
done
echo "image: $out ($(du -h --apparent-size "$out" | cut -f1) apparent, $(du -h "$out" | cut -f1) on disk)" >&2
