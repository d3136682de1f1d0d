//! The tc wire formats shaper needs, in one place: HTB qdisc and class options (with 64-bit
//! rates), leaf qdiscs, u32 hash tables, links and 5-tuple entries, the ingress qdisc and the
//! mirred redirect to the IFB. Builders return `TcMessage`s for the executor to send; parsers
//! turn the kernel's dump back into the model.
//!
//! netlink-packet-route models u32 and mirred but not HTB or pfifo. Their C structs
//! (`include/uapi/linux/pkt_sched.h`) are declared here once each with `kernel_struct!`, whose
//! field list both emits and parses them, and travel as raw attributes (`TcOption::Other`), as
//! iproute2's `tc/q_htb.c` sends them. Kernel constants keep their kernel names.
//!
//! The `golden` tests compare every builder with the bytes iproute2's `tc` sends for the same
//! command (`tests/fixtures/tc-golden.txt`).

use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};

use super::model::{BUCKETS, Class, Direction, Family, Filter, Key, Leaf, MAJOR};

// include/uapi/linux/pkt_sched.h
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
#[cfg(test)]
const TCA_HTB_CTAB: u16 = 3;
#[cfg(test)]
const TCA_HTB_RTAB: u16 = 4;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
const TC_HTB_PROTOVER: u32 = 3;
/// iproute2's default `r2q`; unused for rates since every class sets its quantum.
const HTB_R2Q: u32 = 10;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// `TCA_OPTIONS` (include/uapi/linux/rtnetlink.h), for qdiscs whose options are a bare struct.
const TCA_OPTIONS: u16 = 2;
/// psched ticks are 64 ns (`PSCHED_SHIFT`).
const PSCHED_SHIFT: u32 = 6;
/// `ETH_P_ALL`: every protocol, for the ingress redirect.
pub const ETH_P_ALL: u16 = 0x0003;

/// A fixed-size field of a kernel struct, in the host's byte order as the kernel's are.
trait Field: Copy {
    const LEN: usize;
    /// Writes the field at the start of `buf`, which holds at least `LEN` bytes.
    fn put(self, buf: &mut [u8]);
    /// Reads the field from the start of `buf`, which holds at least `LEN` bytes.
    fn get(buf: &[u8]) -> Self;
}

macro_rules! int_fields {
    ($($t:ty),*) => {$(
        impl Field for $t {
            const LEN: usize = std::mem::size_of::<$t>();
            fn put(self, buf: &mut [u8]) {
                buf[..Self::LEN].copy_from_slice(&self.to_ne_bytes());
            }
            fn get(buf: &[u8]) -> Self {
                let mut bytes = [0; std::mem::size_of::<$t>()];
                bytes.copy_from_slice(&buf[..Self::LEN]);
                <$t>::from_ne_bytes(bytes)
            }
        }
    )*};
}
int_fields!(u8, u16, i16, u32, u64);

/// Declares a C struct once: the field list, in the kernel's order, is the wire layout, and
/// the one `Field` implementation it generates both emits and parses it, so the two
/// directions cannot disagree (as netlink-packet-route's `buffer!` tables do).
macro_rules! kernel_struct {
    ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl Field for $name {
            const LEN: usize = 0 $(+ <$ty as Field>::LEN)*;
            fn put(self, buf: &mut [u8]) {
                let mut at = 0;
                $(
                    self.$field.put(&mut buf[at..]);
                    at += <$ty as Field>::LEN;
                )*
                debug_assert_eq!(at, Self::LEN);
            }
            fn get(buf: &[u8]) -> Self {
                let mut at = 0;
                $(
                    let $field = <$ty as Field>::get(&buf[at..]);
                    at += <$ty as Field>::LEN;
                )*
                debug_assert_eq!(at, Self::LEN);
                $name { $($field,)* }
            }
        }
    };
}

kernel_struct! {
    /// `struct tc_ratespec`.
    TcRateSpec {
        cell_log: u8,
        linklayer: u8,
        overhead: u16,
        cell_align: i16,
        mpu: u16,
        rate: u32,
    }
}

kernel_struct! {
    /// `struct tc_htb_opt`: one class's parameters (`TCA_HTB_PARMS`). `buffer` and `cbuffer`
    /// are transmission times of the bursts in psched ticks.
    TcHtbOpt {
        rate: TcRateSpec,
        ceil: TcRateSpec,
        buffer: u32,
        cbuffer: u32,
        quantum: u32,
        level: u32,
        prio: u32,
    }
}

