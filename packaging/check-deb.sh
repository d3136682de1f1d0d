#!/usr/bin/env bash
# Checks a built shaper .deb: its file list, its conffiles, that the binary inside runs, that the
# installed default policy passes `shaper check`, and (installing it for real, then removing it)
# that systemd accepts the unit. Run as root on a throw-away machine (CI).
set -euo pipefail
deb=${1:?usage: check-deb.sh PACKAGE.deb}

files=$(dpkg-deb -c "$deb" | awk '{print $6}')
for f in ./usr/bin/shaper ./usr/lib/systemd/system/shaper.service ./etc/shaper/policy.lua \
         ./etc/shaper/shaper.ron ./usr/share/shaper/lua/shaper.lua ./usr/share/shaper/lua/meta.lua \
         ./usr/share/doc/shaper/examples/priorities.lua ./usr/share/man/man1/shaper.1.gz \
         ./usr/share/man/man1/shaper-run.1.gz ./usr/share/man/man7/shaper-policy.7.gz \
         ./usr/share/bash-completion/completions/shaper ./usr/share/zsh/vendor-completions/_shaper \
         ./usr/share/fish/vendor_completions.d/shaper.fish; do
    grep -qx -- "$f" <<<"$files" || { echo "check-deb: $f is missing from $deb" >&2; exit 1; }
done

control=$(mktemp -d)
dpkg-deb -e "$deb" "$control"
for f in /etc/shaper/policy.lua /etc/shaper/shaper.ron; do
    grep -qx "$f" "$control/conffiles" || { echo "check-deb: $f is not a conffile" >&2; exit 1; }
done

root=$(mktemp -d)
trap 'rm -rf "$root" "$control"' EXIT
dpkg -x "$deb" "$root"
"$root/usr/bin/shaper" --version
"$root/usr/bin/shaper" --config "$root/etc/shaper/shaper.ron" config > /dev/null
"$root/usr/bin/shaper" check "$root/etc/shaper/policy.lua"

if command -v systemd-analyze > /dev/null; then
    dpkg -i "$deb" > /dev/null
    status=0
    systemd-analyze verify /usr/lib/systemd/system/shaper.service || status=$?
    dpkg --purge shaper > /dev/null
    [ "$status" -eq 0 ] || { echo "check-deb: systemd-analyze verify failed" >&2; exit 1; }
fi
echo "check-deb: $deb is complete"
