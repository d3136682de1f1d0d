//! Policy cycle time: 10,000 connections through each example policy.
//!
//! `cargo bench --bench policy [-- CONNECTIONS]`. No root needed. Prints, for every policy in
//! examples/ and for a one-line policy (the engine's own cost), the median and worst time of a
//! whole cycle (ctx, classes, one classify call per connection, checking every answer) over 31
//! cycles. The target: 15 ms for 10,000 connections through a 30-line policy.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shaper::account::StaticUsage;
use shaper::policy::{CycleInput, Engine, EngineOptions, Script};
use shaper::process::{Connection, Owner, Process, Snapshot};
use shaper::scan::{Proto, Socket, State};

const RUNS: usize = 31;

/// A host with `n` connections spread over processes with realistic names and ancestry.
fn synthetic_snapshot(n: usize) -> Snapshot {
    let names = [
        "firefox",
        "Socket Process",
        "chrome",
        "ssh",
        "zoom",
        "transmission-da",
        "steam",
        "http",
        "syncthing",
        "spotify",
        "rsync",
        "curl",
        "python3",
        "discord",
        "apt-get",
        "nginx",
    ];
    let mut processes = BTreeMap::new();
    processes.insert(
        1,
        Process {
            pid: 1,
            ppid: 0,
            name: "systemd".into(),
            exe: Some("/usr/lib/systemd/systemd".into()),
            cmdline: vec!["/sbin/init".into()],
            uid: 0,
            user: Some("root".into()),
            gid: 0,
            cgroup: Some("/init.scope".into()),
            unit: Some("init.scope".into()),
            start_time: 1,
            ancestors: vec![],
        },
    );
    let pids: Vec<u32> = (0..names.len() as u32 * 3).map(|i| 1000 + i).collect();
    for (i, &pid) in pids.iter().enumerate() {
        let name = names[i % names.len()];
        let parent = if i >= names.len() {
            pids[i - names.len()]
        } else {
            1
        };
        let mut ancestors = vec![parent];
        if parent != 1 {
            ancestors.extend(processes[&parent].ancestors.iter().copied());
        }
        processes.insert(
            pid,
            Process {
                pid,
                ppid: parent,
                name: name.into(),
                exe: Some(format!("/usr/bin/{name}").into()),
                cmdline: vec![
                    format!("/usr/bin/{name}").into(),
                    "--some-flag".into(),
                    "value".into(),
                ],
                uid: 1000 + (i % 3) as u32,
                user: Some(["alice", "bob", "carol"][i % 3].into()),
                gid: 1000,
                cgroup: Some(format!(
                    "/user.slice/user-1000.slice/app-{name}-{pid}.scope"
                )),
                unit: Some(format!("app-{name}-{pid}.scope")),
                start_time: u64::from(pid),
                ancestors,
            },
        );
    }
    let ports = [443, 443, 80, 22, 8801, 51413, 443, 53, 22000, 4070];
    let connections = (0..n)
        .map(|i| {
            let v6 = i % 5 == 0;
            let (local, remote) = if v6 {
                (
                    format!("[2a02:8070::10]:{}", 30000 + i % 30000),
                    format!(
                        "[2a00:1450:4001::{:x}]:{}",
                        i % 4096,
                        ports[i % ports.len()]
                    ),
                )
            } else {
                (
                    format!("192.168.1.10:{}", 30000 + i % 30000),
                    format!(
                        "93.184.{}.{}:{}",
                        (i / 250) % 250,
                        i % 250,
                        ports[i % ports.len()]
                    ),
                )
            };
            Connection {
                socket: Socket {
                    proto: if i % 7 == 0 { Proto::Udp } else { Proto::Tcp },
                    local: local.parse().unwrap(),
                    remote: remote.parse().unwrap(),
                    state: State::Established,
                    uid: 1000,
                    inode: 100_000 + i as u64,
                    cookie: i as u64 + 1,
                    bytes_up: Some(i as u64 * 1000),
                    bytes_down: Some(i as u64 * 9000),
                },
                owner: (i % 50 != 0).then(|| Owner {
                    pid: pids[i % pids.len()],
                    others: vec![],
                }),
                remote_host: None,
            }
        })
        .collect();
    Snapshot {
        connections,
        processes,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn bench(name: &str, script: Script, snapshot: &Arc<Snapshot>, usage: &Arc<StaticUsage>) {
    let lines = script
        .source
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
        .count();
    let mut engine = Engine::from_script(script, EngineOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let now = jiff::Zoned::now();
    let mut samples: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let out = engine.run(CycleInput {
                rate: None,
                connection_rate: None,
                snapshot: snapshot.clone(),
                stats: Vec::new(),
                previous: Vec::new(),
                now: now.clone(),
                interface: Some("eth0".into()),
                usage: usage.clone(),
            });
            let elapsed = start.elapsed();
            assert!(
                out.failure.is_none() && out.fallbacks == 0,
                "{name}: {:?}",
                out.failure
            );
            elapsed
        })
        .collect();
    samples.sort();
    let median = samples[RUNS / 2];
    println!(
        "  {name:<24} {lines:>3} lines  median {:>9}  worst {:>9}  {:.2} µs/connection",
        ms(median),
        ms(samples[RUNS - 1]),
        median.as_secs_f64() * 1e6 / snapshot.connections.len() as f64
    );
}

fn main() {
    // Arguments: a connection count, and/or words selecting policies by name.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let filters: Vec<&String> = args
        .iter()
        .filter(|a| a.parse::<usize>().is_err())
        .collect();
    let selected =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let snapshot = Arc::new(synthetic_snapshot(n));
    let usage = Arc::new(StaticUsage::default());
    println!(
        "policy benchmark: {n} connections, {} processes, median of {RUNS} cycles",
        snapshot.processes.len()
    );
    let trivial = Script {
        path: "minimal.lua".into(),
        source: "function classify(conn, ctx) return nil end".into(),
    };
    if selected("minimal") {
        bench("minimal (engine cost)", trivial, &snapshot, &usage);
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "lua"))
        .collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !selected(&name) {
            continue;
        }
        bench(&name, Script::read(&path).unwrap(), &snapshot, &usage);
    }
}
