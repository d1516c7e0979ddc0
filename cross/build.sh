#!/usr/bin/env bash
# Builds release binaries, .debs and image-builder tarballs for each target
# from this kind of machine (Debian 12, x86_64), installing what it needs.
#
#   cross/build.sh                                   # x86_64, aarch64 and armv7
#   cross/build.sh armv7-unknown-linux-gnueabihf     # one of them
#
# x86_64 builds with the machine's own toolchain. Other targets build with
# Debian's rustc-web and its standard library for that architecture
# (libstd-rust-web-dev:<arch>, from Debian 12's security updates at the
# same version as rustc-web) and the matching gcc as linker.
# Output: dist/plant-edge_<version>_<arch>.deb and
#         dist/plant-edge-<version>-<arch>.tar.gz (the installed file layout,
#         plus BUILD-INFO: target, binary size, the oldest glibc it needs).
# Refuses a dependency tree with OpenSSL or aws-lc for any target: all
# crypto is rustls on ring.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

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
  # aws-lc-sys needs CMake and bindgen and is known to fail on armv7;
  # openssl-sys would link OpenSSL. (openssl-probe only finds CA paths.)
  if cargo tree -p plant-edge --no-default-features --target "$target" -e normal,build 2>/dev/null \
      | grep -E 'aws-lc|openssl-sys'; then
    echo "$target: the dependency tree holds aws-lc or OpenSSL (above); all crypto must be rustls on ring" >&2
    exit 1
  fi
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
  binary="$stage/usr/bin/plant-edge"
  # The newest glibc symbol version the binary links against is the oldest
  # glibc it runs on (for Yocto or Buildroot images).
  glibc=$(readelf --version-info --wide "$binary" | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
  size=$(stat -c %s "$binary")
  printf 'target %s\nversion %s\nbinary_bytes %s\nglibc_min %s\n' "$target" "$version" "$size" "$glibc" > "$stage/BUILD-INFO"
  tar -C "$stage" -czf "dist/plant-edge-$version-$arch.tar.gz" .
  rm -rf "$stage"
  echo "built $deb and dist/plant-edge-$version-$arch.tar.gz: binary $size bytes, needs glibc >= $glibc"
done