kernel_struct! {
    /// `struct tc_htb_glob`: the HTB qdisc's parameters (`TCA_HTB_INIT`).
    TcHtbGlob {
        version: u32,
        rate2quantum: u32,
        defcls: u32,
        debug: u32,
        direct_pkts: u32,
    }
}

kernel_struct! {
    /// `struct tc_fifo_qopt`: pfifo's options, a bare struct in `TCA_OPTIONS`.
    TcFifoQopt {
        limit: u32,
    }
}

fn encode<T: Field>(value: T) -> Vec<u8> {
    let mut bytes = vec![0; T::LEN];
    value.put(&mut bytes);
    bytes
}

/// `None` when the kernel sent fewer bytes than the struct has.
fn decode<T: Field>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= T::LEN).then(|| T::get(bytes))
}

fn struct_option<T: Field>(kind: u16, value: T) -> TcOption {
    TcOption::Other(DefaultNla::new(kind, encode(value)))
}

/// The value of the first option of `kind`, decoded.
fn find_option<T: Field>(options: &[(u16, Vec<u8>)], kind: u16) -> Option<T> {
    options
        .iter()
        .find(|(k, _)| *k == kind)
        .and_then(|(_, v)| decode(v))
}

impl TcRateSpec {
    /// `bytes_per_sec` on Ethernet, where the kernel then needs no rate table. Saturated at 32
    /// bits, as tc does; the exact value then goes in `TCA_HTB_RATE64`/`CEIL64`.
    fn ethernet(bytes_per_sec: u64) -> TcRateSpec {
        TcRateSpec {
            linklayer: TC_LINKLAYER_ETHERNET,
            cell_align: -1, // as tc sets it
            rate: bytes_per_sec.min(u64::from(u32::MAX)) as u32,
            ..TcRateSpec::default()
        }
    }
}

/// An HTB class's options: its parameters and, from 2^32 bytes/s up, the exact 64-bit rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HtbClassOptions {
    pub parms: TcHtbOpt,
    pub rate64: Option<u64>,
    pub ceil64: Option<u64>,
}

impl HtbClassOptions {
    pub fn of(class: &Class) -> HtbClassOptions {
        let (rate, ceil) = (class.rate / 8, class.ceil / 8);
        let wide = |bytes: u64| (bytes > u64::from(u32::MAX)).then_some(bytes);
        HtbClassOptions {
            parms: TcHtbOpt {
                rate: TcRateSpec::ethernet(rate),
                ceil: TcRateSpec::ethernet(ceil),
                buffer: xmit_ticks(rate, class.burst),
                cbuffer: xmit_ticks(ceil, class.cburst),
                quantum: class.quantum,
                level: 0, // computed by the kernel
                prio: u32::from(class.prio),
            },
            rate64: wide(rate),
            ceil64: wide(ceil),
        }
    }

    /// The attributes, in the order tc sends them.
    fn options(&self) -> Vec<TcOption> {
        let mut options = Vec::with_capacity(3);
        if let Some(rate) = self.rate64 {
            options.push(struct_option(TCA_HTB_RATE64, rate));
        }
        if let Some(ceil) = self.ceil64 {
            options.push(struct_option(TCA_HTB_CEIL64, ceil));
        }
        options.push(struct_option(TCA_HTB_PARMS, self.parms));
        options
    }

    fn parse(options: &[(u16, Vec<u8>)]) -> Option<HtbClassOptions> {
        Some(HtbClassOptions {
            parms: find_option(options, TCA_HTB_PARMS)?,
            rate64: find_option(options, TCA_HTB_RATE64),
            ceil64: find_option(options, TCA_HTB_CEIL64),
        })
    }

    /// The class these options install under `parent` (labels are not in the kernel).
    fn class(&self, parent: u16) -> Class {
        let rate = self.rate64.unwrap_or(u64::from(self.parms.rate.rate));
        let ceil = self.ceil64.unwrap_or(u64::from(self.parms.ceil.rate));
        Class {
            parent,
            rate: rate * 8,
            ceil: ceil * 8,
            burst: ticks_to_bytes(self.parms.buffer, rate),
            cburst: ticks_to_bytes(self.parms.cbuffer, ceil),
            quantum: self.parms.quantum,
            prio: self.parms.prio as u8,
            label: String::new(),
        }
    }
}

