#!/usr/bin/env bash
# Builds the Arch package from this checkout as a release would: `git archive` of HEAD as the
# PKGBUILD's source tarball, its sha256 written into a copy of the PKGBUILD (`makepkg -g`), then
# `makepkg` (which refuses root) as a throw-away user, with the same Rust toolchain as the caller.
# Checks the built package's file list. Run as root on a throw-away machine (CI); needs the
# `makepkg` and `libarchive-tools` packages (Debian) and network access for `cargo fetch`.
# Usage: build-arch.sh [OUTPUT_DIR]   (default: target/arch)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-target/arch}")
user=shaper-builder
pkgver=$(sed -n 's/^pkgver=//p' packaging/arch/PKGBUILD)

id "$user" > /dev/null 2>&1 || useradd --create-home "$user"
home=$(getent passwd "$user" | cut -d: -f6)
work=$(mktemp -d)
trap 'rm -rf "$work" "$home/rust"' EXIT
chmod 755 "$work"

# makepkg runs as $user, who cannot enter /root where rustup keeps the toolchain: give it the
# caller's toolchain through hard links (no copy when on one file system).
sysroot=$(rustc --print sysroot)
rm -rf "$home/rust"
cp -al "$sysroot" "$home/rust" 2> /dev/null || cp -a "$sysroot" "$home/rust"

git archive --format=tar.gz --prefix="shaper-$pkgver/" -o "$work/shaper-$pkgver.tar.gz" HEAD
cp packaging/arch/PKGBUILD "$work/"
chown -R "$user" "$work"
as_builder() { (cd "$work" && runuser -u "$user" -- env PATH="$home/rust/bin:$PATH" "$@"); }
sums=$(as_builder makepkg -g)
sed -i "s/^sha256sums=.*/$sums/" "$work/PKGBUILD"
grep -q "^sha256sums=('[0-9a-f]\{64\}')" "$work/PKGBUILD" \
    || { echo "build-arch: no checksum from makepkg -g: $sums" >&2; exit 1; }
# --nodeps: pacman's database (glibc, cargo, ...) does not exist on the build machine.
as_builder makepkg --nodeps --noconfirm --noprogressbar

mkdir -p "$out"
pkg=$(find "$work" -maxdepth 1 -name "shaper-$pkgver-*.pkg.tar.*" -print -quit)
[ -n "$pkg" ] || { echo "build-arch: makepkg made no package" >&2; exit 1; }
cp "$pkg" "$out/"
pkg="$out/$(basename "$pkg")"
files=$(tar -tf "$pkg")
for f in usr/bin/shaper usr/lib/systemd/system/shaper.service etc/shaper/policy.lua \
         etc/shaper/shaper.ron usr/share/man/man1/shaper.1.gz usr/share/man/man7/shaper-policy.7.gz \
         usr/share/licenses/shaper/LICENSE-MIT usr/share/doc/shaper/examples/sample.ron \
         usr/share/zsh/site-functions/_shaper usr/lib/shaper/shaper-notify; do
    grep -qx -- "$f" <<<"$files" || { echo "build-arch: $f is missing from $pkg" >&2; exit 1; }
done
echo "build-arch: built $pkg"
