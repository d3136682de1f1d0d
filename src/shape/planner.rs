//! The planner: decisions and classes → the trees that should be installed (pure).
//!
//! Layout on each device (the interface for upload, its IFB for download), with handles under
//! shaper's major `5a:`:
//!
//! ```text
//! 5a:      HTB root, default → the `default` class's shared leaf
//! └ 5a:1   the link (uplink/downlink capacity, or unlimited)
//!   ├ 5a:C       one inner class per policy class (guaranteed rate, ceiling, priority)
//!   │ ├ 5a:S     its shared leaf: every connection of the class without a leaf of its own
//!   │ ├ 5a:P     one leaf per process when the class says `each = "process"`
//!   │ └ 5a:N     one leaf per connection (`each = "connection"`, or a limit from classify)
//!   └ …
//! ```
//!
//! Connections reach their leaf through u32 filters in two 256-bucket hash tables (IPv4, IPv6)
//! keyed by the low byte of the local port, so a packet is compared with the few connections of
//! its bucket rather than all of them. Connections of the `default` class without a leaf of
//! their own need no filter: unmatched traffic goes to `default` anyway.
//!
//! Handles are stable: a class, process or connection keeps its minor for as long as it exists
//! ([`Handles`]), so a changed limit becomes a `tc class change`, not a rebuild.

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use super::model::{
    BUCKETS, Class, DeviceTree, Direction, FIRST_MINOR, Family, Filter, Framing, Key, LINK_MINOR,
    Leaf, filter_handle,
};
use crate::policy::{ClassSet, Decision, Each};
use crate::process::{Connection, Pid};
use crate::scan::SocketKey;
use crate::units::{Rate, RatePair};

/// The link rate assumed when none is configured: high enough never to be the bottleneck.
pub const UNLIMITED: u64 = 100_000_000_000;
/// The smallest guaranteed rate of a class or leaf, bits per second (the floor users may write).
pub const MIN_RATE: u64 = Rate::MIN.bits_per_sec();
/// The largest rate installed, bits per second: parsing refuses more, and this clamp keeps any
/// other path from reaching rates whose burst would round to zero ticks.
pub const MAX_RATE: u64 = Rate::MAX.bits_per_sec();
/// The largest minor handed out (0xffff is HTB's "none").
const MAX_MINOR: u16 = 0xfffe;
/// Nodes per hash bucket (12 bits of the filter handle).
const MAX_NODE: u32 = 0xfff;

/// Link capacity per direction; `None` = unknown (no link-wide limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capacity {
    pub up: Option<Rate>,
    pub down: Option<Rate>,
    /// How the line counts packets, applied to every class's rates.
    pub framing: Framing,
}

/// Flow buckets per class where the kernel has no fq_codel: the class's connections without a
/// leaf of their own are spread over this many sibling leaves, which HTB serves round-robin, so
/// a sparse flow waits for at most one packet of each bulk flow instead of a whole queue.
/// Eight keep the first seven connections of a class apart (bucket 0 also takes traffic no
/// filter matched) for nine minors a class.
pub const FLOW_BUCKETS: usize = 8;
/// How long a leaf's queue may be at its ceiling, milliseconds: enough for TCP to keep a class
/// busy, short enough not to be felt.
pub const QUEUE_MS: u64 = 25;
/// A leaf's queue holds at least this many full-size packets, so TCP keeps its goodput at the
/// lowest rates: a 64 KB GSO packet becomes some 40 segments at once, and with room for four
/// a 2 Mbit/s upload measured 77 % of its limit, with six 96 %. Eight are 100 ms at 1 Mbit/s,
/// a delay only the flow filling the queue sees (others wait in their own bucket).
const QUEUE_MIN_PACKETS: u32 = 8;
/// The largest leaf queue, bytes (33 ms at 1 Gbit/s).
const QUEUE_MAX_BYTES: u64 = 4 << 20;
/// The token-bucket leaf's rate, bits per second: a hundred times the fastest ceiling it is used
/// for, so it never limits, and 800 bytes per 64 ns tick, so its one-packet bucket is a whole
/// number of ticks. Its bucket refills in about 0.1 µs: HTB dequeues a leaf's packets back to
/// back at CPU speed, and at 10 Gbit/s (1.2 µs a packet) the bucket was found empty now and
/// then, which the kernel logs once per leaf as "htb: tbf qdisc …: is non-work-conserving?".
pub const TBF_RATE: u64 = 100_000_000_000;
/// Leaves up to this ceiling get the segmenting token bucket; above it a 64 KB GSO packet lasts
/// under 0.6 ms and a byte FIFO is enough.
pub const TBF_MAX_CEIL: u64 = 1_000_000_000;
/// Bytes a packet may carry beyond the device's MTU: the Ethernet header, VLAN tags, and room.
const HEADER_ROOM: u32 = 64;
/// The MTU assumed when the device's is unknown: the largest IPv4 packet, so no packet is ever
/// too large for the token bucket (which drops what it cannot segment).
pub const UNKNOWN_MTU: u32 = 65535;

