//! Latency inside and between shaped classes, on a real kernel (run as root: it uses network
//! namespaces). `cargo bench --bench latency [-- FILTER]` prints, for 2 and 20 Mbit/s classes,
//! upload and download, with 1 and 4 iperf3 flows saturating the class: a 1-byte
//! request/response probe's round-trip time (median and p95) idle and under load when it shares
//! the class, the goodput as a fraction of the limit, and the spread of the flows' shares. Then
//! the same probe in a top-priority class while the bulk class saturates an 18 Mbit/s link.
//! Targets (issue 12): p95 ≤ 50 ms inside a 2 Mbit/s class, ≤ 5 ms in the top class, goodput
//! ≥ 0.93, 4 flows within ±20 % of each other.

#[path = "../tests/support/mod.rs"]
mod support;

use shaper::policy::Each;
use support::latency::{LoadResult, probe_under_load, top_priority_under_load};
use support::netns::NetnsPair;
use support::shaping::{Shaper, class, class_set, decision};

fn print(name: &str, limit: f64, r: &LoadResult) {
    let (lo, hi) = r
        .streams
        .iter()
        .fold((f64::MAX, 0.0_f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    let mean = r.streams.iter().sum::<f64>() / r.streams.len().max(1) as f64;
    println!(
        "{name:<28} idle {}\n{:<28} load {}\n{:<28} goodput {:.3} of {:.0} Mbit/s; flows {:.0}%..{:.0}% of their mean",
        r.idle,
        "",
        r.loaded,
        "",
        r.bulk.bits_per_second / limit,
        limit / 1e6,
        lo / mean * 100.0,
        hi / mean * 100.0,
    );
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    for mbit in [2u64, 20] {
        for download in [false, true] {
            for flows in [1u16, 4] {
                let name = format!(
                    "{mbit} Mbit/s {} {flows} flow{}",
                    if download { "down" } else { "up" },
                    if flows > 1 { "s" } else { "" }
                );
                if !wanted(&name) {
                    continue;
                }
                let pair = NetnsPair::new();
                let mut shaper = Shaper::new(&pair.a);
                let limit = format!("{mbit}mbit");
                let classes = class_set(vec![class("bulk", &limit, Each::Class)]);
                let r = probe_under_load(
                    &pair,
                    &mut shaper,
                    &classes,
                    decision("bulk", ""),
                    decision("bulk", ""),
                    flows,
                    download,
                );
                print(&name, mbit as f64 * 1e6, &r);
            }
        }
    }
    for download in [false, true] {
        let name = format!(
            "top prio, 18 Mbit/s link {}",
            if download { "down" } else { "up" }
        );
        if !wanted(&name) {
            continue;
        }
        let r = top_priority_under_load(download);
        print(&name, 18e6, &r);
    }
}
