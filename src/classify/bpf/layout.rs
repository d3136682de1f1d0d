//! The `#[repr(C)]` structs the daemon shares with `bpf/shaper.bpf.c`, checked field by field
//! (name, offset, size) against the C structs as the compiler laid them out.
//!
//! Why a check against the committed object's BTF rather than structs generated from the C:
//! generating them (bindgen) would need libclang on every machine that runs `cargo build`, and
//! the README promises a build with the Rust toolchain alone. The object already carries the C
//! compiler's own record of every struct (its BTF, which the kernel needs anyway), and CI's
//! `bpf/build.sh --check` proves the committed object is what the current source builds to. So
//! source → object (CI) → BTF → this test (`cargo test`) is one unbroken chain with no new tool:
//! adding, removing, reordering, renaming or resizing a field on either side fails it, and a
//! Rust field added without being listed here stops the test compiling.
//!
//! aya parses BTF but keeps its members private, so the few lines of ELF and BTF reading the
//! check needs are here.

use std::collections::HashMap;
use std::mem::offset_of;

use super::{OBJECT, RawClasses, RawClose, RawCounters, RawEvent, RawExec, RawReportStats};

/// One field: its name, byte offset and size in bytes.
type Field = (String, usize, usize);

/// A struct's size and fields in declaration order.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    size: usize,
    fields: Vec<Field>,
}

fn size_of_field<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// The layout of a Rust struct, from the compiler (`offset_of!`, `size_of`). Lists every field:
/// the pattern without `..` stops compiling when the struct gains a field not listed (rustc then
/// says "pattern requires `..` due to inaccessible fields": list the field, do not add `..`).
macro_rules! rust_layout {
    ($ty:ident { $($field:ident),* $(,)? }) => {{
        let _every_field = |v: $ty| {
            let $ty { $($field: _),* } = v;
        };
        Layout {
            size: size_of::<$ty>(),
            fields: vec![$((
                stringify!($field).to_owned(),
                offset_of!($ty, $field),
                size_of_field(|v: &$ty| &v.$field),
            )),*],
        }
    }};
}

/// Every struct shared with the programs: the C name and the Rust layout.
fn shared() -> Vec<(&'static str, Layout)> {
    vec![
        ("classes", rust_layout!(RawClasses { up, down })),
        ("counters", rust_layout!(RawCounters { up, down })),
        (
            "event",
            rust_layout!(RawEvent {
                cookie,
                cgroup_id,
                ktime_ns,
                tgid,
                uid,
                comm,
                local_ip,
                remote_ip,
                local_port,
                remote_port,
                family,
                protocol,
                ingress,
            }),
        ),
        (
            "exec_event",
            rust_layout!(RawExec {
                ktime_ns,
                tgid,
                _pad
            }),
        ),
        (
            "close_event",
            rust_layout!(RawClose {
                cookie,
                cgroup_id,
                up,
                down,
                tgid,
                uid,
                class_up,
                class_down,
                comm,
                protocol,
                _pad,
            }),
        ),
        (
            "report_stats",
            rust_layout!(RawReportStats {
                deferred,
                lost,
                exec_lost,
                close_lost,
                close_lost_up,
                close_lost_down,
            }),
        ),
    ]
}

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap()).into()
}

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

fn u64_at(b: &[u8], at: usize) -> usize {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize
}

fn c_str(b: &[u8], at: usize) -> String {
    let end = b[at..].iter().position(|&c| c == 0).unwrap() + at;
    String::from_utf8(b[at..end].to_vec()).unwrap()
}

/// The contents of the ELF64 (little-endian, as `-target bpf` on x86 and arm64 writes) section
/// with this name.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> &'a [u8] {
    assert_eq!(
        &elf[..6],
        b"\x7fELF\x02\x01",
        "a 64-bit little-endian ELF file"
    );
    let (shoff, shentsize) = (u64_at(elf, 0x28), u16_at(elf, 0x3a));
    let (shnum, shstrndx) = (u16_at(elf, 0x3c), u16_at(elf, 0x3e));
    let header = |i: usize| &elf[shoff + i * shentsize..][..shentsize];
    let names_at = u64_at(header(shstrndx), 0x18);
    (0..shnum)
        .map(header)
        .find(|h| c_str(elf, names_at + u32_at(h, 0)) == name)
        .map(|h| &elf[u64_at(h, 0x18)..][..u64_at(h, 0x20)])
        .unwrap_or_else(|| panic!("no section {name} in bpf/shaper.bpf.o"))
}

/// A BTF type: kind, name, size or referenced type, and its trailing records.
struct BtfType {
    kind: usize,
    kflag: bool,
    name: String,
    size_or_type: usize,
    extra: Vec<u8>,
}

