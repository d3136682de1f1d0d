#!/usr/bin/env bash
# Checks a built shaper .rpm: its file list, its configuration files (marked noreplace so an
# upgrade keeps the user's edits), its computed requirements, its systemd scriptlets and that the
# binary inside is stripped. Needs rpm (rpm2cpio), cpio and binutils (readelf).
set -euo pipefail
rpm_file=${1:?usage: check-rpm.sh PACKAGE.rpm}
files=$(rpm -qlp "$rpm_file")
for f in /usr/bin/shaper /usr/lib/systemd/system/shaper.service /etc/shaper/policy.lua \
         /etc/shaper/shaper.ron /usr/share/shaper/lua/shaper.lua /usr/share/shaper/lua/meta.lua \
         /usr/share/doc/shaper/examples/priorities.lua /usr/share/man/man1/shaper.1.gz \
         /usr/share/man/man7/shaper-policy.7.gz /usr/share/bash-completion/completions/shaper \
         /usr/share/zsh/site-functions/_shaper /usr/share/fish/vendor_completions.d/shaper.fish \
         /usr/share/doc/shaper/examples/sample.ron /usr/share/doc/shaper/CHANGELOG.md \
         /usr/libexec/shaper/shaper-notify /usr/share/doc/shaper/examples/notify.conf \
         /usr/share/licenses/shaper/LICENSE-MIT /usr/share/licenses/shaper/LICENSE-APACHE; do
    grep -qx -- "$f" <<<"$files" || { echo "check-rpm: $f is missing from $rpm_file" >&2; exit 1; }
done
config=$(rpm -qp --configfiles "$rpm_file")
for f in /etc/shaper/policy.lua /etc/shaper/shaper.ron; do
    grep -qx "$f" <<<"$config" || { echo "check-rpm: $f is not a config file" >&2; exit 1; }
done
# Requirements on shared libraries are computed (auto-req), so the libgcc_s the binary links is
# among them.
grep -q '^libgcc_s\.so' <<<"$(rpm -qpR "$rpm_file")" \
    || { echo "check-rpm: libgcc_s is not among the requirements" >&2; exit 1; }
scripts=$(rpm -qp --scripts "$rpm_file")
for phase in postinstall preuninstall postuninstall; do
    grep -q "^$phase scriptlet" <<<"$scripts" || { echo "check-rpm: no $phase scriptlet" >&2; exit 1; }
done
grep -q 'preset shaper\.service' <<<"$scripts" \
    || { echo "check-rpm: the scriptlets do not preset shaper.service" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
package=$(realpath "$rpm_file")
# rpm2cpio exits 1 after writing a zstd payload on some versions: judge by what was extracted.
(cd "$root" && { rpm2cpio "$package" || :; } | cpio -id --quiet ./usr/bin/shaper)
[ -x "$root/usr/bin/shaper" ] || { echo "check-rpm: cannot extract /usr/bin/shaper" >&2; exit 1; }
if grep -q '\.debug_' <<<"$(readelf -S --wide "$root/usr/bin/shaper")"; then
    echo "check-rpm: /usr/bin/shaper has debug sections; it should be stripped" >&2
    exit 1
fi
echo "check-rpm: $rpm_file is complete"
