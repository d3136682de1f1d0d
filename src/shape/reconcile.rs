//! Reconcile (pure): what is installed + what is desired → the operations between them, in an
//! order the kernel accepts: filters that go away are removed before the classes they point to,
//! parents are added before children and deleted after them. Every operation prints as the
//! equivalent `tc` or `ip` command.

use std::fmt;

use serde::Serialize;

use super::model::{
    BUCKETS, Class, ClassId, DeviceTree, Direction, Family, Filter, FilterHandle, Leaf, MAJOR,
    rate_text,
};

/// One change to the kernel. `dev` is an interface name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Op {
    /// `ip link add NAME type ifb; ip link set NAME up`
    AddIfb {
        name: String,
    },
    /// `ip link del NAME`
    DeleteIfb {
        name: String,
    },
    /// `tc qdisc add dev DEV root handle 5a: htb default MINOR`, and the two hash tables with
    /// their link filters (one u32 filter per family, keyed on the local port's low byte).
    AddRoot {
        dev: String,
        direction: Direction,
        default_minor: u16,
    },
    /// `tc qdisc del dev DEV root`: removes every class and filter under it.
    DeleteRoot {
        dev: String,
    },
    /// `tc qdisc add dev DEV ingress` and the filter redirecting all of it to the IFB.
    AddIngress {
        dev: String,
        ifb: String,
    },
    /// `tc qdisc del dev DEV ingress`
    DeleteIngress {
        dev: String,
    },
    AddClass {
        dev: String,
        minor: u16,
        class: Class,
    },
    ChangeClass {
        dev: String,
        minor: u16,
        class: Class,
    },
    DeleteClass {
        dev: String,
        minor: u16,
    },
    AddLeaf {
        dev: String,
        parent: u16,
        leaf: Leaf,
    },
    AddFilter {
        dev: String,
        handle: u32,
        filter: Filter,
    },
    DeleteFilter {
        dev: String,
        handle: u32,
        family: Family,
    },
}

fn class_args(class: &Class) -> String {
    format!(
        "htb rate {} ceil {} burst {}b cburst {}b quantum {} prio {}",
        rate_text(class.rate),
        rate_text(class.ceil),
        class.burst,
        class.cburst,
        class.quantum,
        class.prio
    )
}

/// Bytes as tc writes an action cookie.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parent_id(parent: u16) -> String {
    if parent == 0 {
        format!("{:x}:", MAJOR)
    } else {
        ClassId(MAJOR, parent).to_string()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddIfb { name } => {
                write!(f, "ip link add {name} type ifb && ip link set {name} up")
            }
            Op::DeleteIfb { name } => write!(f, "ip link del {name}"),
            Op::AddRoot {
                dev,
                direction,
                default_minor,
            } => {
                writeln!(
                    f,
                    "tc qdisc add dev {dev} root handle {:x}: htb default {default_minor:x}",
                    MAJOR
                )?;
                let (at_mask, which) = match direction {
                    Direction::Upload => ("0x00ff0000", "sport"),
                    Direction::Download => ("0x000000ff", "dport"),
                };
                for family in [Family::V4, Family::V6] {
                    let p = family.prio();
                    let proto = family.tc_name();
                    writeln!(
                        f,
                        "tc filter add dev {dev} parent {:x}: prio {p} protocol {proto} handle {:x}: u32 divisor {BUCKETS}",
                        MAJOR,
                        family.htid()
                    )?;
                    write!(
                        f,
                        "tc filter add dev {dev} parent {:x}: prio {p} protocol {proto} u32 link {:x}: hashkey mask {at_mask} at {} match u32 0 0  # bucket = low byte of {which}",
                        MAJOR,
                        family.htid(),
                        family.ports_offset()
                    )?;
                    if family == Family::V4 {
                        writeln!(f)?;
                    }
                }
                Ok(())
            }
            Op::DeleteRoot { dev } => write!(f, "tc qdisc del dev {dev} root"),
            Op::AddIngress { dev, ifb } => write!(
                f,
                "tc qdisc add dev {dev} ingress\ntc filter add dev {dev} parent ffff: prio {} protocol all u32 match u32 0 0 action mirred egress redirect dev {ifb} cookie {}",
                super::codec::REDIRECT_PREF,
                hex(super::codec::REDIRECT_COOKIE)
            ),
            Op::DeleteIngress { dev } => write!(f, "tc qdisc del dev {dev} ingress"),
            Op::AddClass { dev, minor, class } | Op::ChangeClass { dev, minor, class } => {
                let verb = if matches!(self, Op::AddClass { .. }) {
                    "add"
                } else {
                    "change"
                };
                write!(
                    f,
                    "tc class {verb} dev {dev} parent {} classid {} {}  # {}",
                    parent_id(class.parent),
                    ClassId(MAJOR, *minor),
                    class_args(class),
                    class.label
                )
            }
            Op::DeleteClass { dev, minor } => {
                write!(
                    f,
                    "tc class del dev {dev} classid {}",
                    ClassId(MAJOR, *minor)
                )
            }
            Op::AddLeaf { dev, parent, leaf } => {
                write!(
                    f,
                    "tc qdisc replace dev {dev} parent {} ",
                    ClassId(MAJOR, *parent)
                )?;
                match leaf {
                    Leaf::FqCodel => write!(f, "fq_codel"),
                    Leaf::Pfifo { limit } => write!(f, "pfifo limit {limit}"),
                }
            }
            Op::AddFilter {
                dev,
                handle,
                filter,
            } => {
                let h = FilterHandle(*handle);
                write!(
                    f,
                    "tc filter add dev {dev} parent {:x}: prio {} protocol {} handle {h} u32 ht {:x}:{:x}:",
                    MAJOR,
                    filter.family.prio(),
                    filter.family.tc_name(),
                    handle >> 20,
                    (handle >> 12) & 0xff
                )?;
                for k in &filter.keys {
                    write!(
                        f,
                        " match u32 0x{:08x} 0x{:08x} at {}",
                        k.val, k.mask, k.off
                    )?;
                }
                write!(f, " flowid {}", ClassId(MAJOR, filter.class))
            }
            Op::DeleteFilter {
                dev,
                handle,
                family,
            } => write!(
                f,
                "tc filter del dev {dev} parent {:x}: prio {} protocol {} handle {} u32",
                MAJOR,
                family.prio(),
                family.tc_name(),
                FilterHandle(*handle)
            ),
        }
    }
}

