//! The first-packet fast path under a stream of new connections (run as root): `shaper run
//! --classifier bpf` attached to a cgroup this bench creates, in a namespace pair, with a policy
//! giving every connection to port 5301 a class. A child process inside the cgroup opens and
//! closes TCP connections to a listener in the peer namespace at 100/s for 5 s, then at 1,000/s
//! for 5 s.
//!
//! `cargo bench --bench first_packet` prints, after each phase, the daemon's `fast_path` figures
//! from `status --json`: the p50/p99 time from the kernel reporting a socket to its decision
//! being in the classifier's maps (target: p99 ≤ 5 ms at 1,000/s), and the fast path's CPU time
//! per new connection; then, with the load stopped, the CPU time per steady cycle; then the
//! 64-byte UDP throughput of a socket the classifier puts in its class, with only the bench's
//! own connections in the connection map and with 10,000 more.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::cgroup::TestCgroup;
use support::crowd::{self, Crowd};
use support::daemon::DaemonProcess;
use support::netns::NetnsPair;
use support::traffic::{Run, Server};

const PORT: u16 = 5301;
const PHASE_SECS: u64 = 5;
const STEADY_CYCLES: u64 = 10;
/// Connections in the connection map for the crowded throughput figure.
const CROWD: usize = 10_000;

const POLICY: &str = r#"
classes = { new = { ceil = "100mbit" }, default = {} }
function classify(conn)
  if conn.remote_port == 5301 or conn.remote_port == 5302 then return "new" end
  return "default"
end
"#;

/// If started as the connecting child (`--connect ADDR RATE SECS`), opens and closes `RATE`
/// connections a second for `SECS` seconds (stopping by itself a few seconds late at most), and
/// returns `true`: the caller's `main` must then return.
fn connect_if_requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let Some(at) = args.iter().position(|a| a == "--connect") else {
        return false;
    };
    let addr: SocketAddr = args[at + 1].parse().unwrap();
    let rate: u64 = args[at + 2].parse().unwrap();
    let secs: u64 = args[at + 3].parse().unwrap();
    let total = rate * secs;
    let start = Instant::now();
    let give_up = start + Duration::from_secs(secs + 5);
    let (mut opened, mut failed) = (0u64, 0u64);
    for i in 0..total {
        let due = start + Duration::from_micros(i * 1_000_000 / rate);
        let now = Instant::now();
        if now > give_up {
            break;
        }
        if due > now {
            std::thread::sleep(due - now);
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                opened += 1;
                drop(s);
            }
            Err(_) => failed += 1,
        }
    }
    println!(
        "{opened} opened, {failed} failed in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    true
}

