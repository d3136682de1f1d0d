//! The shaping tree as plain data: what should be (or is) installed on one device.
//!
//! Both the planner's output and the executor's dump of the kernel use these types, so
//! reconciling is a comparison of two values.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// shaper's qdisc major number on every device it shapes (`5a:`). Objects under it are shaper's;
/// a root qdisc with another handle belongs to someone else.
pub const MAJOR: u16 = 0x5a;
/// The class for the whole link, parent of every policy class.
pub const LINK_MINOR: u16 = 1;
/// First minor handed out to classes and leaves.
pub const FIRST_MINOR: u16 = 0x10;
/// u32 hash-table ids (12 bits) for IPv4 and IPv6 connection filters.
pub const HT_V4: u32 = 0x10;
pub const HT_V6: u32 = 0x11;
/// u32 filter priorities: one filter chain per protocol.
pub const PRIO_V4: u16 = 10;
pub const PRIO_V6: u16 = 11;
/// Buckets of each hash table: the low byte of the local port selects one.
pub const BUCKETS: u32 = 256;

/// Which way traffic flows through a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Egress of the shaped interface: the local address is the source.
    Upload,
    /// Egress of the IFB fed by the interface's ingress: the local address is the destination.
    Download,
}

/// IP family of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn prio(self) -> u16 {
        match self {
            Family::V4 => PRIO_V4,
            Family::V6 => PRIO_V6,
        }
    }
    pub fn htid(self) -> u32 {
        match self {
            Family::V4 => HT_V4,
            Family::V6 => HT_V6,
        }
    }
    /// The ethertype tc calls `protocol ip` / `protocol ipv6`.
    pub fn ethertype(self) -> u16 {
        match self {
            Family::V4 => 0x0800,
            Family::V6 => 0x86dd,
        }
    }
    pub fn tc_name(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ipv6",
        }
    }
    /// Offset of the word holding both ports, from the network header (no IPv4 options, no IPv6
    /// extension headers, as tc's own `match ip dport` assumes).
    pub fn ports_offset(self) -> i32 {
        match self {
            Family::V4 => 20,
            Family::V6 => 40,
        }
    }
}

/// An HTB class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Class {
    /// Parent minor (0 = directly under the root qdisc).
    pub parent: u16,
    /// Guaranteed rate and maximum rate, bits per second.
    pub rate: u64,
    pub ceil: u64,
    /// Bytes that may be sent at full speed after an idle period, for rate and ceil.
    pub burst: u32,
    pub cburst: u32,
    /// Bytes served per round among classes of the same priority.
    pub quantum: u32,
    pub prio: u8,
    /// How the link below counts each packet's bytes (overhead, minimum size, ATM cells).
    pub framing: Framing,
    /// What the class is, for people: `bulk`, `bulk/shared`, `bulk/pid 1234`, `tcp …`.
    #[serde(skip)]
    pub label: String,
}

impl Class {
    /// Whether the kernel parameters are the same (labels are not installed).
    pub fn same_params(&self, other: &Class) -> bool {
        self.parent == other.parent
            && self.rate == other.rate
            && self.ceil == other.ceil
            && self.burst == other.burst
            && self.cburst == other.cburst
            && self.quantum == other.quantum
            && self.prio == other.prio
            && self.framing == other.framing
    }
}

/// Link-layer compensation, as sqm-scripts offers it: what each packet costs on the line below
/// the shaped interface (a DSL modem's PPPoE and ATM framing, a cable modem's DOCSIS header), so
/// a limit just under the line's rate keeps the queue in shaper rather than in the modem. Applied
/// to every HTB rate (the kernel's `tc_ratespec`: `overhead`, `mpu`, `linklayer`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Framing {
    /// Bytes added to every packet (beyond the Ethernet header the kernel already counts).
    pub overhead: u16,
    /// The smallest size a packet is counted as, overhead included.
    pub mpu: u16,
    pub link_layer: LinkLayer,
}

pub use crate::config::LinkLayer;

/// The qdisc under a leaf class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Leaf {
    FqCodel,
    /// A FIFO of this many packets (what shaper installed before queues were sized in bytes;
    /// read back from older trees and replaced).
    Pfifo {
        limit: u32,
    },
    /// A FIFO of this many bytes.
    Bfifo {
        limit: u32,
    },
    /// A token bucket that never limits (`rate`, bits per second, far above the class's ceiling)
    /// but whose bucket of `burst` bytes, one packet, makes it split every larger GSO/GRO
    /// packet into its segments; the segments queue in a FIFO of `limit` bytes.
    Tbf {
        rate: u64,
        burst: u32,
        limit: u32,
    },
}

/// One 32-bit match of a u32 filter: `(packet word at off) & mask == val`, in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Key {
    pub off: i32,
    pub val: u32,
    pub mask: u32,
}

/// A u32 filter putting one connection's packets into a class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filter {
    pub family: Family,
    pub keys: Vec<Key>,
    /// Minor of the class the packets go to.
    pub class: u16,
}

/// Everything shaper installs on one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceTree {
    /// Minor of the class unmatched traffic goes to (HTB's `default`).
    pub default_minor: u16,
    pub classes: BTreeMap<u16, Class>,
    /// Leaf qdiscs, by the minor of their parent class.
    pub leaves: BTreeMap<u16, Leaf>,
    /// Connection filters, by u32 handle (`htid:bucket:node`).
    pub filters: BTreeMap<u32, Filter>,
}

/// A `major:minor` handle printed the way tc prints it.
pub struct ClassId(pub u16, pub u16);

impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{:x}", self.0, self.1)
    }
}

/// `htid:bucket:node` of a u32 filter handle, as tc prints it.
pub struct FilterHandle(pub u32);

impl fmt::Display for FilterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.0;
        write!(f, "{:x}:{:x}:{:x}", h >> 20, (h >> 12) & 0xff, h & 0xfff)
    }
}

/// A u32 filter handle from its parts.
pub fn filter_handle(htid: u32, bucket: u32, node: u32) -> u32 {
    (htid << 20) | ((bucket & 0xff) << 12) | (node & 0xfff)
}

/// A rate the way tc prints it (`2Mbit`-style figures in shaper's lower-case units).
pub fn rate_text(bits: u64) -> String {
    crate::units::Rate::from_bits_per_sec(bits).to_string()
}
