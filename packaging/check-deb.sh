#!/usr/bin/env bash
# Checks a built shaper .deb: its file list, its conffiles, its computed dependencies, that its
# maintainer scripts handle the unit, that the binary inside is stripped and runs, that the
# installed default policy passes `shaper check` and the README's `simulate` example works from
# the installed files, that both man pages render without Markdown left in them, and (installing
# it for real, then removing it) that systemd accepts the unit. Run as root on a throw-away
# machine (CI); needs man-db and binutils (readelf).
set -euo pipefail
deb=${1:?usage: check-deb.sh PACKAGE.deb}

files=$(dpkg-deb -c "$deb" | awk '{print $6}')
for f in ./usr/bin/shaper ./usr/lib/systemd/system/shaper.service ./etc/shaper/policy.lua \
         ./etc/shaper/shaper.ron ./usr/share/shaper/lua/shaper.lua ./usr/share/shaper/lua/meta.lua \
         ./usr/share/doc/shaper/examples/priorities.lua ./usr/share/man/man1/shaper.1.gz \
         ./usr/share/man/man1/shaper-run.1.gz ./usr/share/man/man7/shaper-policy.7.gz \
         ./usr/share/bash-completion/completions/shaper ./usr/share/zsh/vendor-completions/_shaper \
         ./usr/share/fish/vendor_completions.d/shaper.fish ./usr/share/doc/shaper/examples/sample.ron \
         ./usr/share/doc/shaper/LICENSE-MIT ./usr/share/doc/shaper/LICENSE-APACHE \
         ./usr/share/doc/shaper/changelog.gz ./usr/share/doc/shaper/changelog.Debian.gz \
         ./usr/share/doc/shaper/copyright ./usr/libexec/shaper/shaper-notify \
         ./usr/share/doc/shaper/examples/notify.conf; do
    grep -qx -- "$f" <<<"$files" || { echo "check-deb: $f is missing from $deb" >&2; exit 1; }
done

control=$(mktemp -d)
dpkg-deb -e "$deb" "$control"
for f in /etc/shaper/policy.lua /etc/shaper/shaper.ron; do
    grep -qx "$f" "$control/conffiles" || { echo "check-deb: $f is not a conffile" >&2; exit 1; }
done

# Dependencies come from dpkg-shlibdeps ($auto): libc6 with the version the binary needs.
# (cargo-deb leaves out libgcc-s1, which is protected and always installed.)
depends=$(sed -n 's/^Depends: //p' "$control/control")
for dep in 'libc6 (>= ' iproute2; do
    grep -qF "$dep" <<<"$depends" || { echo "check-deb: Depends ($depends) lacks $dep" >&2; exit 1; }
done
grep -q '^Maintainer: .* <.*@.*>$' "$control/control" \
    || { echo "check-deb: the Maintainer field has no address" >&2; exit 1; }
# Enabled and started on install, stopped on removal, systemd reloaded: the scripts name the unit.
for script in postinst prerm postrm; do
    grep -q 'shaper\.service' "$control/$script" 2> /dev/null \
        || { echo "check-deb: the $script script does not handle shaper.service" >&2; exit 1; }
done

root=$(mktemp -d)
trap 'rm -rf "$root" "$control"' EXIT
dpkg -x "$deb" "$root"
bin=$root/usr/bin/shaper
if grep -q '\.debug_' <<<"$(readelf -S --wide "$bin")"; then
    echo "check-deb: $bin has debug sections ($(du -h "$bin" | cut -f1)); it should be stripped" >&2
    exit 1
fi
"$bin" --version
"$bin" --config "$root/etc/shaper/shaper.ron" config > /dev/null
"$bin" check "$root/etc/shaper/policy.lua"
# README's example, with the installed snapshot.
examples=$root/usr/share/doc/shaper/examples
"$bin" simulate "$examples/evening-bulk.lua" --snapshot "$examples/sample.ron" \
    --at "2026-11-23 20:00" > /dev/null

# The man pages as a reader sees them: no Markdown table pipes or links, and shaper(1)'s sections.
render() { MANWIDTH=80 LC_ALL=C.UTF-8 man -l "$1" 2> /dev/null | col -b; }
for page in "$root/usr/share/man/man1/shaper.1.gz" "$root/usr/share/man/man7/shaper-policy.7.gz"; do
    text=$(render "$page")
    [ -n "$text" ] || { echo "check-deb: $page renders empty" >&2; exit 1; }
    if grep -nE '\|---|\| |\]\(#' <<<"$text"; then
        echo "check-deb: $page shows Markdown (above)" >&2
        exit 1
    fi
done
# Rendered once into a variable: `render | grep -q` fails under pipefail once the page is long
# enough for grep to quit before man has written it all (SIGPIPE).
manual=$(render "$root/usr/share/man/man1/shaper.1.gz")
for section in 'EXIT STATUS' ENVIRONMENT FILES; do
    grep -q "^$section\$" <<<"$manual" \
        || { echo "check-deb: shaper(1) has no $section section" >&2; exit 1; }
done

if command -v systemd-analyze > /dev/null; then
    # The postinst would start the daemon: deny service starts (policy-rc.d, as in chroots) while
    # the package is installed for this check.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -rf "$root" "$control" /usr/sbin/policy-rc.d' EXIT
    fi
    dpkg -i "$deb" > /dev/null
    status=0
    systemd-analyze verify /usr/lib/systemd/system/shaper.service || status=$?
    # Enabled on install: deb-systemd-helper made the WantedBy= link (with or without systemd up).
    if [ ! -L /etc/systemd/system/multi-user.target.wants/shaper.service ]; then
        echo "check-deb: installing did not enable shaper.service" >&2
        status=1
    fi
    dpkg --purge shaper > /dev/null
    if [ -L /etc/systemd/system/multi-user.target.wants/shaper.service ]; then
        echo "check-deb: purging left shaper.service enabled" >&2
        status=1
    fi
    [ "$status" -eq 0 ] || { echo "check-deb: the installed package failed (above)" >&2; exit 1; }
fi
echo "check-deb: $deb is complete"
