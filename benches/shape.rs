//! The shaping backend's costs on a real kernel (run as root: it uses network namespaces).
//!
//! `cargo bench --bench shape [-- CONNECTIONS]` prints:
//! * small-packet (64-byte UDP) throughput of a classified flow with only its own filter, and
//!   with CONNECTIONS (default 10,000) other connection filters installed, and the ratio
//!   (target: at least 90 %);
//! * the netlink requests an unchanged cycle sends (target: 0);
//! * the time to install the CONNECTIONS filters, and to apply 1,000 new connections that each
//!   get their own limit (a class, a leaf queue and a filter in each direction).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use shaper::policy::{Decision, Each};
use shaper::scan::{Proto, Socket};
use shaper::shape::{TcBackend, reconcile};
use support::netns::NetnsPair;
use support::shaping::{Shaper, class, class_set, decision, flow};
use support::traffic::{Run, Server};

fn udp_small_packets(pair: &NetnsPair, cport: u16) -> f64 {
    let _server = Server::start(&pair.b, 5301);
    let mut run = Run::tcp(NetnsPair::b_addr(4), 5301, cport);
    run.seconds = 4;
    run.omit = 1;
    run.udp_rate = Some("0");
    run.length = Some(64);
    run.start(&pair.a).finish().bits_per_second
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![
        class("bulk", "", Each::Class),
        class("measured", "", Each::Class),
    ]);
    let measured: (Socket, Decision) = (
        flow(Proto::Udp, 4, 40000, 5301, 1),
        decision("measured", ""),
    );
    let others: Vec<(Socket, Decision)> = (0..n)
        .map(|i| {
            (
                flow(
                    Proto::Tcp,
                    4,
                    20000 + (i % 40000) as u16,
                    443 + (i / 40000) as u16,
                    10 + i as u64,
                ),
                decision("bulk", ""),
            )
        })
        .collect();
    let mut with_others = vec![measured.clone()];
    with_others.extend(others.iter().cloned());

    println!("shaping benchmark: {n} connection filters, 64-byte UDP through a namespace veth");
    let (mut alone, mut crowded, mut install) = (0f64, 0f64, f64::MAX);
    for _ in 0..2 {
        shaper.shape(&classes, std::slice::from_ref(&measured));
        alone = alone.max(udp_small_packets(&pair, 40000));
        let start = Instant::now();
        let ops = shaper.shape(&classes, &with_others);
        install = install.min(start.elapsed().as_secs_f64());
        assert!(ops >= 2 * n, "{ops} operations for {n} filters");
        crowded = crowded.max(udp_small_packets(&pair, 40000));
    }
    println!(
        "  throughput, own filter only           {:>8.1} Mbit/s",
        alone / 1e6
    );
    println!(
        "  throughput, {n} other filters     {:>8.1} Mbit/s",
        crowded / 1e6
    );
    println!(
        "  ratio                                 {:>8.1} %  (target >= 90 %)",
        100.0 * crowded / alone
    );
    println!(
        "  installing {n} filters (both directions): {:.2} s",
        install
    );

    let before = shaper.backend.requests_sent;
    let desired = shaper.desired(&classes, &with_others);
    let installed = shaper.backend.installed(NetnsPair::IFNAME).unwrap();
    let start = Instant::now();
    let plan = reconcile(NetnsPair::IFNAME, &desired, &installed, false).unwrap();
    let reconcile_time = start.elapsed();
    assert!(shaper.backend.apply(&plan).is_empty());
    println!(
        "  unchanged cycle: {} operations, {} netlink requests (reconcile of {} connections: {:.1} ms)",
        plan.ops.len(),
        shaper.backend.requests_sent - before,
        n + 1,
        reconcile_time.as_secs_f64() * 1e3
    );

    let mut grown = with_others.clone();
    grown.extend((0..1000).map(|i| {
        (
            flow(Proto::Tcp, 4, 60000 + i as u16, 8443, 1_000_000 + i as u64),
            decision("bulk", "1mbit"),
        )
    }));
    let before = shaper.backend.requests_sent;
    let start = Instant::now();
    let ops = shaper.shape(&classes, &grown);
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "  1,000 new connections with their own limit: {ops} operations, {} requests, {:.2} s ({:.2} ms per connection)",
        shaper.backend.requests_sent - before,
        elapsed,
        elapsed * 1e3 / 1000.0
    );
    shaper.clear();
}
