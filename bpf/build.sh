#!/bin/sh
# Builds bpf/shaper.bpf.o from bpf/shaper.bpf.c. The object is committed, so `cargo build` needs
# no C toolchain; CI runs `bpf/build.sh --check` to fail when the committed object differs from
# what the source builds to.
#
# Needs (Debian/Ubuntu): clang (14 is what the committed object was built with), llvm
# (llvm-strip), libbpf-dev (bpf_helpers.h), linux-libc-dev (linux/bpf.h).
# The flags are fixed and paths are mapped away, so the output is byte-for-byte reproducible
# with the same clang and headers.
set -eu
dir=$(cd "$(dirname "$0")" && pwd)
clang=${CLANG:-clang}
strip=${LLVM_STRIP:-llvm-strip}
out="$dir/shaper.bpf.o"
if [ "${1:-}" = "--check" ]; then
    out=$(mktemp --suffix=.bpf.o)
    trap 'rm -f "$out"' EXIT
fi
arch_include=/usr/include/$(uname -m)-linux-gnu
# From inside the folder, so the compilation directory recorded in BTF is the mapped one too and
# the object does not depend on where the checkout (or the caller) is.
cd "$dir"
# -g: BTF, which socket-storage maps and the ring buffer need; -mcpu=v3: atomic fetch-or.
"$clang" -target bpf -mcpu=v3 -O2 -g -Wall -Werror \
    -fdebug-prefix-map="$dir"=. -fno-ident \
    -I"$arch_include" \
    -c shaper.bpf.c -o "$out"
# Keep BTF (.BTF, .BTF.ext), drop DWARF: smaller, and no build paths or file names in it.
"$strip" --strip-debug "$out"
if [ "${1:-}" = "--check" ]; then
    if ! cmp -s "$out" "$dir/shaper.bpf.o"; then
        echo "bpf/shaper.bpf.o is stale: run bpf/build.sh and commit the result" >&2
        exit 1
    fi
    echo "bpf/shaper.bpf.o matches bpf/shaper.bpf.c"
fi