/// A listener in `b` that accepts (and closes) until dropped, so its backlog never fills.
struct Acceptor {
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Acceptor {
    fn start(pair: &NetnsPair) -> Acceptor {
        let listener = pair
            .b
            .run(|| TcpListener::bind((NetnsPair::B_V4, PORT)).expect("bind the listener"));
        // accept(2) honours SO_RCVTIMEO: the thread sees `stop` within 100 ms.
        socket2::SockRef::from(&listener)
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = listener.accept();
            }
        });
        Acceptor {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The daemon's `fast_path` figures: sockets, p50 µs, p99 µs, CPU µs per socket (cumulative).
fn fast_path(daemon: &DaemonProcess) -> (u64, u64, u64, f64) {
    let s = daemon.status();
    let f = &s["fast_path"];
    assert!(f.is_object(), "no fast_path in the status: {s}");
    (
        f["sockets"].as_u64().unwrap(),
        f["p50_us"].as_u64().unwrap_or(0),
        f["p99_us"].as_u64().unwrap_or(0),
        f["cpu_us_per_socket"].as_f64().unwrap_or(0.0),
    )
}

/// Runs and run time so far of each program attached to `cgroup`, by hook (the kernel's own
/// statistics, on while [`main`] holds its `enable_stats` descriptor).
fn program_stats(cgroup: &TestCgroup) -> Vec<(&'static str, u64, Duration)> {
    let ids = cgroup.attached_programs();
    let loaded: Vec<_> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .collect();
    ids.into_iter()
        .filter_map(|(hook, id)| {
            let p = loaded.iter().find(|p| p.id() == id)?;
            Some((hook, p.run_count(), p.run_time()))
        })
        .collect()
}

fn phase(pair: &NetnsPair, cgroup: &TestCgroup, daemon: &DaemonProcess, rate: u64) {
    let pid = daemon.child.as_ref().unwrap().id();
    let (s0, _, _, c0) = fast_path(daemon);
    let programs0 = program_stats(cgroup);
    let ticks0 = support::daemon::cpu_ticks(pid);
    let mut cmd = pair.a.command(std::env::current_exe().unwrap());
    cmd.args(["--connect", &format!("{}:{PORT}", NetnsPair::B_V4)])
        .args([rate.to_string(), PHASE_SECS.to_string()])
        .stdout(Stdio::piped());
    let procs = cgroup.enter(&mut cmd);
    let child = cmd.spawn().expect("start the connecting child");
    drop(procs);
    let out = child.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The last sockets' decisions: the fast path is at most a poll slice behind.
    std::thread::sleep(Duration::from_millis(500));
    let (s1, p50, p99, c1) = fast_path(daemon);
    let ticks1 = support::daemon::cpu_ticks(pid);
    let programs1 = program_stats(cgroup);
    let sockets = s1 - s0;
    let cpu_us = if sockets > 0 {
        (c1 * s1 as f64 - c0 * s0 as f64) / sockets as f64
    } else {
        0.0
    };
    // Everything the daemon did meanwhile (its cycles too), per connection.
    let process_us = (ticks1 - ticks0) as f64 * 10_000.0 / sockets.max(1) as f64;
    println!(
        "  {rate:>5}/s for {PHASE_SECS} s ({summary}): {sockets} sockets, report to decision \
         p50 {:.2} ms, p99 {:.2} ms; fast-path CPU {cpu_us:.0} µs/connection \
         (whole daemon {process_us:.0} µs/connection)",
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0,
    );
    // The kernel's side, per connection: every program run its packets and state changes cost
    // (sock_ops runs at each state change, the close report among them; sock_release at the
    // socket's end).
    let per = |d: Duration| d.as_nanos() as f64 / 1000.0 / sockets.max(1) as f64;
    let mut total = Duration::ZERO;
    let mut parts = Vec::new();
    for ((hook, runs1, time1), (_, runs0, time0)) in programs1.iter().zip(&programs0) {
        let (runs, time) = (runs1 - runs0, *time1 - *time0);
        total += time;
        parts.push(format!(
            "{hook} {:.1} runs {:.2} µs",
            runs as f64 / sockets.max(1) as f64,
            per(time)
        ));
    }
    println!(
        "    kernel: {:.2} µs of BPF per connection ({})",
        per(total),
        parts.join(", ")
    );
}

/// Receiver goodput of 64-byte UDP from a client in `cgroup` to port 5302 (class `new`), best
/// of two 4 s runs.
fn udp_small_packets(pair: &NetnsPair, cgroup: &TestCgroup) -> f64 {
    let mut run = Run::tcp(NetnsPair::b_addr(4), 5302, 40000);
    run.seconds = 4;
    run.omit = 1;
    run.udp_rate = Some("0");
    run.length = Some(64);
    (0..2)
        .map(|_| {
            // The server serves one client.
            let _server = Server::start(&pair.b, 5302);
            run.start_in(&pair.a, cgroup).finish().bits_per_second
        })
        .fold(0.0, f64::max)
}

/// Connections the daemon's last cycle counted in its classes.
fn tracked(daemon: &DaemonProcess) -> u64 {
    daemon.status()["classes"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["connections"].as_u64()).sum())
        .unwrap_or(0)
}

fn map_size(pair: &NetnsPair, cgroup: &TestCgroup, daemon: &DaemonProcess) {
    let alone = udp_small_packets(pair, cgroup);
    let tracked_alone = tracked(daemon);
    let _crowd = Crowd::open(pair, CROWD);
    let c0 = daemon.status()["cycles"].as_u64().unwrap();
    // Two whole cycles after the crowd opened: its connections are in the map.
    daemon.wait_for(120, "cycles with the crowd", |s| {
        s["cycles"].as_u64().unwrap() >= c0 + 3
    });
    let crowded = udp_small_packets(pair, cgroup);
    println!(
        "  64-byte UDP through a classified socket: {:.1} Mbit/s with {tracked_alone} \
         connections tracked, {:.1} Mbit/s with {} ({:.1} %)",
        alone / 1e6,
        crowded / 1e6,
        tracked(daemon),
        100.0 * crowded / alone
    );
}

fn main() {
    if connect_if_requested() || crowd::serve_if_requested() {
        return;
    }
    // The kernel counts programs' runs and run time while this descriptor is open (Linux 5.8).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| eprintln!("no BPF run-time statistics ({e}): the kernel figures read 0"))
        .ok();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    std::fs::write(&script, POLICY).unwrap();
    let _acceptor = Acceptor::start(&pair);
    let daemon = DaemonProcess::start_bpf(
        &pair.a,
        dir.path(),
        &cgroup,
        &["--script", script.to_str().unwrap(), "--interval", "1s"],
    );
    daemon.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
    println!(
        "first-packet benchmark: shaper run --classifier bpf (1 s cycle), new TCP connections \
         from a process in its cgroup; p50/p99 over the phase's last 4,096 sockets"
    );
    for rate in [100, 1_000] {
        phase(&pair, &cgroup, &daemon, rate);
    }
    let pid = daemon.child.as_ref().unwrap().id();
    let c0 = daemon.status()["cycles"].as_u64().unwrap();
    let t0 = support::daemon::cpu_ticks(pid);
    daemon.wait_for(STEADY_CYCLES + 5, "steady cycles", |s| {
        s["cycles"].as_u64().unwrap() >= c0 + STEADY_CYCLES
    });
    let c1 = daemon.status()["cycles"].as_u64().unwrap();
    let t1 = support::daemon::cpu_ticks(pid);
    println!(
        "  load stopped: CPU {:.2} ms per steady cycle over {} cycles",
        (t1 - t0) as f64 * 10.0 / (c1 - c0) as f64,
        c1 - c0
    );
    map_size(&pair, &cgroup, &daemon);
}