fn handle(major: u16, minor: u16) -> TcHandle {
    TcHandle { major, minor }
}

fn class_handle(minor: u16) -> TcHandle {
    handle(MAJOR, minor)
}

/// The root qdisc handle `5a:`.
pub fn root_handle() -> TcHandle {
    handle(MAJOR, 0)
}

fn message(ifindex: u32, handle: TcHandle, parent: TcHandle) -> TcMessage {
    let mut m = TcMessage::with_index(ifindex as i32);
    m.header.handle = handle;
    m.header.parent = parent;
    m
}

/// `tc qdisc add dev IF root handle 5a: htb default DEFAULT`
pub fn htb_root(ifindex: u32, default_minor: u16) -> TcMessage {
    let mut m = message(ifindex, root_handle(), TcHandle::ROOT);
    let glob = TcHtbGlob {
        version: TC_HTB_PROTOVER,
        rate2quantum: HTB_R2Q,
        defcls: u32::from(default_minor),
        ..TcHtbGlob::default()
    };
    m.attributes.push(TcAttribute::Kind("htb".into()));
    m.attributes.push(TcAttribute::Options(vec![struct_option(
        TCA_HTB_INIT,
        glob,
    )]));
    m
}

/// The burst the kernel will report back for `bytes` at `bits_per_sec`: HTB stores bursts as
/// transmission times in 64 ns ticks, which at high rates are coarser than a byte. Plans use
/// these values so a dumped tree compares equal to the plan that installed it.
pub fn representable_burst(bits_per_sec: u64, bytes: u32) -> u32 {
    let rate = bits_per_sec / 8;
    ticks_to_bytes(xmit_ticks(rate, bytes), rate)
}

fn ticks_to_bytes(ticks: u32, bytes_per_sec: u64) -> u32 {
    let ns = u128::from(ticks) << PSCHED_SHIFT;
    (ns * u128::from(bytes_per_sec)).div_ceil(1_000_000_000) as u32
}

/// Transmission time of `bytes` at `bytes_per_sec`, in psched ticks (HTB's `buffer`).
fn xmit_ticks(bytes_per_sec: u64, bytes: u32) -> u32 {
    let ns = u128::from(bytes) * 1_000_000_000 / u128::from(bytes_per_sec.max(1));
    (ns >> PSCHED_SHIFT).min(u128::from(u32::MAX)) as u32
}

/// `tc class add|change dev IF parent P classid 5a:MINOR htb rate … ceil … burst … cburst …
/// quantum … prio …`
pub fn htb_class(ifindex: u32, minor: u16, class: &Class) -> TcMessage {
    let parent = if class.parent == 0 {
        root_handle()
    } else {
        class_handle(class.parent)
    };
    let mut m = message(ifindex, class_handle(minor), parent);
    m.attributes.push(TcAttribute::Kind("htb".into()));
    m.attributes
        .push(TcAttribute::Options(HtbClassOptions::of(class).options()));
    m
}

/// `tc class del dev IF classid 5a:MINOR`
pub fn class_delete(ifindex: u32, minor: u16) -> TcMessage {
    message(ifindex, class_handle(minor), root_handle())
}

/// `tc qdisc replace dev IF parent 5a:MINOR fq_codel|pfifo limit N` (handle chosen by the kernel)
pub fn leaf_qdisc(ifindex: u32, parent_minor: u16, leaf: Leaf) -> TcMessage {
    let mut m = message(ifindex, TcHandle::UNSPEC, class_handle(parent_minor));
    match leaf {
        Leaf::FqCodel => m.attributes.push(TcAttribute::Kind("fq_codel".into())),
        Leaf::Pfifo { limit } => {
            m.attributes.push(TcAttribute::Kind("pfifo".into()));
            // A bare struct, not attributes.
            m.attributes.push(TcAttribute::Other(DefaultNla::new(
                TCA_OPTIONS,
                encode(TcFifoQopt { limit }),
            )));
        }
    }
    m
}

/// `tc qdisc del dev IF root`
pub fn root_delete(ifindex: u32) -> TcMessage {
    message(ifindex, TcHandle::UNSPEC, TcHandle::ROOT)
}

