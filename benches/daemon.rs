//! The daemon under load (run as root): `shaper run` in a namespace with 1,000 and 10,000 open
//! connections, for two policies: examples/priorities.lua (classes by process, few filters) and
//! a policy giving every connection a limit of its own (a class, a queue and a filter per
//! connection and direction: the heaviest tree shaper builds).
//!
//! Each is measured with the u32 classifier (a filter per classified connection) and again
//! with the BPF classifier attached to a cgroup the bench creates (no per-connection filter; the
//! classifier's maps written after each apply).
//!
//! `cargo bench --bench daemon [-- CONNECTIONS]` prints, over 15 steady cycles, the CPU time per
//! cycle (user + system, from /proc), each stage's median wall time and share, and the peak RSS
//! (target: at most 30 MB at 10,000 connections).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::cgroup::TestCgroup;
use support::crowd::{self, Crowd};
use support::daemon::{DaemonProcess, cpu_ticks};
use support::netns::NetnsPair;

const CYCLES: u64 = 15;

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One daemon's steady cycles; with `bpf`, on the BPF classifier attached to that cgroup.
fn measure(pair: &NetnsPair, n: usize, name: &str, script: &Path, bpf: Option<&TestCgroup>) {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--script", script.to_str().unwrap(), "--interval", "1s"];
    // From the start: the first cycle (the whole tree's apply) runs before the socket answers.
    let started = Instant::now();
    let mut daemon = match bpf {
        Some(cgroup) => DaemonProcess::start_bpf(&pair.a, dir.path(), cgroup, &args),
        None => DaemonProcess::start(&pair.a, dir.path(), &args),
    };
    let name = format!("{name}, {}", if bpf.is_some() { "bpf" } else { "u32" });
    let pid = daemon.child.as_ref().unwrap().id();
    daemon.wait_for(120, "warm", |s| s["cycles"].as_u64().unwrap_or(0) >= 3);
    let first = started.elapsed();
    let (c0, t0) = (daemon.status()["cycles"].as_u64().unwrap(), cpu_ticks(pid));
    let mut stages: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut last = c0;
    while last < c0 + CYCLES {
        std::thread::sleep(Duration::from_millis(200));
        let s = daemon.status();
        let c = s["cycles"].as_u64().unwrap();
        if c != last {
            for (k, v) in s["stages_ms"].as_object().unwrap() {
                stages
                    .entry(k.clone())
                    .or_default()
                    .push(v.as_f64().unwrap());
            }
            last = c;
        }
    }
    let (c1, t1) = (daemon.status()["cycles"].as_u64().unwrap(), cpu_ticks(pid));
    let hz = 100.0; // USER_HZ
    let cpu_ms = (t1 - t0) as f64 / hz * 1000.0 / (c1 - c0) as f64;
    let total = median(stages["total"].clone());
    let mut shares: Vec<String> = ["scan", "lookup", "policy", "account", "shape"]
        .iter()
        .map(|k| {
            let m = median(stages[*k].clone());
            format!("{k} {m:.1} ms ({:.0}%)", 100.0 * m / total.max(1e-9))
        })
        .collect();
    shares.insert(0, format!("total {total:.1} ms"));
    println!(
        "  {n:>6} connections, {name:<27} CPU {cpu_ms:>6.1} ms/cycle, peak RSS {:>5.1} MiB, first 3 cycles {:.1} s",
        peak_rss_mib(pid),
        first.as_secs_f64()
    );
    println!("         stage medians: {}", shares.join(", "));
    daemon.signal(libc::SIGTERM);
}

fn main() {
    if crowd::serve_if_requested() {
        return;
    }
    let counts: Vec<usize> = match crowd::count_argument(0) {
        0 => vec![1_000, 10_000],
        n => vec![n],
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let each = dir.path().join("each-limited.lua");
    std::fs::write(
        &each,
        "function classify(conn) return nil, \"10mbit\" end\n",
    )
    .unwrap();
    println!(
        "daemon benchmark: shaper run (1 s cycle) in a namespace, {CYCLES} steady cycles each"
    );
    let cgroup = TestCgroup::new();
    for n in counts {
        let pair = NetnsPair::new();
        let _crowd = Crowd::open(&pair, n);
        let priorities = root.join("examples/priorities.lua");
        for bpf in [None, Some(&cgroup)] {
            measure(&pair, n, "priorities.lua", &priorities, bpf);
            measure(&pair, n, "a limit per connection", &each, bpf);
        }
    }
}
