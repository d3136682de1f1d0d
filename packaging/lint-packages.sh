#!/usr/bin/env bash
# Lints the built packages as the distributions' packagers do: lintian for the .deb, rpmlint for
# the .rpm. Errors and warnings fail; whatever is accepted is listed, each with its reason, in
# packaging/debian/lintian-overrides (shipped in the .deb, as lintian reads it) and
# packaging/rpmlint.toml. (namcap, Arch's, is not packaged outside Arch; build-arch.sh checks
# the Arch package's contents instead.)
#
#     packaging/lint-packages.sh target/shaper.deb target/shaper.rpm
#
# Needs the lintian and rpmlint packages (Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$1
rpm=$2

# --fail-on warning also fails on errors; pedantic and informational tags are shown, not fatal.
lintian --fail-on error,warning --display-info --tag-display-limit 0 "$deb"
echo "lint-packages: lintian: $deb has no errors or warnings"

# rpmlint also judges the file's name: linted under the name a repository gives it
# (NAME-VERSION-RELEASE.ARCH.rpm), whatever the build called it.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
named="$tmp/$(rpm -qp --qf '%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm' "$rpm")"
cp "$rpm" "$named"
out=$(rpmlint --config packaging/rpmlint.toml "$named" 2>&1) || {
    echo "$out" >&2
    echo "lint-packages: rpmlint failed on $rpm" >&2
    exit 1
}
echo "$out"
summary=$(grep -E '[0-9]+ errors?, [0-9]+ warnings?' <<<"$out" | tail -n 1)
if ! grep -qE ' 0 errors, 0 warnings' <<<"$summary"; then
    echo "lint-packages: rpmlint: $summary" >&2
    exit 1
fi
echo "lint-packages: rpmlint: $rpm has no errors or warnings"