const INT: usize = 1;
const PTR: usize = 2;
const ARRAY: usize = 3;
const STRUCT: usize = 4;
const UNION: usize = 5;
const ENUM: usize = 6;
const TYPEDEF: usize = 8;
const VOLATILE: usize = 9;
const CONST: usize = 10;
const RESTRICT: usize = 11;
const FUNC_PROTO: usize = 13;
const VAR: usize = 14;
const DATASEC: usize = 15;
const DECL_TAG: usize = 17;
const ENUM64: usize = 19;

/// Every type of a `.BTF` section, indexed by type id (id 0 is `void`).
fn btf_types(btf: &[u8]) -> Vec<BtfType> {
    assert_eq!(u16_at(btf, 0), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(btf, 4);
    let (type_off, type_len) = (u32_at(btf, 8), u32_at(btf, 12));
    let str_off = u32_at(btf, 16);
    let strings = &btf[hdr_len + str_off..];
    let mut types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
    let mut out = vec![BtfType {
        kind: 0,
        kflag: false,
        name: String::new(),
        size_or_type: 0,
        extra: Vec::new(),
    }];
    while !types.is_empty() {
        let info = u32_at(types, 4);
        let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
        // The records after the 12-byte header, by kind (linux/btf.h).
        let extra = match kind {
            INT | VAR | DECL_TAG => 4,
            ARRAY => 12,                                    // struct btf_array
            STRUCT | UNION | DATASEC | ENUM64 => 12 * vlen, // members, var_secinfos, values
            ENUM | FUNC_PROTO => 8 * vlen,                  // values, params
            _ => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        };
        out.push(BtfType {
            kind,
            kflag: info >> 31 == 1,
            name: c_str(strings, u32_at(types, 0)),
            size_or_type: u32_at(types, 8),
            extra: types[12..12 + extra].to_vec(),
        });
        types = &types[12 + extra..];
    }
    out
}

/// A type's size in bytes, through typedefs, qualifiers and arrays.
fn btf_size(types: &[BtfType], id: usize) -> usize {
    let t = &types[id];
    match t.kind {
        INT | STRUCT | UNION | ENUM | ENUM64 => t.size_or_type,
        PTR => 8,
        TYPEDEF | VOLATILE | CONST | RESTRICT => btf_size(types, t.size_or_type),
        ARRAY => btf_size(types, u32_at(&t.extra, 0)) * u32_at(&t.extra, 8),
        kind => panic!("no size for BTF kind {kind} (type {id})"),
    }
}

/// The layouts of the object's named structs.
fn c_layouts(btf: &[u8]) -> HashMap<String, Layout> {
    let types = btf_types(btf);
    let strings = &btf[u32_at(btf, 4) + u32_at(btf, 16)..];
    types
        .iter()
        .filter(|t| t.kind == STRUCT && !t.name.is_empty())
        .map(|t| {
            let fields = t
                .extra
                .chunks_exact(12)
                .map(|m| {
                    let bits = u32_at(m, 8);
                    // With kflag the top byte is a bitfield's width; none are shared.
                    let (bit_offset, width) = if t.kflag {
                        (bits & 0xff_ffff, bits >> 24)
                    } else {
                        (bits, 0)
                    };
                    assert!(width == 0 && bit_offset % 8 == 0, "{}: a bitfield", t.name);
                    (
                        c_str(strings, u32_at(m, 0)),
                        bit_offset / 8,
                        btf_size(&types, u32_at(m, 4)),
                    )
                })
                .collect();
            let layout = Layout {
                size: t.size_or_type,
                fields,
            };
            (t.name.clone(), layout)
        })
        .collect()
}

#[test]
fn shared_structs_match_the_c_structs_field_by_field() {
    let c = c_layouts(elf_section(OBJECT, ".BTF"));
    for (name, rust) in shared() {
        let c = c
            .get(name)
            .unwrap_or_else(|| panic!("struct {name} is not in bpf/shaper.bpf.o's BTF"));
        assert_eq!(
            &rust, c,
            "the Rust copy (left) of struct {name} in bpf/shaper.bpf.c (right) differs: \
             change both, and rebuild the object with bpf/build.sh"
        );
    }
}

#[test]
fn the_check_reads_every_field_of_the_c_structs() {
    // The reader itself: a struct it reads wrongly would make the check above vacuous or fail it
    // for the wrong reason. `struct owner` is C-only (socket storage), so it checks the reader
    // on a struct no Rust copy was written from.
    let c = c_layouts(elf_section(OBJECT, ".BTF"));
    let owner = Layout {
        size: 56,
        fields: [
            ("cookie", 0, 8),
            ("cgroup_id", 8, 8),
            ("tgid", 16, 4),
            ("uid", 20, 4),
            ("flags", 24, 4),
            ("_pad", 28, 4),
            ("comm", 32, 16),
            ("created_ns", 48, 8),
        ]
        .map(|(n, o, s)| (n.to_owned(), o, s))
        .to_vec(),
    };
    assert_eq!(
        c["owner"], owner,
        "struct owner as shaper.bpf.c declares it"
    );
}