/// The kernel features the plan may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Features {
    pub fq_codel: bool,
}

/// What a minor is allocated to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Slot {
    Class(Arc<str>),
    /// The class's shared leaf; also its flow bucket 0.
    Shared(Arc<str>),
    /// Flow bucket 1.. of a class.
    Bucket(Arc<str>, u8),
    Process(Arc<str>, Pid),
    /// The leaf a process's next connections in the class start in, made ahead of them (see
    /// [`PlanInput::by_priority`]).
    Ahead(Arc<str>, Pid),
    /// The holding leaf: where the BPF classifier holds a new process's first connections
    /// until they are decided (see [`Desired::hold`]).
    Hold,
    Connection(SocketKey),
}

/// Stable handle allocation across plans. A handle freed by one plan is reused only from the
/// plan after next, once the plan that deleted its old holder has been applied.
#[derive(Debug)]
pub struct Handles {
    minors: FxHashMap<Slot, u16>,
    next_minor: u16,
    free_minors: Vec<u16>,
    released_minors: Vec<u16>,
    nodes: FxHashMap<SocketKey, (Family, u32, u32)>,
    next_node: FxHashMap<(Family, u32), u32>,
    free_nodes: FxHashMap<(Family, u32), Vec<u32>>,
    released_nodes: Vec<(Family, u32, u32)>,
    used_minors: FxHashSet<u16>,
    used_nodes: FxHashSet<SocketKey>,
    /// The flow bucket of each connection sharing its class's leaves, and the class: a
    /// connection keeps its bucket while it stays in the class.
    buckets: FxHashMap<SocketKey, (Arc<str>, u8)>,
    /// Connections per bucket of each class, for placing new ones in the least loaded.
    bucket_load: FxHashMap<Arc<str>, [u32; FLOW_BUCKETS]>,
    used_buckets: FxHashSet<SocketKey>,
    /// Allocations the current plan was refused because a handle space ran out.
    exhausted: Exhausted,
    /// Whether running out is logged already (once, until a plan fits again).
    warned: bool,
    /// The least per-connection ceiling any plan has had, per direction (upload, download):
    /// the holding leaf's, kept once its connections are gone (until a policy reload), so the
    /// next new process whose connections the policy limits is held too.
    hold_ceil: FxHashMap<Direction, u64>,
}

/// Handles a plan needed and could not get, counted per space. What did not get one goes
/// unshaped or less finely shaped (never dropped): a class without minors is left out, so its
/// connections fall to the default class; a connection without its own leaf is shaped by its
/// class; a connection without a filter goes to the default class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exhausted {
    /// Classes and leaves refused a minor: HTB minors are 16 bits, so a device holds at most
    /// 65,519 of shaper's classes and leaves.
    pub minors: usize,
    /// Filters refused a handle, on either device: a u32 hash bucket holds at most 4,095.
    pub filters: usize,
}

impl Exhausted {
    pub fn any(&self) -> bool {
        self.minors > 0 || self.filters > 0
    }
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "out of tc handles: {} classes or leaves got no minor (HTB minors are 16 bits: at \
             most {} per interface) and {} filters none (at most {MAX_NODE} connections per \
             hash bucket, per device); those are shaped by their class or the default class",
            self.minors,
            MAX_MINOR - FIRST_MINOR + 1,
            self.filters,
        )
    }
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            minors: FxHashMap::default(),
            next_minor: FIRST_MINOR,
            free_minors: Vec::new(),
            released_minors: Vec::new(),
            nodes: FxHashMap::default(),
            next_node: FxHashMap::default(),
            free_nodes: FxHashMap::default(),
            released_nodes: Vec::new(),
            used_minors: FxHashSet::default(),
            used_nodes: FxHashSet::default(),
            buckets: FxHashMap::default(),
            bucket_load: FxHashMap::default(),
            used_buckets: FxHashSet::default(),
            exhausted: Exhausted::default(),
            warned: false,
            hold_ceil: FxHashMap::default(),
        }
    }
}

impl Handles {
    fn begin(&mut self) {
        self.free_minors.append(&mut self.released_minors);
        for (family, bucket, node) in self.released_nodes.drain(..) {
            self.free_nodes
                .entry((family, bucket))
                .or_default()
                .push(node);
        }
        self.used_minors.clear();
        self.used_nodes.clear();
        self.used_buckets.clear();
        self.exhausted = Exhausted::default();
    }

