#!/usr/bin/env bash
# Builds release binaries, .debs and image-builder tarballs for each target
# from this kind of machine (Debian 12, x86_64), installing what it needs.
#
#   cross/build.sh                          # x86_64 and aarch64
#   cross/build.sh aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#
# x86_64 builds with the machine's own toolchain. Other targets build with
# Debian's rustc-web and its standard library for that architecture
# (libstd-rust-web-dev:<arch>) and the matching gcc as linker. armv7 needs
# an armhf standard library of the same release as rustc-web, which Debian
# 12 does not have; elsewhere the same script works for it unchanged.
# Output: dist/plant-edge_<version>_<arch>.deb and
#         dist/plant-edge-<version>-<arch>.tar.gz (the installed file layout).
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu)

deb_arch() {
  case "$1" in
    x86_64-*) echo amd64 ;;
    aarch64-*) echo arm64 ;;
    armv7-*) echo armhf ;;
    *) echo "unsupported target $1" >&2; exit 2 ;;
  esac
}
gnu_triple() {
  case "$1" in
    aarch64-*) echo aarch64-linux-gnu ;;
    armv7-*) echo arm-linux-gnueabihf ;;
  esac
}

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
mkdir -p dist
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

for target in "${targets[@]}"; do
  arch=$(deb_arch "$target")
  echo "== $target ($arch)"
  if [ "$arch" = amd64 ]; then
    cargo deb -p plant-edge --output "dist/"
  else
    triple=$(gnu_triple "$target")
    if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
      dpkg --add-architecture "$arch"
    fi
    if ! dpkg -s "libstd-rust-web-dev:$arch" "gcc-$triple" rustc-web >/dev/null 2>&1; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc-web "libstd-rust-web-dev:$arch" "gcc-$triple" "libc6-dev-$arch-cross"
    fi
    target_env=$(echo "$target" | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${target_env}_LINKER=$triple-gcc"
    export "CC_$(echo "$target" | tr '-' '_')=$triple-gcc"
    # Debian's rustc-web carries the standard library for $arch; the
    # rustup toolchain here has only x86_64's.
    RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=target/cross \
      cargo deb -p plant-edge --target "$target" --output "dist/"
  fi
  deb=$(ls -t dist/plant-edge_*_"$arch".deb | head -n 1)
  stage=$(mktemp -d)
  dpkg-deb -x "$deb" "$stage"
  tar -C "$stage" -czf "dist/plant-edge-$version-$arch.tar.gz" .
  rm -rf "$stage"
  echo "built $deb and dist/plant-edge-$version-$arch.tar.gz"
done