/// `tc qdisc add dev IF ingress`
pub fn ingress(ifindex: u32) -> TcMessage {
    let mut m = message(ifindex, handle(0xffff, 0), TcHandle::INGRESS);
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    m
}

/// `tc qdisc del dev IF ingress`
pub fn ingress_delete(ifindex: u32) -> TcMessage {
    message(ifindex, handle(0xffff, 0), TcHandle::INGRESS)
}

fn filter_message(ifindex: u32, parent: TcHandle, prio: u16, protocol: u16, fh: u32) -> TcMessage {
    let mut m = message(ifindex, TcHandle::from(fh), parent);
    // tcm_info = prio << 16 | protocol in network order.
    m.header.info = (u32::from(prio) << 16) | u32::from(protocol.to_be());
    m.attributes.push(TcAttribute::Kind("u32".into()));
    m
}

fn u32_options(m: &mut TcMessage, options: Vec<TcFilterU32Option>) {
    m.attributes.push(TcAttribute::Options(
        options.into_iter().map(TcOption::U32).collect(),
    ));
}

fn selector(keys: &[Key]) -> TcU32Selector {
    let mut s = TcU32Selector::default();
    s.flags = TcU32SelectorFlags::Terminal;
    s.keys = keys
        .iter()
        .map(|k| {
            let mut key = TcU32Key::default();
            key.off = k.off;
            key.val = k.val & k.mask;
            key.mask = k.mask;
            key
        })
        .collect();
    s.nkeys = s.keys.len() as u8;
    s
}

/// `tc filter add dev IF parent 5a: prio P protocol ip|ipv6 handle HT: u32 divisor 256`
pub fn u32_table(ifindex: u32, family: Family) -> TcMessage {
    let mut m = filter_message(
        ifindex,
        root_handle(),
        family.prio(),
        family.ethertype(),
        family.htid() << 20,
    );
    u32_options(&mut m, vec![TcFilterU32Option::Divisor(BUCKETS)]);
    m
}

/// `tc filter add … u32 link HT: hashkey mask M at OFF match u32 0 0`: every packet of the
/// family goes to the bucket of its local port's low byte.
pub fn u32_link(ifindex: u32, family: Family, direction: Direction) -> TcMessage {
    // Node 1 of the prio's root table; the kernel fills in that table's id.
    let mut m = filter_message(ifindex, root_handle(), family.prio(), family.ethertype(), 1);
    let mut s = selector(&[Key {
        off: 0,
        val: 0,
        mask: 0,
    }]);
    // Not terminal: the kernel ignores the flag on a link, and tc leaves it out.
    s.flags = TcU32SelectorFlags::empty();
    s.hoff = family.ports_offset() as i16;
    s.hmask = match direction {
        Direction::Upload => 0x00ff_0000,   // low byte of the source port
        Direction::Download => 0x0000_00ff, // low byte of the destination port
    };
    u32_options(
        &mut m,
        vec![
            TcFilterU32Option::Link(family.htid() << 20),
            TcFilterU32Option::Selector(s),
        ],
    );
    m
}

/// `tc filter add … handle HT:BUCKET:NODE u32 ht HT:BUCKET: match … flowid 5a:CLASS`
pub fn u32_filter(ifindex: u32, fh: u32, filter: &Filter) -> TcMessage {
    let f = filter.family;
    let mut m = filter_message(ifindex, root_handle(), f.prio(), f.ethertype(), fh);
    u32_options(
        &mut m,
        vec![
            // The table and bucket travel in TCA_U32_HASH; the kernel ignores them in the handle.
            TcFilterU32Option::Hash(fh & 0xffff_f000),
            TcFilterU32Option::ClassId(class_handle(filter.class)),
            TcFilterU32Option::Selector(selector(&filter.keys)),
        ],
    );
    m
}

/// `tc filter del dev IF parent 5a: prio P protocol ip|ipv6 handle HT:BUCKET:NODE u32`
pub fn u32_filter_delete(ifindex: u32, fh: u32, family: Family) -> TcMessage {
    filter_message(
        ifindex,
        root_handle(),
        family.prio(),
        family.ethertype(),
        fh,
    )
}