    /// What the last plan could not get: nothing unless a handle space ran out.
    pub fn exhausted(&self) -> Exhausted {
        self.exhausted
    }

    /// Forgets the per-connection limits earlier plans had, which the holding leaf keeps (see
    /// [`Desired::hold`]): a reloaded policy may no longer give them.
    pub fn forget_hold(&mut self) {
        self.hold_ceil.clear();
    }

    /// Starts the holding leaf's ceilings at `limits` (bits/s, per direction; the least of them
    /// and what is kept), before any connection was given a limit: the limits a policy returns
    /// as literals, so its first limited connection is held too.
    pub fn seed_hold(&mut self, up: Option<u64>, down: Option<u64>) {
        for (dir, limit) in [(Direction::Upload, up), (Direction::Download, down)] {
            if let Some(limit) = limit {
                let ceil = self.hold_ceil.entry(dir).or_insert(limit);
                *ceil = (*ceil).min(limit);
            }
        }
    }

    /// The policy class of each minor in the last plan (its class, shared leaf, flow buckets
    /// and process leaves; a connection's own leaf names none), for reading many classids.
    pub fn classes_by_minor(&self) -> FxHashMap<u16, &str> {
        self.minors
            .iter()
            .filter_map(|(slot, &m)| match slot {
                Slot::Class(c)
                | Slot::Shared(c)
                | Slot::Bucket(c, _)
                | Slot::Process(c, _)
                | Slot::Ahead(c, _) => Some((m, &**c)),
                Slot::Connection(_) | Slot::Hold => None,
            })
            .collect()
    }

    /// The minors of a policy class and of its shared leaf in the last plan, for `status`
    /// (the same on the interface and its IFB: one allocation serves both directions).
    pub fn class_minors(&self, class: &str) -> Option<(u16, u16)> {
        let class: Arc<str> = class.into();
        Some((
            *self.minors.get(&Slot::Class(class.clone()))?,
            *self.minors.get(&Slot::Shared(class))?,
        ))
    }

    /// The leaf a connection's packets go to in the last plan: its own, else its process's
    /// (`each = "process"`), else its flow bucket in its class (bucket 0 is the shared leaf).
    pub fn leaf_minor(&self, class: &str, pid: Option<Pid>, key: SocketKey) -> Option<u16> {
        let class: Arc<str> = class.into();
        let bucket = || match self.buckets.get(&key) {
            Some((c, b)) if *c == class && *b > 0 => {
                self.minors.get(&Slot::Bucket(class.clone(), *b))
            }
            _ => self.minors.get(&Slot::Shared(class.clone())),
        };
        self.minors
            .get(&Slot::Connection(key))
            .or_else(|| pid.and_then(|pid| self.minors.get(&Slot::Process(class.clone(), pid))))
            .or_else(bucket)
            .copied()
    }

    /// A process's own leaf (`each = "process"` classes only).
    pub fn process_minor(&self, class: &str, pid: Pid) -> Option<u16> {
        self.minors.get(&Slot::Process(class.into(), pid)).copied()
    }

    fn minor(&mut self, slot: Slot) -> Option<u16> {
        let minor = match self.minors.get(&slot) {
            Some(&m) => m,
            None => {
                let m = if let Some(m) = self.free_minors.pop() {
                    m
                } else if self.next_minor <= MAX_MINOR {
                    self.next_minor += 1;
                    self.next_minor - 1
                } else {
                    self.exhausted.minors += 1;
                    return None;
                };
                self.minors.insert(slot, m);
                m
            }
        };
        self.used_minors.insert(minor);
        Some(minor)
    }

    /// Gives a new connection (one without a leaf yet) the leaf made ahead for its process's
    /// next connections in its class, which its first packets went to: it stays in that leaf,
    /// whose queue and tokens it already holds, rather than moving to a fresh one beside it,
    /// where both would send at its limit until the first drained (1.46× its limit over its
    /// first second, measured). The process's next connections get another leaf made ahead.
    fn adopt_ahead(&mut self, key: SocketKey, class: &Arc<str>, pid: Pid) {
        let ahead = Slot::Ahead(class.clone(), pid);
        if self.minors.contains_key(&Slot::Connection(key))
            || self
                .minors
                .get(&ahead)
                .is_none_or(|m| self.used_minors.contains(m))
        {
            return;
        }
        if let Some(minor) = self.minors.remove(&ahead) {
            self.minors.insert(Slot::Connection(key), minor);
        }
    }

