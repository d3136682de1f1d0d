//! Scan + process lookup against `ss`, on 10,000 real connections in a network namespace.
//!
//! `cargo bench --bench scan [-- CONNECTIONS]` (as root). Prints the median of each measurement,
//! the ratios the project targets (cold ≤ 0.5 × `ss -tanp`, steady ≤ 0.5 × `ss -tan`) and peak RSS.
//! `ss` is timed as a whole command with output to /dev/null, the way a shaper built on it would
//! pay for it; shaper's cycle is timed in-process.

#[path = "../tests/support/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use netns::NetnsPair;
use shaper::process::ProcessTable;
use shaper::scan::{self, Backend};

const RUNS: usize = 31;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Raises the soft open-file limit to the hard one (each process holds one side of the
/// connections, so the usual hard limit suffices).
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

/// The peer: run in namespace b as a child process, accepts and holds every connection until its
/// stdin closes. Prints `PORTS <v4> <v6>` once listening and `ACCEPTED` when all are in.
fn serve(v4: usize, v6: usize) {
    raise_fd_limit();
    let listeners: Vec<TcpListener> = [NetnsPair::b_addr(4), NetnsPair::b_addr(6)]
        .into_iter()
        .map(|ip| TcpListener::bind((ip, 0)).unwrap())
        .collect();
    println!(
        "PORTS {} {}",
        listeners[0].local_addr().unwrap().port(),
        listeners[1].local_addr().unwrap().port()
    );
    let held: Vec<TcpStream> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .zip([v4, v6])
            .map(|(l, n)| {
                s.spawn(move || (0..n).map(|_| l.accept().unwrap().0).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    println!("ACCEPTED {}", held.len());
    let _ = std::io::stdin().read_line(&mut String::new());
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
    let connections: usize = std::env::args()
        .skip(1)
        .take_while(|a| a != "--serve")
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--serve") {
        serve(args[at + 1].parse().unwrap(), args[at + 2].parse().unwrap());
        return;
    }
    let limit = raise_fd_limit();
    assert!(
        limit as usize > connections + 1000,
        "the open-file limit ({limit}) is too low for {connections} connections"
    );
    let pair = NetnsPair::new();

    // The peer process in b accepts and holds every connection; this process holds the client
    // ends in a (the scanned side).
    let v6 = connections / 5;
    let mut server = pair
        .b
        .command(std::env::current_exe().unwrap())
        .args(["--serve", &(connections - v6).to_string(), &v6.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start peer");
    let mut server_out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    server_out.read_line(&mut line).unwrap();
    let ports: Vec<u16> = line
        .strip_prefix("PORTS ")
        .expect("peer announces its ports")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let addrs = [
        SocketAddr::new(NetnsPair::b_addr(4), ports[0]),
        SocketAddr::new(NetnsPair::b_addr(6), ports[1]),
    ];
    let setup = Instant::now();
    let (clients, udp): (Vec<TcpStream>, Vec<UdpSocket>) = pair.a.run(|| {
        let mut clients = Vec::with_capacity(connections);
        for i in 0..connections {
            let addr = if i < connections - v6 {
                addrs[0]
            } else {
                addrs[1]
            };
            clients.push(TcpStream::connect(addr).expect("connect"));
        }
        let udp = (0..50)
            .map(|_| UdpSocket::bind((NetnsPair::A_V4, 0)).unwrap())
            .collect();
        (clients, udp)
    });
    line.clear();
    server_out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ACCEPTED"), "peer: {line}");
    eprintln!(
        "opened {} connections ({v6} IPv6) and {} UDP sockets in {:.1} s",
        clients.len(),
        udp.len(),
        setup.elapsed().as_secs_f64()
    );

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
    drop((clients, udp));
    drop(server.stdin.take());
    let _ = server.wait();
}