/// Marks shaper's ingress redirect. The kernel stores an action cookie and dumps it back but
/// never interprets it, so the redirect stays recognisable as shaper's when its IFB has been
/// deleted and the kernel reports the target as no device at all (ifindex 0): that dangling
/// redirect drops every inbound packet, and only an owner that recognises it will remove it.
pub const REDIRECT_COOKIE: &[u8] = b"shaper:redirect";

/// The pref of shaper's redirect on the ingress qdisc. Pref 1 is left to the first-packet
/// classifier's cls_bpf filter (kernels without tcx), which must see each packet first.
/// Versions before 0.2 put the redirect at pref 1: such a redirect is replaced.
pub const REDIRECT_PREF: u16 = 2;

/// A mirred egress redirect read back from an ingress filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    /// The target device; 0 once the target has been deleted.
    pub to_ifindex: u32,
    /// Whether it carries [`REDIRECT_COOKIE`] (redirects installed before the cookie do not).
    pub marked: bool,
    /// The filter's pref.
    pub pref: u16,
}

/// `tc filter add dev IF parent ffff: prio 2 protocol all u32 match u32 0 0 action mirred
/// egress redirect dev IFB cookie <REDIRECT_COOKIE>`
pub fn redirect_all(ifindex: u32, to_ifindex: u32) -> TcMessage {
    let mut m = filter_message(ifindex, handle(0xffff, 0), REDIRECT_PREF, ETH_P_ALL, 0);
    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to_ifindex;
    let mut action = TcAction::default();
    action.tab = 1;
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
        TcActionAttribute::Cookie(REDIRECT_COOKIE.to_vec()),
    ];
    u32_options(
        &mut m,
        vec![
            TcFilterU32Option::Selector(selector(&[Key {
                off: 0,
                val: 0,
                mask: 0,
            }])),
            TcFilterU32Option::Action(vec![action]),
        ],
    );
    m
}

/// The kind of a dumped qdisc, class or filter (`htb`, `ingress`, `u32`, …).
pub fn kind_of(m: &TcMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })
}

fn nla_bytes(nla: &DefaultNla) -> Vec<u8> {
    let mut v = vec![0; nla.value_len()];
    nla.emit_value(&mut v);
    v
}

/// The options of a qdisc or class kind netlink-packet-route does not model, as `(type, value)`
/// pairs. Parsed messages hold them as one opaque `TCA_OPTIONS` blob of nested attributes;
/// messages built here hold them one by one.
fn raw_options(m: &TcMessage) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    for a in &m.attributes {
        if let TcAttribute::Options(opts) = a {
            for o in opts {
                let TcOption::Other(nla) = o else { continue };
                let value = nla_bytes(nla);
                if nla.kind() == TCA_OPTIONS {
                    for inner in netlink_packet_core::NlasIterator::new(&value[..]).flatten() {
                        out.push((inner.kind(), inner.value().to_vec()));
                    }
                } else {
                    out.push((nla.kind(), value));
                }
            }
        }
    }
    out
}

/// The bare-struct options of a qdisc like pfifo (`TCA_OPTIONS` holding a C struct).
fn struct_options(m: &TcMessage) -> Option<Vec<u8>> {
    m.attributes.iter().find_map(|a| match a {
        TcAttribute::Other(nla) if nla.kind() == TCA_OPTIONS => Some(nla_bytes(nla)),
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Other(nla) if nla.kind() == TCA_OPTIONS => Some(nla_bytes(nla)),
            _ => None,
        }),
        _ => None,
    })
}

/// The default minor of a dumped HTB root qdisc.
pub fn parse_htb_default(m: &TcMessage) -> Option<u16> {
    if kind_of(m) != Some("htb") {
        return None;
    }
    find_option::<TcHtbGlob>(&raw_options(m), TCA_HTB_INIT).map(|glob| glob.defcls as u16)
}

/// A dumped HTB class: its minor and parameters (labels are not in the kernel).
pub fn parse_htb_class(m: &TcMessage) -> Option<(u16, Class)> {
    if kind_of(m) != Some("htb") || m.header.handle.major != MAJOR {
        return None;
    }
    let options = HtbClassOptions::parse(&raw_options(m))?;
    let parent = m.header.parent;
    let parent = if parent.major == MAJOR {
        parent.minor
    } else {
        0
    };
    Some((m.header.handle.minor, options.class(parent)))
}