    /// The flow bucket of a connection in `class`: the one it had, or the least loaded one
    /// (bucket 0 counts one more, for the traffic no filter matched).
    fn bucket(&mut self, key: SocketKey, class: &Arc<str>) -> u8 {
        self.used_buckets.insert(key);
        match self.buckets.get(&key) {
            Some((c, b)) if c == class => return *b,
            Some(_) => self.unload(key),
            None => {}
        }
        let load = self.bucket_load.entry(class.clone()).or_insert_with(|| {
            let mut load = [0; FLOW_BUCKETS];
            load[0] = 1;
            load
        });
        let (bucket, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(_, n)| *n)
            .expect("FLOW_BUCKETS > 0");
        load[bucket] += 1;
        self.buckets.insert(key, (class.clone(), bucket as u8));
        bucket as u8
    }

    /// Frees the buckets of connections that are gone, before new ones are placed.
    fn forget_closed(&mut self, connections: &[Connection]) {
        let open: FxHashSet<SocketKey> = connections.iter().map(|c| c.socket.key()).collect();
        let gone: Vec<SocketKey> = self
            .buckets
            .keys()
            .filter(|k| !open.contains(*k))
            .copied()
            .collect();
        for key in gone {
            self.unload(key);
        }
    }

    fn unload(&mut self, key: SocketKey) {
        if let Some((class, bucket)) = self.buckets.remove(&key)
            && let Some(load) = self.bucket_load.get_mut(&class)
        {
            load[usize::from(bucket)] -= 1;
        }
    }

    fn node(&mut self, key: SocketKey, family: Family, bucket: u32) -> Option<u32> {
        if let Some(&(f, b, n)) = self.nodes.get(&key)
            && f == family
            && b == bucket
        {
            self.used_nodes.insert(key);
            return Some(n);
        }
        let node = match self
            .free_nodes
            .get_mut(&(family, bucket))
            .and_then(Vec::pop)
        {
            Some(n) => n,
            None => {
                let next = self.next_node.entry((family, bucket)).or_insert(1);
                if *next > MAX_NODE {
                    self.exhausted.filters += 1;
                    return None;
                }
                *next += 1;
                *next - 1
            }
        };
        if let Some(old) = self.nodes.insert(key, (family, bucket, node)) {
            self.released_nodes.push(old);
        }
        self.used_nodes.insert(key);
        Some(node)
    }

    fn end(&mut self) {
        if !self.exhausted.any() {
            self.warned = false;
        } else if !self.warned {
            self.warned = true;
            tracing::warn!("{}", self.exhausted);
        }
        let used = &self.used_minors;
        let released = &mut self.released_minors;
        self.minors.retain(|_, m| {
            let keep = used.contains(m);
            if !keep {
                released.push(*m);
            }
            keep
        });
        let gone: Vec<SocketKey> = self
            .buckets
            .keys()
            .filter(|k| !self.used_buckets.contains(*k))
            .copied()
            .collect();
        for key in gone {
            self.unload(key);
        }
        let used_nodes = &self.used_nodes;
        let released_nodes = &mut self.released_nodes;
        self.nodes.retain(|k, v| {
            let keep = used_nodes.contains(k);
            if !keep {
                released_nodes.push(*v);
            }
            keep
        });
    }
}

/// What one cycle wants installed for an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub upload: DeviceTree,
    pub download: DeviceTree,
    /// Where each connection's packets go, per direction (`None`: its class got no minor, so
    /// the default class): what the BPF classifier's maps are filled from.
    pub targets: FxHashMap<SocketKey, Targets>,
    /// The holding leaf's minor, upload and download (`None`: no holding that way). On the BPF
    /// path, once the policy has given a connection a limit of its own (or has a class with
    /// `each = "connection"` and a ceiling), a leaf as limited as the least such limit seen, where the kernel holds a socket whose process has no class
    /// yet for at most its first 100 ms: a new process's first connections are not unlimited
    /// while the fast path decides them. Its burst is two packets, not [`htb_class`]'s 64 KiB,
    /// so what it lets through before its connections move to their own leaves is small.
    pub hold: (Option<u16>, Option<u16>),
}

/// One direction's leaves for a connection: its own leaf, and the leaf its owner's next
/// connections should start in before they are seen (a per-connection leaf is the connection's
/// own, so for those this is the class's process leaf or shared leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub leaf: u16,
    pub process: u16,
    /// The connection's class blocks it: `leaf` is the class's [`BLOCK_LEAF`], which drops
    /// every packet (a classifier that can drop earlier, as a cgroup program returning 0, may).
    pub blocked: bool,
}

/// A connection's [`Target`] on the interface (upload) and on its IFB (download).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Targets {
    pub up: Option<Target>,
    pub down: Option<Target>,
}