/// An ordered list of operations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub ops: Vec<Op>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for op in &self.ops {
            writeln!(f, "{op}")?;
        }
        Ok(())
    }
}

/// Depth of a class below the root (parents first when sorted by it).
fn depth(tree: &DeviceTree, mut minor: u16) -> usize {
    let mut d = 0;
    while let Some(c) = tree.classes.get(&minor) {
        if c.parent == 0 || d > 16 {
            break;
        }
        minor = c.parent;
        d += 1;
    }
    d
}

/// The operations turning `installed` into `desired` on one device. `installed = None` means
/// the device has no shaper tree yet: everything is added, root first. Steps 1-4 below: filters
/// removed, classes removed (deepest first), classes added or changed (parents first) with
/// their leaves, filters added.
pub fn reconcile_device(
    dev: &str,
    direction: Direction,
    desired: &DeviceTree,
    installed: Option<&DeviceTree>,
) -> Vec<Op> {
    let empty = DeviceTree::default();
    let mut ops = Vec::new();
    // HTB cannot change its default class in place (the kernel refuses a change of the root),
    // and a tree whose hash tables are missing is unusable: both are rebuilt from scratch.
    let installed = match installed {
        Some(tree) if tree.default_minor != desired.default_minor => {
            ops.push(Op::DeleteRoot { dev: dev.into() });
            None
        }
        other => other,
    };
    let have = match installed {
        Some(tree) => tree,
        None => {
            ops.push(Op::AddRoot {
                dev: dev.into(),
                direction,
                default_minor: desired.default_minor,
            });
            &empty
        }
    };
    // Classes whose parent changed cannot be changed in place: delete and re-add.
    let moved: Vec<u16> = desired
        .classes
        .iter()
        .filter(|(m, c)| have.classes.get(m).is_some_and(|h| h.parent != c.parent))
        .map(|(m, _)| *m)
        .collect();
    let gone = |m: &u16| !desired.classes.contains_key(m) || moved.contains(m);

    // 1. Filters that are gone or differ, and filters pointing at classes about to go.
    for (handle, filter) in &have.filters {
        let keep = desired.filters.get(handle) == Some(filter) && !gone(&filter.class);
        if !keep {
            ops.push(Op::DeleteFilter {
                dev: dev.into(),
                handle: *handle,
                family: filter.family,
            });
        }
    }
    // 2. Classes (and their leaves) that are gone or moved, deepest first.
    let mut deletions: Vec<u16> = have.classes.keys().copied().filter(|m| gone(m)).collect();
    deletions.sort_by_key(|m| std::cmp::Reverse(depth(have, *m)));
    for minor in deletions {
        ops.push(Op::DeleteClass {
            dev: dev.into(),
            minor,
        });
    }
    // 3. Classes to add or change, parents first; leaves for new leaf classes.
    let mut wanted: Vec<(&u16, &Class)> = desired.classes.iter().collect();
    wanted.sort_by_key(|(m, _)| depth(desired, **m));
    for (minor, class) in wanted {
        match have.classes.get(minor) {
            Some(h) if !moved.contains(minor) => {
                if !h.same_params(class) {
                    ops.push(Op::ChangeClass {
                        dev: dev.into(),
                        minor: *minor,
                        class: class.clone(),
                    });
                }
            }
            _ => ops.push(Op::AddClass {
                dev: dev.into(),
                minor: *minor,
                class: class.clone(),
            }),
        }
    }
    for (parent, leaf) in &desired.leaves {
        let fresh = !have.classes.contains_key(parent) || moved.contains(parent);
        if fresh || have.leaves.get(parent) != Some(leaf) {
            ops.push(Op::AddLeaf {
                dev: dev.into(),
                parent: *parent,
                leaf: *leaf,
            });
        }
    }
    // 4. New and changed filters, once their classes exist.
    for (handle, filter) in &desired.filters {
        let same = have.filters.get(handle) == Some(filter) && !gone(&filter.class);
        if !same {
            ops.push(Op::AddFilter {
                dev: dev.into(),
                handle: *handle,
                filter: filter.clone(),
            });
        }
    }
    ops
}