/// A dumped leaf qdisc: the minor of its parent class and its kind.
pub fn parse_leaf(m: &TcMessage) -> Option<(u16, Leaf)> {
    if m.header.parent.major != MAJOR || m.header.parent.minor == 0 {
        return None;
    }
    let leaf = match kind_of(m)? {
        "fq_codel" => Leaf::FqCodel,
        "pfifo" => Leaf::Pfifo {
            limit: decode::<TcFifoQopt>(&struct_options(m)?)?.limit,
        },
        _ => return None,
    };
    Some((m.header.parent.minor, leaf))
}

/// A dumped u32 connection filter (an entry of one of shaper's hash tables).
pub fn parse_u32_filter(m: &TcMessage) -> Option<(u32, Filter)> {
    if kind_of(m) != Some("u32") {
        return None;
    }
    let fh = u32::from(m.header.handle);
    let family = match fh >> 20 {
        h if h == Family::V4.htid() => Family::V4,
        h if h == Family::V6.htid() => Family::V6,
        _ => return None,
    };
    if fh & 0xfff == 0 {
        return None; // the table itself
    }
    let mut class = None;
    let mut keys = None;
    for a in &m.attributes {
        if let TcAttribute::Options(opts) = a {
            for o in opts {
                match o {
                    TcOption::U32(TcFilterU32Option::ClassId(h)) if h.major == MAJOR => {
                        class = Some(h.minor)
                    }
                    TcOption::U32(TcFilterU32Option::Selector(s)) => {
                        keys = Some(
                            s.keys
                                .iter()
                                .map(|k| Key {
                                    off: k.off,
                                    val: k.val,
                                    mask: k.mask,
                                })
                                .collect(),
                        )
                    }
                    _ => {}
                }
            }
        }
    }
    Some((
        fh,
        Filter {
            family,
            keys: keys?,
            class: class?,
        },
    ))
}

/// The ifindex a dumped filter redirects to with mirred, if it does.
pub fn parse_redirect(m: &TcMessage) -> Option<Redirect> {
    let pref = (m.header.info >> 16) as u16;
    let redirect = m.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::U32(TcFilterU32Option::Action(actions)) => {
                actions.iter().find_map(redirect_of_action)
            }
            _ => None,
        }),
        _ => None,
    })?;
    Some(Redirect { pref, ..redirect })
}

fn redirect_of_action(action: &TcAction) -> Option<Redirect> {
    let to_ifindex = action.attributes.iter().find_map(|aa| match aa {
        TcActionAttribute::Options(ao) => ao.iter().find_map(|x| match x {
            TcActionOption::Mirror(TcActionMirrorOption::Parms(p))
                if p.eaction == TcMirrorActionType::EgressRedir =>
            {
                Some(p.ifindex)
            }
            _ => None,
        }),
        _ => None,
    })?;
    let marked = action
        .attributes
        .iter()
        .any(|aa| matches!(aa, TcActionAttribute::Cookie(c) if c == REDIRECT_COOKIE));
    Some(Redirect {
        to_ifindex,
        marked,
        pref: 0,
    })
}

