//! Golden bytes: every builder against the request iproute2's `tc` sends for the same command,
//! captured by `tests/fixtures/capture-tc-golden.sh` into `tests/fixtures/tc-golden.txt`, where
//! the command is the comment above each vector. Compared byte for byte: the `struct tcmsg`
//! header, every top-level attribute, and each attribute nested in `TCA_OPTIONS` (as a set: tc's
//! order follows the order of its arguments). Where tc sends something shaper legitimately does
//! not, the difference is taken out of tc's side by name, with the reason next to it. Then tc's
//! request is parsed back with shaper's parsers, which must give the values that were emitted.

use netlink_packet_core::{Emitable, NlasIterator, Parseable};
use netlink_packet_route::tc::TcMessage;

use super::*;
use crate::scan::{Proto, Socket, State};
use crate::shape::model::filter_handle;
use crate::shape::planner::filter_keys;

const GOLDEN: &str = include_str!("../../../tests/fixtures/tc-golden.txt");
/// The ifindex of `d0` and `i0` in the capture's namespace.
const D0: u32 = 3;
const I0: u32 = 2;
const TCA_KIND: u16 = 1;

/// tc's request named `name`: `struct tcmsg` and the attributes after it.
fn tc_sent(name: &str) -> Vec<u8> {
    let hex = GOLDEN
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no vector {name} in tc-golden.txt"));
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A request split into the parts compared.
#[derive(Debug, PartialEq, Eq)]
struct Wire {
    /// `struct tcmsg`: family, ifindex, handle, parent, info.
    header: Vec<u8>,
    /// Top-level attributes other than nested options, in order, as (type, value).
    attributes: Vec<(u16, Vec<u8>)>,
    /// The attributes nested in `TCA_OPTIONS`, sorted; `None` without `TCA_OPTIONS`.
    options: Option<Vec<(u16, Vec<u8>)>>,
}

/// Whether `TCA_OPTIONS` holds attributes (HTB, u32, fq_codel) or a bare struct (pfifo).
#[derive(Clone, Copy)]
enum Options {
    Nested,
    Bare,
}

impl Wire {
    fn of(bytes: &[u8], options: Options) -> Wire {
        let mut wire = Wire {
            header: bytes[..20].to_vec(),
            attributes: Vec::new(),
            options: None,
        };
        for nla in NlasIterator::new(&bytes[20..]) {
            let nla = nla.expect("well-formed attribute");
            match options {
                Options::Nested if nla.kind() == TCA_OPTIONS => {
                    let mut nested: Vec<_> = NlasIterator::new(nla.value())
                        .map(|inner| {
                            let inner = inner.expect("well-formed option");
                            (inner.kind(), inner.value().to_vec())
                        })
                        .collect();
                    nested.sort();
                    wire.options = Some(nested);
                }
                _ => wire.attributes.push((nla.kind(), nla.value().to_vec())),
            }
        }
        wire
    }

    fn without_option(&mut self, kind: u16) {
        if let Some(options) = &mut self.options {
            options.retain(|(k, _)| *k != kind);
        }
    }
}

/// Asserts that `ours` is the request tc sent as `name`, once `allowed` has taken the
/// legitimate differences out of tc's side; returns tc's request parsed, for the parsers.
fn assert_sends_what_tc_sends(
    name: &str,
    ours: &TcMessage,
    options: Options,
    allowed: impl FnOnce(&mut Wire),
) -> TcMessage {
    let sent = tc_sent(name);
    let mut expected = Wire::of(&sent, options);
    allowed(&mut expected);
    let mut emitted = vec![0; ours.buffer_len()];
    ours.emit(&mut emitted);
    assert_eq!(Wire::of(&emitted, options), expected, "{name}");
    TcMessage::parse(&sent[..]).expect("tc's request parses")
}

/// tc computes rate tables, and the `cell_log` indexing them, for kernels older than 3.8. With a
/// link layer set the kernel computes rates itself (`psched_ratecfg_precompute`) and reads
/// neither: `htb_change_class` looks at `TCA_HTB_RTAB` only for `TC_LINKLAYER_UNAWARE`.
fn without_rate_tables(tc: &mut Wire) {
    tc.without_option(TCA_HTB_RTAB);
    tc.without_option(TCA_HTB_CTAB);
    for (kind, value) in tc.options.iter_mut().flatten() {
        if *kind == TCA_HTB_PARMS {
            let mut parms: TcHtbOpt = decode(value).expect("tc_htb_opt");
            parms.rate.cell_log = 0;
            parms.ceil.cell_log = 0;
            *value = encode(parms);
        }
    }
}

fn nothing(_: &mut Wire) {}

fn class(parent: u16, rate: u64, ceil: u64, burst: u32, quantum: u32, prio: u8) -> Class {
    Class {
        parent,
        rate,
        ceil,
        burst,
        cburst: burst,
        quantum,
        prio,
        label: String::new(),
    }
}

fn socket(proto: Proto, local: &str, remote: &str) -> Socket {
    Socket {
        proto,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        state: State::Established,
        uid: 0,
        inode: 1,
        cookie: 1,
        bytes_up: None,
        bytes_down: None,
    }
}

#[test]
fn htb_root_qdisc() {
    // tc qdisc add dev d0 root handle 5a: htb default 11
    let tc = assert_sends_what_tc_sends("htb_root", &htb_root(D0, 0x11), Options::Nested, nothing);
    assert_eq!(parse_htb_default(&tc), Some(0x11));
}

#[test]
fn htb_class_with_32_bit_rates() {
    // tc class add dev d0 parent 5a: classid 5a:10 htb rate 2mbit ceil 4mbit burst 65536
    //     cburst 65536 quantum 1600 prio 3
    let class = class(0, 2_000_000, 4_000_000, 65_536, 1600, 3);
    let ours = htb_class(D0, 0x10, &class);
    let tc = assert_sends_what_tc_sends("htb_class", &ours, Options::Nested, without_rate_tables);
    assert_eq!(parse_htb_class(&tc), Some((0x10, class)));
}

#[test]
fn htb_class_with_64_bit_rates() {
    // tc class add dev d0 parent 5a:10 classid 5a:11 htb rate 50gbit ceil 100gbit burst 250000
    //     cburst 200000 quantum 200000 prio 0
    // Bursts lasting a multiple of 8 µs (40 and 16 µs), which is a whole number of 64 ns ticks:
    // tc truncates a burst's transmission time to whole microseconds before converting it to
    // ticks where shaper converts from nanoseconds, so for 262,144 bytes at 50 Gbit/s tc sends
    // 640 ticks and shaper 655; and a burst of a fractional tick does not read back the same
    // (the planner only plans representable bursts, see `representable_burst`).
    let class = Class {
        cburst: 200_000,
        ..class(0x10, 50_000_000_000, 100_000_000_000, 250_000, 200_000, 0)
    };
    let ours = htb_class(D0, 0x11, &class);
    let tc =
        assert_sends_what_tc_sends("htb_class_64", &ours, Options::Nested, without_rate_tables);
    let options = HtbClassOptions::parse(&raw_options(&tc)).unwrap();
    assert_eq!(options.parms.rate.rate, u32::MAX, "saturated, as tc does");
    assert_eq!(options.rate64, Some(6_250_000_000));
    assert_eq!(options.ceil64, Some(12_500_000_000));
    assert_eq!(parse_htb_class(&tc), Some((0x11, class)));
}

#[test]
fn pfifo_leaf() {
    // tc qdisc replace dev d0 parent 5a:10 pfifo limit 40
    let leaf = Leaf::Pfifo { limit: 40 };
    let ours = leaf_qdisc(D0, 0x10, leaf);
    let tc = assert_sends_what_tc_sends("pfifo", &ours, Options::Bare, nothing);
    assert_eq!(parse_leaf(&tc), Some((0x10, leaf)));
}

#[test]
fn fq_codel_leaf() {
    // tc qdisc replace dev d0 parent 5a:11 fq_codel
    let ours = leaf_qdisc(D0, 0x11, Leaf::FqCodel);
    // tc opens a `TCA_OPTIONS` nest even when it has no parameter to put in it; an empty nest
    // and none both leave fq_codel at its defaults.
    let tc = assert_sends_what_tc_sends("fq_codel", &ours, Options::Nested, |tc| {
        assert_eq!(tc.options.take(), Some(vec![]));
    });
    assert_eq!(parse_leaf(&tc), Some((0x11, Leaf::FqCodel)));
}

#[test]
fn u32_hash_tables() {
    // tc filter add dev d0 parent 5a: prio 10 protocol ip handle 10: u32 divisor 256
    let ours = u32_table(D0, Family::V4);
    assert_sends_what_tc_sends("u32_table_v4", &ours, Options::Nested, nothing);
    // tc filter add dev d0 parent 5a: prio 11 protocol ipv6 handle 11: u32 divisor 256
    let ours = u32_table(D0, Family::V6);
    assert_sends_what_tc_sends("u32_table_v6", &ours, Options::Nested, nothing);
}

#[test]
fn u32_links_hash_on_the_local_port() {
    // tc filter add dev d0 parent 5a: prio 10 protocol ip handle ::1 u32 link 10:
    //     hashkey mask 0x00ff0000 at 20 match u32 0 0
    let ours = u32_link(D0, Family::V4, Direction::Upload);
    assert_sends_what_tc_sends("u32_link_v4_upload", &ours, Options::Nested, nothing);
    // tc filter add dev d0 parent 5a: prio 11 protocol ipv6 handle ::1 u32 link 11:
    //     hashkey mask 0x000000ff at 40 match u32 0 0
    let ours = u32_link(D0, Family::V6, Direction::Download);
    assert_sends_what_tc_sends("u32_link_v6_download", &ours, Options::Nested, nothing);
}

#[test]
fn u32_entry_for_an_ipv4_upload() {
    // tc filter add dev d0 parent 5a: prio 10 protocol ip handle 10:34:7 u32 ht 10:34:
    //     match ip protocol 6 0xff match ip src 10.0.0.1/32 match ip dst 10.0.0.2/32
    //     match ip sport 4660 0xffff match ip dport 80 0xffff flowid 5a:42
    let tcp = socket(Proto::Tcp, "10.0.0.1:4660", "10.0.0.2:80");
    let (family, keys) = filter_keys(&tcp, Direction::Upload);
    let filter = Filter {
        family,
        keys,
        class: 0x42,
    };
    let fh = filter_handle(Family::V4.htid(), 4660 & 0xff, 7);
    let ours = u32_filter(D0, fh, &filter);
    let tc = assert_sends_what_tc_sends("u32_entry_v4", &ours, Options::Nested, nothing);
    assert_eq!(parse_u32_filter(&tc), Some((fh, filter)));
    // tc filter del dev d0 parent 5a: prio 10 protocol ip handle 10:34:7 u32
    let ours = u32_filter_delete(D0, fh, Family::V4);
    assert_sends_what_tc_sends("u32_entry_delete", &ours, Options::Nested, nothing);
}

#[test]
fn u32_entry_for_an_ipv6_download() {
    // tc filter add dev d0 parent 5a: prio 11 protocol ipv6 handle 11:50:1 u32 ht 11:50:
    //     match ip6 protocol 17 0xff match ip6 src fd00::2/128 match ip6 dst fd00::1/128
    //     match ip6 sport 443 0xffff match ip6 dport 4944 0xffff flowid 5a:43
    let udp = socket(Proto::Udp, "[fd00::1]:4944", "[fd00::2]:443");
    let (family, keys) = filter_keys(&udp, Direction::Download);
    let filter = Filter {
        family,
        keys,
        class: 0x43,
    };
    let fh = filter_handle(Family::V6.htid(), 4944 & 0xff, 1);
    let ours = u32_filter(D0, fh, &filter);
    let tc = assert_sends_what_tc_sends("u32_entry_v6", &ours, Options::Nested, nothing);
    assert_eq!(parse_u32_filter(&tc), Some((fh, filter)));
}

#[test]
fn ingress_qdisc_and_redirect() {
    // tc qdisc add dev d0 ingress
    assert_sends_what_tc_sends("ingress", &ingress(D0), Options::Nested, nothing);
    // tc filter add dev d0 parent ffff: prio 2 protocol all u32 match u32 0 0
    //     action mirred egress redirect dev i0 cookie 7368617065723a7265646972656374
    let ours = redirect_all(D0, I0);
    let tc = assert_sends_what_tc_sends("mirred", &ours, Options::Nested, nothing);
    assert_eq!(
        parse_redirect(&tc),
        Some(Redirect {
            to_ifindex: I0,
            marked: true,
            pref: REDIRECT_PREF,
        })
    );
}

#[test]
fn deletions() {
    // tc class del dev d0 parent 5a: classid 5a:10
    assert_sends_what_tc_sends(
        "class_delete",
        &class_delete(D0, 0x10),
        Options::Nested,
        nothing,
    );
    // tc qdisc del dev d0 root
    assert_sends_what_tc_sends("root_delete", &root_delete(D0), Options::Nested, nothing);
    // tc qdisc del dev d0 ingress
    // tc names the kind it expects to delete; shaper does not, because with --replace it
    // deletes whatever is at ingress (a foreign clsact too), and the kernel refuses a delete
    // whose kind does not match the qdisc.
    let tc = assert_sends_what_tc_sends(
        "ingress_delete",
        &ingress_delete(D0),
        Options::Nested,
        |tc| tc.attributes.retain(|(kind, _)| *kind != TCA_KIND),
    );
    assert_eq!(kind_of(&tc), Some("ingress"));
}
