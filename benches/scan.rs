//! Scan + process lookup against `ss`, on 10,000 real connections in a network namespace.
//!
//! `cargo bench --bench scan [-- CONNECTIONS]` (as root). Prints the median of each measurement,
//! the ratios the project targets (cold ≤ 0.5 × `ss -tanp`, steady ≤ 0.5 × `ss -tan`) and peak RSS.
//! `ss` is timed as a whole command with output to /dev/null, the way a shaper built on it would
//! pay for it; shaper's cycle is timed in-process.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use shaper::process::ProcessTable;
use shaper::scan::{self, Backend};
use support::crowd::{self, Crowd};
use support::netns::NetnsPair;

const RUNS: usize = 31;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

fn main() {
    if crowd::serve_if_requested() {
        return;
    }
    let connections = crowd::count_argument(10_000);
    let pair = NetnsPair::new();
    let crowd = Crowd::open(&pair, connections);
    let (clients, udp, v6) = (&crowd.clients, &crowd.udp, crowd.v6);

    // A netlink socket stays in the namespace it was created in, whichever thread uses it.
    let mut source = pair.a.run(|| scan::open(Backend::Diag).unwrap());
    let mut table = ProcessTable::new();
    table.update(&source.scan().unwrap());
    let found = {
        let sockets = source.scan().unwrap();
        sockets
            .iter()
            .filter(|s| table.owner(s.inode).is_some())
            .count()
    };
    let ss = |args: &str| {
        let start = Instant::now();
        let status = pair
            .a
            .command("ss")
            .arg(args)
            .stdout(Stdio::null())
            .status()
            .expect("run ss (install iproute2)");
        assert!(status.success());
        start.elapsed()
    };
    // Interleaved, so a burst of load elsewhere on the machine hits every measurement alike.
    let mut samples: [Vec<Duration>; 6] = Default::default();
    for _ in 0..RUNS {
        let start = Instant::now();
        let sockets = source.scan().unwrap();
        ProcessTable::new().update(&sockets);
        samples[0].push(start.elapsed());

        let start = Instant::now();
        let sockets = source.scan().unwrap();
        let scanned = Instant::now();
        let stats = table.update(&sockets);
        samples[1].push(start.elapsed());
        samples[2].push(scanned - start);
        samples[3].push(scanned.elapsed());
        assert!(!stats.walked, "a steady cycle must not walk /proc");

        samples[4].push(ss("-tan"));
        samples[5].push(ss("-tanp"));
    }
    let [cold, steady, scan_only, lookup, ss_tan, ss_tanp] = samples.map(median);

    println!(
        "shaper scan benchmark: {} TCP connections ({v6} IPv6) + {} UDP sockets in a namespace, median of {RUNS}",
        clients.len(),
        udp.len()
    );
    println!("  sockets attributed to their process: {found}");
    println!(
        "  (a) cold cycle, scan + lookup, empty cache   {:>10}",
        ms(cold)
    );
    println!(
        "  (b) steady cycle, scan + lookup, warm cache  {:>10}",
        ms(steady)
    );
    println!(
        "      the scan alone                           {:>10}",
        ms(scan_only)
    );
    println!(
        "      the lookup alone (cache check)           {:>10}",
        ms(lookup)
    );
    println!(
        "  (c) ss -tan                                  {:>10}",
        ms(ss_tan)
    );
    println!(
        "  (d) ss -tanp                                 {:>10}",
        ms(ss_tanp)
    );
    println!(
        "  cold / ss -tanp   = {:.2}  (target <= 0.5)",
        cold.as_secs_f64() / ss_tanp.as_secs_f64()
    );
    println!(
        "  steady / ss -tan  = {:.2}  (target <= 0.5)",
        steady.as_secs_f64() / ss_tan.as_secs_f64()
    );
    println!(
        "  peak RSS of the benchmark process: {:.1} MiB (it also holds the {} client sockets)",
        peak_rss_kib() as f64 / 1024.0,
        clients.len()
    );
    drop(crowd);
}