#[cfg(test)]
mod golden;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::planner::htb_class as class_params;
    use netlink_packet_core::Emitable;
    use netlink_packet_core::Parseable;

    fn round_trip(m: &TcMessage) -> TcMessage {
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        TcMessage::parse(&buf[..]).expect("parses")
    }

    #[test]
    fn htb_class_options_bytes() {
        let class = class_params(1, 2_000_000, 4_000_000, 3, "x".into());
        let m = htb_class(7, 0x20, &class);
        let options = raw_options(&m);
        assert_eq!(TcHtbOpt::LEN, 44, "struct tc_htb_opt");
        let parms: TcHtbOpt = find_option(&options, TCA_HTB_PARMS).unwrap();
        assert_eq!(parms.rate.linklayer, TC_LINKLAYER_ETHERNET);
        assert_eq!(parms.rate.rate, 250_000, "rate in bytes/s");
        assert_eq!(parms.ceil.rate, 500_000, "ceil in bytes/s");
        // burst 65,536 bytes at 250,000 B/s = 262.144 ms = 4,096,000 ticks of 64 ns
        assert_eq!(parms.buffer, 4_096_000);
        assert_eq!(parms.prio, 3, "prio");
        assert_eq!(
            m.header.handle,
            TcHandle {
                major: MAJOR,
                minor: 0x20
            }
        );
        assert_eq!(
            m.header.parent,
            TcHandle {
                major: MAJOR,
                minor: 1
            }
        );
    }

    #[test]
    fn htb_classes_parse_back_including_64_bit_rates() {
        for (rate, ceil) in [(8_000, 2_000_000), (1_000_000, 100_000_000_000)] {
            let class = class_params(1, rate, ceil, 5, String::new());
            let (minor, parsed) =
                parse_htb_class(&round_trip(&htb_class(3, 0x33, &class))).unwrap();
            assert_eq!(minor, 0x33);
            assert!(parsed.same_params(&class), "{parsed:?} vs {class:?}");
        }
        let big = class_params(1, 50_000_000_000, 100_000_000_000, 0, String::new());
        let opts = raw_options(&htb_class(3, 2, &big));
        assert!(opts.iter().any(|(k, _)| *k == TCA_HTB_RATE64));
        assert!(opts.iter().any(|(k, _)| *k == TCA_HTB_CEIL64));
    }

    /// `--uplink 18446744073709551615bit` once installed `burst 0b`: the burst, a transmission
    /// time in 64 ns ticks, was zero ticks at that rate. Parsing now refuses it; the planner clamps
    /// whatever reaches it to the documented range, where the burst is never zero.
    #[test]
    fn bursts_stay_nonzero_over_the_whole_rate_range() {
        use crate::units::Rate;
        for bits in [
            0,
            Rate::MIN.bits_per_sec(),
            1_000_000,
            100_000_000_000,
            Rate::MAX.bits_per_sec(),
            u64::MAX / 2,
            u64::MAX,
        ] {
            let class = class_params(1, bits, bits, 0, String::new());
            assert!(class.ceil <= Rate::MAX.bits_per_sec(), "{bits}: {class:?}");
            assert!(class.rate >= Rate::MIN.bits_per_sec(), "{bits}: {class:?}");
            assert!(class.burst >= 60_000, "{bits}: burst {}", class.burst);
            assert!(class.cburst >= 60_000, "{bits}: cburst {}", class.cburst);
            let m = htb_class(3, 2, &class);
            let parms: TcHtbOpt = find_option(&raw_options(&m), TCA_HTB_PARMS).unwrap();
            assert!(parms.buffer > 0, "{bits}: buffer ticks");
            assert!(parms.cbuffer > 0, "{bits}: cbuffer ticks");
        }
    }

    #[test]
    fn root_and_leaves_parse_back() {
        assert_eq!(
            parse_htb_default(&round_trip(&htb_root(2, 0x11))),
            Some(0x11)
        );
        let m = round_trip(&leaf_qdisc(2, 0x12, Leaf::Pfifo { limit: 40 }));
        assert_eq!(parse_leaf(&m), Some((0x12, Leaf::Pfifo { limit: 40 })));
        let m = round_trip(&leaf_qdisc(2, 0x13, Leaf::FqCodel));
        assert_eq!(parse_leaf(&m), Some((0x13, Leaf::FqCodel)));
    }

    #[test]
    fn u32_filters_carry_prio_protocol_hash_and_parse_back() {
        let filter = Filter {
            family: Family::V6,
            keys: vec![
                Key {
                    off: 4,
                    val: 6 << 8,
                    mask: 0xff00,
                },
                Key {
                    off: 40,
                    val: 0x1234_0050,
                    mask: !0,
                },
            ],
            class: 0x42,
        };
        let fh = super::super::model::filter_handle(Family::V6.htid(), 0x34, 7);
        let m = u32_filter(9, fh, &filter);
        assert_eq!(m.header.info, (11 << 16) | u32::from(0x86ddu16.to_be()));
        assert_eq!(u32::from(m.header.handle), 0x0113_4007, "tc's 11:34:7");
        let (h, parsed) = parse_u32_filter(&round_trip(&m)).unwrap();
        assert_eq!((h, parsed), (fh, filter));
    }

    #[test]
    fn redirect_points_at_the_ifb() {
        assert_eq!(
            parse_redirect(&round_trip(&redirect_all(2, 77))),
            Some(Redirect {
                to_ifindex: 77,
                marked: true,
                pref: REDIRECT_PREF,
            })
        );
    }
}