/// Everything the planner reads.
pub struct PlanInput<'a> {
    pub classes: &'a ClassSet,
    pub connections: &'a [Connection],
    /// Parallel to `connections`.
    pub decisions: &'a [Decision],
    pub capacity: Capacity,
    pub features: Features,
    /// The shaped interface's MTU (the IFB receives its packets): the token-bucket leaves
    /// segment anything larger. [`UNKNOWN_MTU`] when it could not be read.
    pub mtu: u32,
    /// Connections are put in their leaves by the BPF classifier (`skb->priority`), which HTB
    /// honours before any filter: no per-connection u32 filters are planned. The classifier
    /// also puts a process's next connections into a leaf before they are decided
    /// ([`Target::process`]): where its connections in a class have leaves of their own (a
    /// limit per connection), that is a leaf made ahead, as limited as the most limited of
    /// them, so a new one is not unlimited for as long as deciding it takes.
    pub by_priority: bool,
}

fn dir_rate(pair: &RatePair, dir: Direction) -> Option<u64> {
    match dir {
        Direction::Upload => pair.up,
        Direction::Download => pair.down,
    }
    .map(Rate::bits_per_sec)
}

/// An HTB class with shaper's derived parameters: a burst of 2 ms at the rate but at least
/// 64 KiB, one full segmentation-offload packet, so a single GSO packet never leaves the class in
/// debt (with tc's MTU-sized default a 2 Mbit/s TCP upload measured 93.7 % goodput, with this
/// 94.6 % of a 95.6 % header-bound maximum); and an explicit quantum so small rates do not make
/// the kernel complain.
/// Rates are whole bytes per second and bursts whole ticks, as the kernel stores them.
pub fn htb_class(parent: u16, rate: u64, ceil: u64, prio: u8, label: String) -> Class {
    let ceil = ceil.clamp(MIN_RATE, MAX_RATE) / 8 * 8;
    let rate = rate.clamp(MIN_RATE, ceil) / 8 * 8;
    let burst = |bits: u64| {
        let bytes = (bits / 8 / 500).clamp(65536, 256 * 1024) as u32;
        super::codec::representable_burst(bits, bytes)
    };
    Class {
        parent,
        rate,
        ceil,
        burst: burst(rate),
        cburst: burst(ceil),
        quantum: (rate / 8 / 10).clamp(1600, 200_000) as u32,
        prio,
        framing: Framing::default(),
        label,
    }
}

/// The leaf of a blocked class: a FIFO that holds no packet, so every packet enqueued is
/// dropped (this needs no `gact` action module, which not every kernel has).
pub const BLOCK_LEAF: Leaf = Leaf::Pfifo { limit: 0 };

/// A flow bucket: an HTB leaf like [`htb_class`]'s, but with bursts of 2 ms at its rates and at
/// least two packets. Its leaf segments GSO packets, so the 64 KiB floor is not needed; and a
/// bucket that saved a large burst while its flow backed off would then be served ahead of
/// the others (measured: 4 flows sharing a class got 0.74 : 0.38 : 0.38 : 0.40 with 64 KiB
/// bursts, 0.49 : 0.47 : 0.47 : 0.47 with these).
pub fn bucket_class(parent: u16, rate: u64, ceil: u64, prio: u8, mtu: u32, label: String) -> Class {
    let class = htb_class(parent, rate, ceil, prio, label);
    let burst = |bits: u64| {
        let bytes = (bits / 8 / 500).clamp(u64::from(2 * max_packet(mtu)), 256 * 1024) as u32;
        super::codec::representable_burst(bits, bytes)
    };
    Class {
        burst: burst(class.rate),
        cburst: burst(class.ceil),
        ..class
    }
}

/// The largest packet a device with this MTU hands its qdiscs, rounded up to whole ticks of
/// [`TBF_RATE`] (800 bytes), as the token bucket stores it.
pub fn max_packet(mtu: u32) -> u32 {
    let per_tick = super::codec::tbf_bytes_per_tick();
    mtu.saturating_add(HEADER_ROOM).div_ceil(per_tick) * per_tick
}

/// The leaf qdisc for a class: fq_codel where the kernel has it; else a queue of [`QUEUE_MS`]
/// at the class's ceiling, in bytes (a queue counted in packets holds 64 KB GSO packets: one is
/// 260 ms at 2 Mbit/s). Up to [`TBF_MAX_CEIL`] it is a token bucket that splits GSO/GRO
/// packets into their segments, so the next flow waits behind one segment, not 64 KB.
pub fn leaf_for(features: Features, ceil: u64, mtu: u32) -> Leaf {
    if features.fq_codel {
        return Leaf::FqCodel;
    }
    let packet = max_packet(mtu);
    let limit = (ceil / 8 * QUEUE_MS / 1000).clamp(
        u64::from(QUEUE_MIN_PACKETS * packet),
        QUEUE_MAX_BYTES.max(u64::from(QUEUE_MIN_PACKETS * packet)),
    ) as u32;
    if ceil <= TBF_MAX_CEIL {
        Leaf::Tbf {
            rate: TBF_RATE,
            burst: packet,
            limit,
        }
    } else {
        Leaf::Bfifo { limit }
    }
}

