#!/usr/bin/env bash
# Checks a built shaper .rpm: its file list and its configuration files (marked noreplace so an
# upgrade keeps the user's edits).
set -euo pipefail
rpm_file=${1:?usage: check-rpm.sh PACKAGE.rpm}
files=$(rpm -qlp "$rpm_file")
for f in /usr/bin/shaper /usr/lib/systemd/system/shaper.service /etc/shaper/policy.lua \
         /etc/shaper/shaper.ron /usr/share/shaper/lua/shaper.lua /usr/share/shaper/lua/meta.lua \
         /usr/share/doc/shaper/examples/priorities.lua /usr/share/man/man1/shaper.1 \
         /usr/share/man/man7/shaper-policy.7 /usr/share/bash-completion/completions/shaper \
         /usr/share/zsh/site-functions/_shaper /usr/share/fish/vendor_completions.d/shaper.fish; do
    grep -qx -- "$f" <<<"$files" || { echo "check-rpm: $f is missing from $rpm_file" >&2; exit 1; }
done
config=$(rpm -qp --configfiles "$rpm_file")
for f in /etc/shaper/policy.lua /etc/shaper/shaper.ron; do
    grep -qx "$f" <<<"$config" || { echo "check-rpm: $f is not a config file" >&2; exit 1; }
done
echo "check-rpm: $rpm_file is complete"