/// The u32 keys matching one connection's packets in one direction.
pub fn filter_keys(socket: &crate::scan::Socket, dir: Direction) -> (Family, Vec<Key>) {
    let proto = u32::from(socket.proto.number());
    let (src, dst) = match dir {
        Direction::Upload => (
            Some(socket.local),
            socket.is_connected().then_some(socket.remote),
        ),
        Direction::Download => (
            socket.is_connected().then_some(socket.remote),
            Some(socket.local),
        ),
    };
    let words = |ip: std::net::IpAddr| -> Vec<u32> {
        match ip {
            std::net::IpAddr::V4(v4) => vec![u32::from(v4)],
            std::net::IpAddr::V6(v6) => v6
                .octets()
                .chunks(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    };
    let family = if socket.local.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let (proto_key, src_off, dst_off) = match family {
        Family::V4 => (
            Key {
                off: 8,
                val: proto << 16,
                mask: 0x00ff_0000,
            },
            12,
            16,
        ),
        Family::V6 => (
            Key {
                off: 4,
                val: proto << 8,
                mask: 0x0000_ff00,
            },
            8,
            24,
        ),
    };
    let mut keys = vec![proto_key];
    for (addr, off) in [(src, src_off), (dst, dst_off)] {
        if let Some(a) = addr.filter(|a| !a.ip().is_unspecified()) {
            for (i, w) in words(a.ip()).into_iter().enumerate() {
                keys.push(Key {
                    off: off + 4 * i as i32,
                    val: w,
                    mask: !0,
                });
            }
        }
    }
    let (sport, dport) = (src.map(|a| a.port()), dst.map(|a| a.port()));
    let val = (u32::from(sport.unwrap_or(0)) << 16) | u32::from(dport.unwrap_or(0));
    let mask =
        if sport.is_some() { 0xffff_0000 } else { 0 } | if dport.is_some() { 0xffff } else { 0 };
    keys.push(Key {
        off: family.ports_offset(),
        val,
        mask,
    });
    (family, keys)
}

/// The desired trees for one interface.
pub fn plan(input: &PlanInput, handles: &mut Handles) -> Desired {
    handles.begin();
    if !input.features.fq_codel {
        handles.forget_closed(input.connections);
    }
    if input.by_priority {
        for (conn, decision) in input.connections.iter().zip(input.decisions) {
            let Some(def) = input.classes.get(&decision.class) else {
                continue;
            };
            let own_leaf = def.each == Each::Connection
                || (def.each == Each::Class
                    && (decision.limit.up.is_some() || decision.limit.down.is_some()));
            if own_leaf
                && !def.block
                && let Some(owner) = &conn.owner
            {
                handles.adopt_ahead(conn.socket.key(), &decision.class, owner.pid);
            }
        }
    }
    let mut targets = FxHashMap::default();
    let (upload, hold_up) = plan_direction(input, handles, Direction::Upload, &mut targets);
    let (download, hold_down) = plan_direction(input, handles, Direction::Download, &mut targets);
    handles.end();
    Desired {
        upload,
        download,
        targets,
        hold: (hold_up, hold_down),
    }
}

fn plan_direction(
    input: &PlanInput,
    handles: &mut Handles,
    dir: Direction,
    targets: &mut FxHashMap<SocketKey, Targets>,
) -> (DeviceTree, Option<u16>) {
    let link = match dir {
        Direction::Upload => input.capacity.up,
        Direction::Download => input.capacity.down,
    }
    .map_or(UNLIMITED, Rate::bits_per_sec);
    let framing = input.capacity.framing;
    let framed = |class: Class| Class { framing, ..class };
    let mtu = input.mtu;
    // Flow buckets replace fq_codel's own flow queues where the kernel has none.
    let buckets = if input.features.fq_codel {
        1
    } else {
        FLOW_BUCKETS
    };
    let mut tree = DeviceTree::default();
    tree.classes.insert(
        LINK_MINOR,
        framed(htb_class(0, link, link, 0, "link".into())),
    );
    let share = (link / 100).max(MIN_RATE);
    // Per policy class: its inner minor and its flow buckets' (the first is the shared leaf).
    let mut class_minors: FxHashMap<&str, (u16, Vec<u16>)> = FxHashMap::default();
    for (name, def) in &input.classes.classes {
        let (Some(inner), Some(shared)) = (
            handles.minor(Slot::Class(name.clone())),
            handles.minor(Slot::Shared(name.clone())),
        ) else {
            continue;
        };
        let guaranteed = dir_rate(&def.rate, dir).unwrap_or(share).min(link);
        let class_ceil = match def.each {
            Each::Class => dir_rate(&def.ceil, dir).unwrap_or(link).min(link),
            Each::Process | Each::Connection => link,
        };
        // The buckets' guaranteed rates add up to the class's: HTB lets a leaf within its own
        // rate send whatever its parent's state, so more would lift the class's ceiling. A
        // blocked class drops everything in its one leaf.
        let buckets = if def.block {
            1
        } else {
            (guaranteed.min(class_ceil) / MIN_RATE).clamp(1, buckets as u64) as usize
        };
        let mut bucket_minors = vec![shared];
        bucket_minors
            .extend((1..buckets).map_while(|i| handles.minor(Slot::Bucket(name.clone(), i as u8))));
        tree.classes.insert(
            inner,
            framed(htb_class(
                LINK_MINOR,
                guaranteed,
                class_ceil,
                def.prio,
                name.to_string(),
            )),
        );
        if bucket_minors.len() == 1 {
            tree.classes.insert(
                shared,
                framed(htb_class(
                    inner,
                    guaranteed,
                    class_ceil,
                    def.prio,
                    format!("{name}/shared"),
                )),
            );
        } else {
            let rate = guaranteed.min(class_ceil) / bucket_minors.len() as u64;
            for (i, &minor) in bucket_minors.iter().enumerate() {
                let label = if i == 0 {
                    format!("{name}/shared")
                } else {
                    format!("{name}/bucket {i}")
                };
                tree.classes.insert(
                    minor,
                    framed(bucket_class(inner, rate, class_ceil, def.prio, mtu, label)),
                );
            }
        }
        let leaf = if def.block {
            BLOCK_LEAF
        } else {
            leaf_for(input.features, class_ceil, mtu)
        };
        for &minor in &bucket_minors {
            tree.leaves.insert(minor, leaf);
        }
        class_minors.insert(name, (inner, bucket_minors));
    }
    let default = input.classes.default_name();
    tree.default_minor = class_minors.get(&*default).map_or(LINK_MINOR, |m| m.1[0]);
    // The leaves made ahead, by minor: parent, guaranteed rate, ceiling (the least of the
    // process's connections' in the class), prio and label.
    let mut ahead: FxHashMap<u16, (u16, u64, u64, u8, String)> = FxHashMap::default();
    // The least ceiling of a connection's own leaf in this plan, for the holding leaf; a class
    // whose every connection gets a leaf of its own says its ceiling before any connects.
    let mut least_ceil: Option<u64> = input
        .classes
        .classes
        .values()
        .filter(|def| def.each == Each::Connection && !def.block)
        .filter_map(|def| dir_rate(&def.ceil, dir).filter(|&c| c < link))
        .min();

    for (conn, decision) in input.connections.iter().zip(input.decisions) {
        let Some(def) = input.classes.get(&decision.class) else {
            continue;
        };
        let Some((inner, bucket_minors)) = class_minors.get(&*decision.class) else {
            continue;
        };
        let (inner, shared) = (*inner, bucket_minors[0]);
        let key = conn.socket.key();
        let guaranteed = dir_rate(&def.rate, dir).unwrap_or(share).min(link);
        let member_ceil = dir_rate(&def.ceil, dir).unwrap_or(link).min(link);
        // A blocked class's connections all go to its dropping leaf, whatever their limit.
        let own_limit = dir_rate(&decision.limit, dir).filter(|_| !def.block);
        let mut target = shared;
        match def.each {
            Each::Process => {
                if let Some(pid) = conn.owner.as_ref().map(|o| o.pid)
                    && let Some(leaf) = handles.minor(Slot::Process(decision.class.clone(), pid))
                {
                    tree.classes.entry(leaf).or_insert_with(|| {
                        framed(htb_class(
                            inner,
                            guaranteed,
                            member_ceil,
                            def.prio,
                            format!("{}/pid {pid}", decision.class),
                        ))
                    });
                    tree.leaves
                        .entry(leaf)
                        .or_insert(leaf_for(input.features, member_ceil, mtu));
                    target = leaf;
                }
            }
            Each::Connection | Each::Class => {}
        }
        let mut process_target = target;
        let conn_ceil = match (def.each, own_limit) {
            (Each::Connection, limit) => Some(limit.map_or(member_ceil, |l| l.min(member_ceil))),
            (Each::Process, Some(limit)) => Some(limit.min(member_ceil)),
            (Each::Class, Some(limit)) => Some(limit.min(link)),
            (_, None) => None,
        };
        if let Some(ceil) = conn_ceil.filter(|&c| c < link && !def.block) {
            least_ceil = Some(least_ceil.map_or(ceil, |l| l.min(ceil)));
        }
        if let Some(ceil) = conn_ceil
            && let Some(leaf) = handles.minor(Slot::Connection(key))
        {
            // A burst of a few packets where the leaf segments GSO packets, as for the leaves
            // made ahead and the flow buckets: with a class's 64 KiB, a new iperf3 decided
            // within a few ms of its first packet, whose data thus started in a fresh leaf of
            // its own, sent 2.42 and 2.46 Mbit/s in its first second under a 2 Mbit/s limit.
            let (rate, label) = (guaranteed.min(ceil), conn.socket.to_string());
            let class = match leaf_for(input.features, ceil, mtu) {
                Leaf::Tbf { .. } => bucket_class(inner, rate, ceil, def.prio, mtu, label),
                _ => htb_class(inner, rate, ceil, def.prio, label),
            };
            tree.classes.insert(leaf, framed(class));
            tree.leaves
                .insert(leaf, leaf_for(input.features, ceil, mtu));
            target = leaf;
            if input.by_priority
                && def.each != Each::Process
                && !def.block
                && let Some(pid) = conn.owner.as_ref().map(|o| o.pid)
                && let Some(next) = handles.minor(Slot::Ahead(decision.class.clone(), pid))
            {
                let made = ahead.entry(next).or_insert_with(|| {
                    let label = format!("{}/pid {pid} next", decision.class);
                    (inner, guaranteed, ceil, def.prio, label)
                });
                made.2 = made.2.min(ceil);
                process_target = next;
            }
        } else if target == shared
            && bucket_minors.len() > 1
            // On the u32 path a bucket costs a filter per connection; `default`'s connections
            // need none otherwise (often most of them), so they share its first bucket there,
            // whose queue is bounded in time all the same.
            && (input.by_priority || shared != tree.default_minor)
        {
            let bucket = handles.bucket(key, &decision.class);
            target = bucket_minors
                .get(usize::from(bucket))
                .copied()
                .unwrap_or(shared);
        }
        let side = targets.entry(key).or_default();
        let chosen = Some(Target {
            leaf: target,
            // The owner's next connections start unshaped, not blocked, until decided: one
            // blocked connection must not drop the first packets of its process's others.
            process: if def.block {
                tree.default_minor
            } else {
                process_target
            },
            blocked: def.block,
        });
        match dir {
            Direction::Upload => side.up = chosen,
            Direction::Download => side.down = chosen,
        }
        if input.by_priority || target == tree.default_minor {
            continue;
        }
        let (family, keys) = filter_keys(&conn.socket, dir);
        let bucket = u32::from(conn.socket.local.port()) % BUCKETS;
        let Some(node) = handles.node(key, family, bucket) else {
            continue;
        };
        tree.filters.insert(
            filter_handle(family.htid(), bucket, node),
            Filter {
                family,
                keys,
                class: target,
            },
        );
    }
    for (minor, (parent, guaranteed, ceil, prio, label)) in ahead {
        // A new connection's first packets fill it from a full bucket, and it keeps the leaf
        // once decided: with a class's 64 KiB burst a 2 Mbit/s iperf3 sent 1.22x its limit in
        // its first second. Where the leaf segments GSO packets (a token bucket), a burst of a
        // few packets is enough, as for the flow buckets.
        let guaranteed = guaranteed.min(ceil);
        let class = match leaf_for(input.features, ceil, mtu) {
            Leaf::Tbf { .. } => bucket_class(parent, guaranteed, ceil, prio, mtu, label),
            _ => htb_class(parent, guaranteed, ceil, prio, label),
        };
        tree.classes.insert(minor, framed(class));
        tree.leaves
            .insert(minor, leaf_for(input.features, ceil, mtu));
    }
    let hold = input
        .by_priority
        .then(|| hold_leaf(handles, dir, least_ceil))
        .flatten()
        .map(|(minor, ceil)| {
            // Under the link, beside the classes: which class a held socket will be in is not
            // known yet. The lowest priority, so it borrows last.
            let class = bucket_class(LINK_MINOR, share.min(ceil), ceil, 7, mtu, "hold".into());
            tree.classes.insert(minor, framed(class));
            tree.leaves
                .insert(minor, leaf_for(input.features, ceil, mtu));
            minor
        });
    (tree, hold)
}

/// The holding leaf's minor and ceiling in direction `dir` (see [`Desired::hold`]): the least
/// of `least` (this plan's least per-connection ceiling) and the least of earlier plans'.
fn hold_leaf(handles: &mut Handles, dir: Direction, least: Option<u64>) -> Option<(u16, u64)> {
    let ceil = match (handles.hold_ceil.get(&dir).copied(), least) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    handles.hold_ceil.insert(dir, ceil);
    Some((handles.minor(Slot::Hold)?, ceil))
}
