//! Rates measured through shaper's trees with iperf3 in a namespace pair. A test binary of its
//! own: cargo runs test binaries one after another, so these measurements never share the two
//! cores with the rest of the suite, and `rate_lock` runs them one at a time within it.

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use shaper::policy::{ClassSet, Each};
use shaper::scan::Proto;
use shaper::shape::Op;

use support::netns::NetnsPair;
use support::shaping::{Shaper, class, class_set, decision, flow};
use support::traffic::{Run, Server, rate_lock};

fn assert_within(what: &str, measured: f64, limit: f64, low: f64, high: f64) {
    let ratio = measured / limit;
    eprintln!(
        "measured {what}: {:.3} Mbit/s = {:.1}% of {:.1} Mbit/s",
        measured / 1e6,
        ratio * 100.0,
        limit / 1e6
    );
    assert!(
        (low..=high).contains(&ratio),
        "{what}: {:.3} Mbit/s is {:.1}% of the {:.1} Mbit/s limit (expected {:.0}-{:.0}%)",
        measured / 1e6,
        ratio * 100.0,
        limit / 1e6,
        low * 100.0,
        high * 100.0
    );
}

fn limited_run(family: u8, proto: Proto, reverse: bool, limit: &str) -> f64 {
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let (port, cport) = (5201, 40100);
    let flows = vec![(
        flow(proto, family, cport, port, 1),
        decision("default", limit),
    )];
    shaper.shape(&ClassSet::default(), &flows);
    let _server = Server::start(&pair.b, port);
    let mut run = Run::tcp(NetnsPair::b_addr(family), port, cport);
    // TCP hands the qdisc GSO packets of up to ~64 KB, a quarter second each at 2 Mbit/s, so
    // the receiver's byte count moves in such steps: ten measured seconds keep one step under
    // 2.5 % of the result (five gave 92-95.5 % for the same IPv6 flow). The first three seconds
    // are left out (two omitted, one cut by iperf3, see `Measurement::finish`): HTB's bursts
    // (60 KB at least, a class and its parent) let the receiver see up to 1.46 Mbit/s in the
    // second after a 1 Mbit/s flow started.
    run.seconds = 13;
    run.omit = 2;
    run.reverse = reverse;
    if proto == Proto::Udp {
        run.udp_rate = Some("10M");
    }
    let result = run.start(&pair.a).finish();
    eprintln!(
        "receiver's seconds, Mbit/s: {:.3?}; retransmits: {}",
        result.intervals.iter().map(|b| b / 1e6).collect::<Vec<_>>(),
        result.json["end"]["sum_sent"]["retransmits"]
    );
    result.bits_per_second
}

#[test]
fn upload_limit_on_one_tcp_connection() {
    let _serial = rate_lock();
    let measured = limited_run(4, Proto::Tcp, false, "2mbit:unlimited");
    assert_within("TCP upload", measured, 2e6, 0.93, 1.01);
}

#[test]
fn download_limit_through_the_ifb() {
    let _serial = rate_lock();
    let measured = limited_run(4, Proto::Tcp, true, "unlimited:4mbit");
    assert_within("TCP download", measured, 4e6, 0.90, 1.01);
}

#[test]
fn upload_limit_over_ipv6() {
    let _serial = rate_lock();
    let measured = limited_run(6, Proto::Tcp, false, "2mbit:unlimited");
    // Limits count bytes on the wire. IPv6's header is 20 bytes longer than IPv4's, so TCP
    // goodput tops out at 1428/1514 = 94.3 % of the limit (IPv4: 1448/1514 = 95.6 %); 93 %
    // would leave 1.3 points for measurement, so the floor is 92 %.
    assert_within("TCP/IPv6 upload", measured, 2e6, 0.92, 1.01);
}

#[test]
fn download_limit_over_ipv6() {
    let _serial = rate_lock();
    let measured = limited_run(6, Proto::Tcp, true, "unlimited:4mbit");
    assert_within("TCP/IPv6 download", measured, 4e6, 0.90, 1.01);
}

#[test]
fn udp_upload_and_download_limits() {
    let _serial = rate_lock();
    let up = limited_run(4, Proto::Udp, false, "2mbit:unlimited");
    assert_within("UDP upload", up, 2e6, 0.90, 1.01);
    let down = limited_run(4, Proto::Udp, true, "unlimited:4mbit");
    assert_within("UDP download", down, 4e6, 0.90, 1.01);
}

#[test]
fn two_classes_get_their_own_limits_at_once() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![
        class("slow", "2mbit", Each::Class),
        class("fast", "6mbit", Each::Class),
    ]);
    let flows = vec![
        (flow(Proto::Tcp, 4, 40201, 5202, 1), decision("slow", "")),
        (flow(Proto::Tcp, 4, 40202, 5203, 2), decision("fast", "")),
    ];
    shaper.shape(&classes, &flows);
    let _s1 = Server::start(&pair.b, 5202);
    let _s2 = Server::start(&pair.b, 5203);
    // Ten measured seconds, as in `limited_run`: at 1 Mbit/s over five (the first version of
    // this test) one 64 KB GSO packet is 10 % of the result, and it measured 91.9-97.7 %.
    let run = |port, cport| {
        let mut run = Run::tcp(NetnsPair::b_addr(4), port, cport);
        run.seconds = 11;
        run.start(&pair.a)
    };
    let (slow, fast) = (run(5202, 40201), run(5203, 40202));
    let (slow, fast) = (slow.finish(), fast.finish());
    assert_within("slow class", slow.bits_per_second, 2e6, 0.90, 1.01);
    assert_within("fast class", fast.bits_per_second, 6e6, 0.90, 1.01);
}

/// Bytes each HTB class of `veth0` in `ns` has sent, by minor (from `tc -s class show`: this
/// iproute2 prints no JSON for classes).
fn class_bytes(ns: &support::netns::Netns) -> std::collections::BTreeMap<u16, u64> {
    class_bytes_on(ns, "veth0")
}

/// [`class_bytes`] of any device in `ns` (the IFB of a download).
fn class_bytes_on(
    ns: &support::netns::Netns,
    device: &str,
) -> std::collections::BTreeMap<u16, u64> {
    let out = ns
        .command("tc")
        .args(["-s", "class", "show", "dev", device])
        .output()
        .expect("tc");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bytes = std::collections::BTreeMap::new();
    let mut minor = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("class"), Some("htb"), Some(handle)) => {
                minor = handle
                    .strip_prefix("5a:")
                    .and_then(|m| u16::from_str_radix(m, 16).ok());
            }
            (Some("Sent"), Some(n), Some("bytes")) => {
                if let (Some(m), Ok(n)) = (minor.take(), n.parse()) {
                    bytes.insert(m, n);
                }
            }
            _ => {}
        }
    }
    bytes
}

/// Unclassified traffic next to limited connections goes to `default`, whose leaf counts it
/// all, and none of it to the limited class. (Its speed is the shape benchmark's business: a
/// Gbit/s comparison on a shared machine measures the machine, and failed a clean CI run.)
#[test]
fn unclassified_traffic_goes_to_default() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![class("bulk", "1mbit", Each::Class)]);
    // Other connections are limited; the measured one is not classified at all.
    let others = [(flow(Proto::Tcp, 4, 40999, 443, 7), decision("bulk", ""))];
    shaper.shape(&classes, &others);
    let tree = shaper.desired(&classes, &others).upload;
    let bulk = *tree
        .classes
        .iter()
        .find(|(_, c)| c.label == "bulk")
        .expect("the bulk class")
        .0;
    let before = class_bytes(&pair.a);
    let _server = Server::start(&pair.b, 5204);
    let mut run = Run::tcp(NetnsPair::b_addr(4), 5204, 40301);
    run.seconds = 2;
    let result = run.start(&pair.a).finish();
    let sent = result.json["end"]["sum_sent"]["bytes"].as_u64().unwrap();
    let after = class_bytes(&pair.a);
    let grew = |minor: u16| after.get(&minor).unwrap_or(&0) - before.get(&minor).unwrap_or(&0);
    eprintln!(
        "measured unclassified: {} bytes sent at {:.0} Mbit/s; default leaf 5a:{:x} counted {}, \
         bulk 5a:{bulk:x} {}",
        sent,
        result.bits_per_second / 1e6,
        tree.default_minor,
        grew(tree.default_minor),
        grew(bulk)
    );
    assert!(sent > 1_000_000, "a real transfer: {sent} bytes");
    assert!(
        grew(tree.default_minor) >= sent,
        "the default leaf counts every byte (headers included): {} of {sent}",
        grew(tree.default_minor)
    );
    assert_eq!(grew(bulk), 0, "nothing went to the limited class");
}

#[test]
fn a_changed_limit_applies_in_place_without_resetting_the_connection() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let flows = vec![(flow(Proto::Tcp, 4, 40401, 5205, 1), decision("bulk", ""))];
    // At 8 Mbit/s a 64 KB GRO/GSO packet is 6.5 % of a second, so per-second figures mean
    // something (at 2 Mbit/s one packet is a quarter of one).
    shaper.shape(
        &class_set(vec![class("bulk", "8mbit", Each::Class)]),
        &flows,
    );
    let _server = Server::start(&pair.b, 5205);
    // Download (-R), so the client's per-second figures are the receiver's.
    let mut run = Run::tcp(NetnsPair::b_addr(4), 5205, 40401);
    run.reverse = true;
    run.seconds = 9;
    let measurement = run.start(&pair.a);
    std::thread::sleep(Duration::from_millis(4_000));
    let plan = shaper.apply(
        &class_set(vec![class("bulk", "16mbit", Each::Class)]),
        &flows,
    );
    assert!(
        plan.ops
            .iter()
            .all(|op| matches!(op, Op::ChangeClass { .. } | Op::AddLeaf { .. })),
        "only class changes and leaf resizes, nothing deleted or re-added:\n{plan}"
    );
    let result = measurement.finish(); // panics if iperf3 lost its connection
    eprintln!("intervals: {:?}", result.intervals);
    let i = &result.intervals;
    assert!(i.len() >= 7, "{i:?}");
    // Per-second figures still move in packet-sized steps: compare two-second averages. Each
    // ceiling holds; and the second lets through what the first could not (10 % over it), so
    // the change took. How near a flow comes to its ceiling is the benchmark's business: a
    // loaded machine's retransmission timeouts cost a second its tenth.
    let early = (i[1] + i[2]) / 2.0;
    let late = (i[i.len() - 2] + i[i.len() - 1]) / 2.0;
    assert_within("before the change", early, 8e6, 0.0, 1.02);
    assert_within("after the change", late, 16e6, 0.0, 1.02);
    assert!(
        late > 8e6 * 1.1,
        "after the change the flow passes the old 8 Mbit/s ceiling: {:.3} Mbit/s",
        late / 1e6
    );
}

// ---- the daemon end to end ---------------------------------------------------------------

use support::daemon::DaemonProcess;

/// iperf3 under another name, so a policy can tell the two clients apart.
fn renamed_iperf3(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let which = std::process::Command::new("sh")
        .args(["-c", "command -v iperf3"])
        .output()
        .unwrap();
    let original = String::from_utf8_lossy(&which.stdout).trim().to_string();
    let copy = dir.join(name);
    std::fs::copy(&original, &copy).unwrap_or_else(|e| panic!("copy {original}: {e}"));
    copy
}

#[test]
fn daemon_limits_a_named_process_and_leaves_another_alone() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        "function classify(conn, ctx)\n\
         \x20 local p = conn.process\n\
         \x20 if p and p.name == \"iperf3-slow\" then return nil, { up = \"2mbit\", down = \"4mbit\" } end\n\
         \x20 return nil\n\
         end\n",
    )
    .unwrap();
    let slow_iperf = renamed_iperf3(dir.path(), "iperf3-slow");
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--script", script.to_str().unwrap()]);
    daemon.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
    let measure = |program: &std::path::Path, port: u16, reverse: bool| {
        let _server = Server::start(&pair.b, port);
        let mut cmd = pair.a.command(program);
        cmd.args(["-c", &NetnsPair::B_V4.to_string(), "-p", &port.to_string()])
            // The daemon classifies a new connection within a cycle (200 ms): leave out 2 s.
            .args(["-t", "12", "-O", "2", "-J"]);
        if reverse {
            cmd.arg("-R");
        }
        let out = cmd.output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .expect("iperf3 result")
    };
    let up = measure(&slow_iperf, 5401, false);
    // One 64 KB GSO packet is 2.6 % of ten seconds at 2 Mbit/s: 92 % leaves room for one.
    assert_within("named process upload", up, 2e6, 0.92, 1.01);
    let down = measure(&slow_iperf, 5402, true);
    assert_within("named process download", down, 4e6, 0.90, 1.01);
    let other = measure(std::path::Path::new("iperf3"), 5403, false);
    eprintln!("measured other process: {:.0} Mbit/s", other / 1e6);
    assert!(
        other > 100e6,
        "the other process is not limited: {:.1} Mbit/s",
        other / 1e6
    );
}

#[test]
fn a_quota_slows_down_and_survives_sigkill() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        "local shaper = require(\"shaper\")\n\
         function classify(conn, ctx)\n\
         \x20 if ctx.usage(\"day\").total > 20 * shaper.MB then return nil, \"1mbit\" end\n\
         \x20 return nil\n\
         end\n",
    )
    .unwrap();
    // The measured connections are new ones: on the u32 path each would run unshaped until the
    // next scan, and the burst of that first cycle overflows its 1 Mbit/s leaf now and then
    // (seen as 70 % of the limit, a retransmission stall, in one full run of three). What is
    // measured here is the quota, so the connections are shaped from their first packet.
    let cgroup = TestCgroup::new();
    let args = ["--script", script.to_str().unwrap()];
    let mut daemon = DaemonProcess::start_bpf(&pair.a, dir.path(), &cgroup, &args);
    daemon.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
    // 30 MB unshaped: past the quota.
    let _server = Server::start(&pair.b, 5501);
    let out = pair
        .a
        .command("iperf3")
        .args([
            "-c",
            &NetnsPair::B_V4.to_string(),
            "-p",
            "5501",
            "-n",
            "30M",
            "-J",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let day = |s: &serde_json::Value| {
        let u = &s["usage"]["day"];
        u["up"].as_u64().unwrap() + u["down"].as_u64().unwrap()
    };
    // Past the policy's 20 MB (what the rest is about). Not "all 30 MiB": once, in a full run,
    // veth0 sent only 29.8 MB of them (iperf3 closes when it has written its bytes, and what
    // its socket still held may go unsent); the link figure is the device's own counter.
    daemon.wait_for(5, "the quota passed", |s| day(s) > 20 * 1024 * 1024);
    let slowed = {
        let _server = Server::start(&pair.b, 5502);
        let mut run = Run::tcp(NetnsPair::b_addr(4), 5502, 40502);
        run.seconds = 12;
        run.omit = 2;
        run.start_in(&pair.a, &cgroup).finish().bits_per_second
    };
    assert_within("after the quota", slowed, 1e6, 0.85, 1.01);
    // What is counted now is in the next save of usage.ron (every second): waited for by the
    // file's time, not a sleep, before the kill.
    let counted = day(&daemon.status());
    let usage = dir.path().join("state/usage.ron");
    let modified = || std::fs::metadata(&usage).and_then(|m| m.modified()).ok();
    let asked = std::time::SystemTime::now();
    let deadline = std::time::Instant::now() + support::daemon::allowance(2);
    while modified().is_none_or(|t| t <= asked) {
        assert!(std::time::Instant::now() < deadline, "usage.ron not saved");
        std::thread::sleep(Duration::from_millis(20));
    }
    let exit = daemon.signal(libc::SIGKILL);
    assert!(!exit.success());
    let restarted = DaemonProcess::start_bpf(&pair.a, dir.path(), &cgroup, &args);
    restarted.wait_for(10, "shaping again", |s| {
        s["interfaces"][0]["state"] == "shaping"
    });
    let resumed = day(&restarted.status());
    eprintln!("usage before SIGKILL {counted} B, after restart {resumed} B");
    assert!(
        resumed >= counted && resumed > 20_000_000,
        "{resumed} vs {counted}"
    );
    let again = {
        let _server = Server::start(&pair.b, 5503);
        let mut run = Run::tcp(NetnsPair::b_addr(4), 5503, 40503);
        run.seconds = 12;
        run.omit = 2;
        run.start_in(&pair.a, &cgroup).finish().bits_per_second
    };
    assert_within("after the restart", again, 1e6, 0.85, 1.01);
}

// ---- the first-packet classifier ---------------------------------------------------------

use std::io::{Read, Write};

use support::cgroup::TestCgroup;

/// Set in the child that makes the transfers: `ADDR COUNT BYTES up|down`.
const TRANSFERS_ENV: &str = "SHAPER_RATES_TRANSFERS";

/// Not a test: the body of the child process `sequential_transfers` starts (this binary,
/// re-executed in the test's cgroup and namespace). It makes COUNT connections one after
/// another, each moving BYTES one way, and prints the seconds they took in all.
#[test]
#[ignore = "run by sequential_transfers in a child process"]
fn transfers_child() {
    let Ok(spec) = std::env::var(TRANSFERS_ENV) else {
        return;
    };
    let f: Vec<&str> = spec.split_whitespace().collect();
    let (addr, count, bytes, up): (std::net::SocketAddr, usize, usize, bool) = (
        f[0].parse().unwrap(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3] == "up",
    );
    let payload = vec![0x5a_u8; bytes];
    let mut total = Duration::ZERO;
    for _ in 0..count {
        let started = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut sink = Vec::new();
        if up {
            s.write_all(&payload).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        // Up: the server closes once it has read everything; down: once it has sent it.
        s.read_to_end(&mut sink).unwrap();
        total += started.elapsed();
    }
    println!("TRANSFERS {}", total.as_secs_f64());
}

/// COUNT sequential transfers of BYTES by one process started after the daemon, in `cgroup`:
/// the average rate, bits per second, over the time the transfers took.
fn sequential_transfers(
    pair: &NetnsPair,
    cgroup: &TestCgroup,
    host: std::net::IpAddr,
    port: u16,
    count: usize,
    bytes: usize,
    up: bool,
) -> f64 {
    let exe = std::env::current_exe().unwrap();
    transfers_by(
        pair.a.command(exe),
        pair,
        cgroup,
        host,
        port,
        count,
        bytes,
        up,
    )
}

/// [`sequential_transfers`] by the child `cmd` starts (this binary, or a command that runs it).
#[allow(clippy::too_many_arguments)]
fn transfers_by(
    mut cmd: std::process::Command,
    pair: &NetnsPair,
    cgroup: &TestCgroup,
    host: std::net::IpAddr,
    port: u16,
    count: usize,
    bytes: usize,
    up: bool,
) -> f64 {
    let listener = pair
        .b
        .run(|| std::net::TcpListener::bind((host, port)).unwrap());
    let server = std::thread::spawn(move || {
        let payload = vec![0xa5_u8; bytes];
        for _ in 0..count {
            let (mut s, _) = listener.accept().unwrap();
            if up {
                let mut sink = Vec::new();
                s.read_to_end(&mut sink).unwrap();
                assert_eq!(sink.len(), bytes);
            } else {
                s.write_all(&payload).unwrap();
            }
        }
    });
    cmd.args(["--exact", "transfers_child", "--ignored", "--nocapture"])
        .env(
            TRANSFERS_ENV,
            format!(
                "{} {count} {bytes} {}",
                std::net::SocketAddr::new(host, port),
                if up { "up" } else { "down" }
            ),
        )
        .stderr(std::process::Stdio::null());
    let procs = cgroup.enter(&mut cmd);
    let out = cmd.output().unwrap();
    drop(procs);
    server.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text
        .lines()
        .find_map(|l| l.split("TRANSFERS ").nth(1))
        .unwrap_or_else(|| panic!("the child printed no result: {text}"))
        .trim()
        .parse()
        .unwrap();
    (count * bytes * 8) as f64 / secs
}

/// The limits of issue 11's acceptance: 2 Mbit/s up and 4 Mbit/s down for connections to ports
/// 5601-5699 (TCP or UDP), on a 100 Mbit/s link; UDP to 5690-5699 gets 3 Mbit/s both ways.
const FIRST_PACKET_POLICY: &str = r#"
classes = {
  slow = { ceil = { up = "2mbit", down = "4mbit" } },
  udp = { ceil = "3mbit" },
  default = {},
}
function classify(conn)
  local p = conn.remote_port
  if p >= 5690 and p <= 5699 then return "udp" end
  if p >= 5601 and p <= 5689 then return "slow" end
  if conn.process and conn.process.name == "iperf3" then return "slow" end
  return "default"
end
"#;

/// A daemon on the BPF classifier with [`FIRST_PACKET_POLICY`], shaping `pair.a`'s veth0.
fn first_packet_daemon(
    pair: &NetnsPair,
    cgroup: &TestCgroup,
    dir: &std::path::Path,
) -> DaemonProcess {
    DaemonProcess::start_bpf_policy(
        &pair.a,
        dir,
        cgroup,
        FIRST_PACKET_POLICY,
        &["--uplink", "100mbit", "--downlink", "100mbit"],
    )
}

/// Issue 11's acceptance: a process started after the daemon, limited to 2 Mbit/s up and
/// 4 Mbit/s down on a 100 Mbit/s link, makes 40 sequential 256 KB transfers each way; with the
/// first-packet classifier they average at most 1.15× the limit (with a cycle's scan alone,
/// each transfer would mostly be over before its connection is found: 4-8× the limit).
fn short_transfers_stay_within_the_limit(family: u8) {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let _daemon = first_packet_daemon(&pair, &cgroup, dir.path());
    let server = NetnsPair::b_addr(family);
    let up = sequential_transfers(&pair, &cgroup, server, 5601, 40, 256 * 1024, true);
    let down = sequential_transfers(&pair, &cgroup, server, 5602, 40, 256 * 1024, false);
    let what = format!("IPv{family}: 40 short");
    assert_within(
        &format!("{what} uploads of a new process"),
        up,
        2e6,
        0.5,
        1.15,
    );
    assert_within(&format!("{what} downloads"), down, 4e6, 0.5, 1.15);
}

#[test]
fn short_transfers_of_a_new_process_stay_within_its_limit() {
    short_transfers_stay_within_the_limit(4);
}

#[test]
fn short_transfers_over_ipv6_stay_within_the_limit() {
    short_transfers_stay_within_the_limit(6);
}

/// Issue 21's acceptance: the daemon in a PID namespace of its own (`unshare --pid --fork
/// --mount-proc`, as in a container), and a process started after it in that namespace, in a
/// class by its name alone (no port in the policy): its 40 sequential 256 KB transfers each way
/// average at most 1.15× its limit, and its bytes are charged to it. The kernel reports the
/// process by its host pid, which names no process in the daemon's `/proc`: before the owner
/// was found by the socket, they ran at 24× (down) and 48× (up) the limit.
#[test]
fn short_transfers_of_a_new_process_in_the_daemons_pid_namespace_stay_within_its_limit() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // The process's name: its executable's, as the kernel keeps it (15 bytes at most).
    let name: String = exe
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .chars()
        .take(15)
        .collect();
    let policy = format!(
        r#"
classes = {{ slow = {{ ceil = {{ up = "2mbit", down = "4mbit" }} }}, default = {{}} }}
function classify(conn)
  if conn.process and conn.process.name == "{name}" then return "slow" end
  return "default"
end
"#
    );
    let daemon = DaemonProcess::start_bpf_policy_in_own_pid_namespace(
        &pair.a,
        dir.path(),
        &cgroup,
        &policy,
        &["--uplink", "100mbit", "--downlink", "100mbit"],
    );
    let (count, bytes) = (40, 256 * 1024);
    let server = NetnsPair::b_addr(4);
    let transfers = |port, up| {
        let cmd = daemon.in_pid_namespace(&pair.a, exe.to_str().unwrap());
        transfers_by(cmd, &pair, &cgroup, server, port, count, bytes, up)
    };
    let up = transfers(5701, true);
    let down = transfers(5702, false);
    let status = daemon.status();
    eprintln!(
        "owners in the daemon's PID namespace: {}; fast path: {}",
        status["own_pid_namespace"], status["fast_path"]
    );
    assert_within(
        "40 short uploads of a new process, daemon in its own PID namespace",
        up,
        2e6,
        0.5,
        1.15,
    );
    assert_within(
        "40 short downloads, daemon in its own PID namespace",
        down,
        4e6,
        0.5,
        1.15,
    );
    // Charged to it, under its name: what the daemon saved (flushed every second). Each
    // connection's last bytes come with its close (before the close harvest, 91 % up and
    // 78-80 % down were charged: everything after a connection's last scan was lost). The
    // figures include IP and TCP headers (~3.6 % over the payload moved): measured 1.12x up
    // (the downloads' ACKs and retransmitted segments' headers are in it) and 1.02x down.
    let moved = (count * bytes) as u64;
    let enough = moved * 95 / 100;
    let charged = |direction: &str| -> u64 {
        let out = support::shaper()
            .args(["usage", "--by", "process", "--json", "--state-dir"])
            .arg(dir.path().join("state"))
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        report["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["name"] == name.as_str())
            .filter_map(|r| r[direction].as_u64())
            .sum()
    };
    support::daemon::wait_until(2, "the transfers charged to their process", || {
        let (up, down) = (charged("up"), charged("down"));
        if up < enough || down < enough {
            return Err(format!(
                "{name} was charged {up} up and {down} down of {moved} bytes each way\n{}",
                daemon.log_text()
            ));
        }
        eprintln!("charged to {name}: {up} up, {down} down of {moved} each way");
        Ok(())
    });
}

/// Issue 11's acceptance: iperf3 started after the daemon, in a class by its process name,
/// averages at most 1.1× the limit over its whole 8 s transfer (no second left out), both ways.
/// Its control connection is the process's first; by the time the data connection opens the
/// daemon has decided the process, so the kernel classifies that connection from its SYN.
#[test]
fn an_iperf3_started_after_the_daemon_holds_its_limit_from_the_start() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let _daemon = first_packet_daemon(&pair, &cgroup, dir.path());
    for (reverse, limit) in [(false, 2e6), (true, 4e6)] {
        let port = 5201 + u16::from(reverse);
        let _server = Server::start(&pair.b, port);
        let mut run = Run::tcp(NetnsPair::b_addr(4), port, 40601 + u16::from(reverse));
        run.seconds = 8;
        run.omit = 0;
        run.reverse = reverse;
        let measured = run.start_in(&pair.a, &cgroup).finish().bits_per_second;
        let what = if reverse { "download" } else { "upload" };
        assert_within(&format!("8 s iperf3 {what}"), measured, limit, 0.5, 1.1);
    }
}

/// Set in the UDP child: `ADDR up|down SECS`.
const UDP_ENV: &str = "SHAPER_RATES_UDP";
/// What the UDP sender offers: 20 Mbit/s in datagrams of this size.
const UDP_OFFER_BPS: u64 = 20_000_000;
const UDP_DATAGRAM: usize = 1200;

/// Sends `secs` seconds of UDP at [`UDP_OFFER_BPS`] from `socket` to its connected peer.
fn udp_send(socket: &std::net::UdpSocket, secs: u64) {
    let datagram = [0x5a_u8; UDP_DATAGRAM];
    let per_second = UDP_OFFER_BPS / (8 * UDP_DATAGRAM as u64);
    let start = std::time::Instant::now();
    for i in 0..per_second * secs {
        let due = start + Duration::from_micros(i * 1_000_000 / per_second);
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        // A full queue (ENOBUFS) is the shaper doing its work: the datagram is not sent.
        let _ = socket.send(&datagram);
    }
}

/// Receives datagrams on `socket` until `idle` passes without one: the bytes that arrived in
/// the first second after the first datagram, and in all, with the seconds they spanned.
fn udp_receive(socket: &std::net::UdpSocket, idle: Duration) -> (u64, u64, f64) {
    socket.set_read_timeout(Some(idle)).unwrap();
    let mut buf = [0_u8; 2048];
    let (mut first_second, mut total) = (0_u64, 0_u64);
    let mut first: Option<std::time::Instant> = None;
    let mut last = std::time::Instant::now();
    while let Ok(n) = socket.recv(&mut buf) {
        let now = std::time::Instant::now();
        let start = *first.get_or_insert(now);
        if now.duration_since(start) < Duration::from_secs(1) {
            first_second += n as u64;
        }
        total += n as u64;
        last = now;
    }
    let spanned = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    (first_second, total, spanned)
}

/// Not a test: the body of the child process `udp_flood` starts (this binary, re-executed in
/// the test's cgroup and namespace). Up: sends to ADDR for SECS seconds. Down: says hello to
/// ADDR, whose sender then floods this socket, and prints what arrived.
#[test]
#[ignore = "run by udp_flood in a child process"]
fn udp_child() {
    let Ok(spec) = std::env::var(UDP_ENV) else {
        return;
    };
    let f: Vec<&str> = spec.split_whitespace().collect();
    let (addr, up, secs): (std::net::SocketAddr, bool, u64) =
        (f[0].parse().unwrap(), f[1] == "up", f[2].parse().unwrap());
    let any: std::net::SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = std::net::UdpSocket::bind(any).unwrap();
    socket.connect(addr).unwrap();
    if up {
        udp_send(&socket, secs);
    } else {
        socket.send(b"hello").unwrap();
        let (first, total, spanned) = udp_receive(&socket, Duration::from_secs(2));
        println!("UDP {first} {total} {spanned}");
    }
}

/// A process started after the daemon sends (or receives) UDP at 20 Mbit/s for `secs`
/// seconds through the 3 Mbit/s class; the receiver's bits in the first second after the first
/// datagram, and its average over the whole flow.
fn udp_flood(pair: &NetnsPair, cgroup: &TestCgroup, port: u16, up: bool, secs: u64) -> (f64, f64) {
    let socket = pair
        .b
        .run(|| std::net::UdpSocket::bind((NetnsPair::B_V4, port)).unwrap());
    let peer = std::thread::spawn(move || {
        if up {
            udp_receive(&socket, Duration::from_secs(3))
        } else {
            let mut hello = [0_u8; 16];
            let (_, from) = socket.recv_from(&mut hello).unwrap();
            socket.connect(from).unwrap();
            udp_send(&socket, secs);
            (0, 0, 0.0)
        }
    });
    let exe = std::env::current_exe().unwrap();
    let mut cmd = pair.a.command(exe);
    cmd.args(["--exact", "udp_child", "--ignored", "--nocapture"])
        .env(
            UDP_ENV,
            format!(
                "{}:{port} {} {secs}",
                NetnsPair::B_V4,
                if up { "up" } else { "down" }
            ),
        )
        .stderr(std::process::Stdio::null());
    let procs = cgroup.enter(&mut cmd);
    let out = cmd.output().unwrap();
    drop(procs);
    let sent = peer.join().unwrap();
    let (first, total, spanned) = if up {
        sent
    } else {
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("UDP "))
            .unwrap_or_else(|| panic!("the child printed no result: {text}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    };
    assert!(spanned > 0.5, "the UDP flow lasted {spanned} s");
    ((first * 8) as f64, (total * 8) as f64 / spanned)
}

/// Issue 11's acceptance: a UDP sender at 20 Mbit/s in a 3 Mbit/s class, started after the
/// daemon, delivers at most 1.1× the limit from its first second, both ways.
#[test]
fn a_udp_flood_of_a_new_process_is_held_from_its_first_second() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let _daemon = first_packet_daemon(&pair, &cgroup, dir.path());
    for (up, port) in [(true, 5690), (false, 5691)] {
        let (first, average) = udp_flood(&pair, &cgroup, port, up, 4);
        let what = if up { "upload" } else { "download" };
        assert_within(&format!("UDP {what}, first second"), first, 3e6, 0.5, 1.1);
        assert_within(&format!("UDP {what}, whole flow"), average, 3e6, 0.8, 1.05);
    }
}

/// Opens a connection to ADDR:PORT (argv 1, 2) and sends a byte, waits for the file argv 4 (the
/// test makes it once the daemon has decided that connection), then opens a second one and
/// sends on it as fast as it can for argv 3 seconds.
const SECOND_CONNECTION: &str = r#"
import os, socket, sys, time
addr, secs, gate = (sys.argv[1], int(sys.argv[2])), float(sys.argv[3]), sys.argv[4]
first = socket.create_connection(addr)
first.sendall(b"x")
while not os.path.exists(gate):
    time.sleep(0.02)
second = socket.create_connection(addr)
second.settimeout(0.2)
buf, end = b"y" * 65536, time.time() + secs
while time.time() < end:
    try:
        second.send(buf)
    except socket.timeout:
        pass
second.close()
first.close()
"#;

/// Issue 21's acceptance, for a process's next connection: on an unlimited link, a process
/// whose connection the policy gave a limit of its own (2 Mbit/s, in the unlimited default
/// class) opens another, which is held to that limit from its first packet: it starts in the
/// leaf made ahead for the process's next connections, not unlimited in the class's shared leaf
/// until the fast path has decided it (measured so: 3.4 and 9.9 MB in its first second), and
/// keeps that leaf once decided (moved to a fresh leaf of its own, both sent at its limit until
/// the first drained: 365 KB). The leaf made ahead has a burst of a few packets (with a class's
/// 64 KiB cburst, sent at once on a full bucket, its first second held 303,008 bytes, three
/// runs alike; with a few packets 243,264, twice).
#[test]
fn a_processs_next_connection_with_a_limit_of_its_own_is_held_from_its_first_packet() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
classes = { default = {} }
function classify(conn)
  if conn.remote_port == 5752 then return "default", "2mbit" end
end
"#;
    let daemon = DaemonProcess::start_bpf_policy(&pair.a, dir.path(), &cgroup, policy, &[]);
    let listener = pair
        .b
        .run(|| std::net::TcpListener::bind((NetnsPair::B_V4, 5752)).unwrap());
    let gate = dir.path().join("second");
    // The second connection's bytes in the first second after its first byte, and in all, with
    // the seconds they spanned.
    let receiver = std::thread::spawn(move || {
        let (mut first, _) = listener.accept().unwrap();
        let (mut second, _) = listener.accept().unwrap();
        let mut buf = vec![0_u8; 65536];
        let (mut first_second, mut total) = (0_u64, 0_u64);
        let mut start = None;
        let mut last = std::time::Instant::now();
        while let Ok(n) = second.read(&mut buf) {
            if n == 0 {
                break;
            }
            let now = std::time::Instant::now();
            if now.duration_since(*start.get_or_insert(now)) < Duration::from_secs(1) {
                first_second += n as u64;
            }
            total += n as u64;
            last = now;
        }
        let _ = first.read(&mut buf);
        let spanned = start.map_or(0.0, |s| last.duration_since(s).as_secs_f64());
        (first_second, total, spanned)
    });
    let mut cmd = pair.a.command("python3");
    cmd.args([
        "-c",
        SECOND_CONNECTION,
        &NetnsPair::B_V4.to_string(),
        "5752",
        "4",
        gate.to_str().unwrap(),
    ]);
    let procs = cgroup.enter(&mut cmd);
    let mut client = cmd.spawn().expect("run python3");
    drop(procs);
    // Decided: the status lists it (answered between the fast path's applies, so the leaf made
    // ahead for the process's next connection is in the kernel by then).
    daemon.wait_for_all(10, "the first connection decided", |s| {
        s["connections"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["connection"]
                    .as_str()
                    .is_some_and(|t| t.contains(":5752 "))
            })
        })
    });
    std::fs::write(&gate, "").unwrap();
    assert!(client.wait().expect("python3 ran").success());
    let (first_second, total, spanned) = receiver.join().unwrap();
    eprintln!(
        "the second connection: {first_second} bytes in its first second, {total} in {spanned:.2} s"
    );
    assert_within(
        "a process's next connection, first second",
        (first_second * 8) as f64,
        2e6,
        0.3,
        1.15,
    );
    assert_within(
        "a process's next connection, whole run",
        (total * 8) as f64 / spanned,
        2e6,
        0.5,
        1.15,
    );
}

/// The holding leaf on `device` in `ns` (see `shaper::shape::Desired::hold`): the class right
/// under the link (`5a:1`) whose ceiling is `ceil` as `tc` prints it (the policy classes there
/// are unlimited in these tests).
fn holding_leaf(ns: &support::netns::Netns, device: &str, ceil: &str) -> Option<u16> {
    let out = ns
        .command("tc")
        .args(["class", "show", "dev", device])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let under_link = words.windows(2).any(|w| w == ["parent", "5a:1"]);
            let ceiled = words.windows(2).any(|w| w[0] == "ceil" && w[1] == ceil);
            (under_link && ceiled)
                .then(|| u16::from_str_radix(words.get(2)?.strip_prefix("5a:")?, 16).ok())
                .flatten()
        })
}

/// Waits until the kernel has the holding leaf of 2 Mbit/s both ways, which the daemon makes
/// from its first plan when the policy returns that limit as a literal (`return "default",
/// "2mbit"`), before any connection was given it. Returns its minor.
fn holding_leaf_in_place(pair: &NetnsPair) -> u16 {
    let ifb = shaper::shape::ifb_name("veth0");
    let mut hold = None;
    support::daemon::wait_until(5, "a holding leaf of 2 Mbit/s both ways", || {
        let (up, down) = (
            holding_leaf(&pair.a, "veth0", "2Mbit"),
            holding_leaf(&pair.a, &ifb, "2Mbit"),
        );
        hold = up.filter(|_| up == down);
        hold.map(|_| ())
            .ok_or_else(|| format!("holding leaves: {up:?} up, {down:?} down"))
    });
    hold.unwrap()
}

/// Issue 21's acceptance, for a new process: on an unlimited link, a new iperf3 whose
/// connections the policy gives a limit of their own (2 Mbit/s, in the unlimited default class)
/// is held to it over its first second and its whole run, both ways, though it is the first
/// connection the policy limits since the daemon started (the holding leaf's ceiling is the
/// limit the policy returns as a literal: 46 and 53 Mbit/s in the first second without that,
/// when a limit had to be given once before it was held at). iperf3 opens its data
/// connection within a round trip of its control one, before the fast path has decided either
/// (p50 3-9 ms here, debug build): the kernel holds both in the holding leaf (which counts their
/// first packets) until then, and they then take their own leaves. Before the holding leaf, the
/// data ran unlimited meanwhile: first second 19.5, 3.1, 31.7 Mbit/s up and 42.6, 18.4,
/// 50.6 down in three runs.
/// With a class's 64 KiB burst in the data connection's own leaf, 2 runs of 14 sent 2.42 and
/// 2.46 Mbit/s in the first second (its data started in a fresh leaf with a full bucket).
#[test]
fn a_new_iperf3_with_a_limit_of_its_own_is_held_from_its_first_second() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
classes = { default = {} }
function classify(conn)
  local p = conn.remote_port
  if p == 5750 or p == 5751 then return "default", "2mbit" end
end
"#;
    let daemon = DaemonProcess::start_bpf_policy(&pair.a, dir.path(), &cgroup, policy, &[]);
    // The first connection the policy limits since the daemon started.
    let hold = holding_leaf_in_place(&pair);
    let ifb = shaper::shape::ifb_name("veth0");
    let mut seconds = Vec::new();
    for (port, reverse) in [(5750, false), (5751, true)] {
        let device = if reverse { ifb.as_str() } else { "veth0" };
        let held_before = class_bytes_on(&pair.a, device).get(&hold).copied();
        let _server = Server::start(&pair.b, port);
        let mut run = Run::tcp(NetnsPair::b_addr(4), port, port + 35_000);
        run.reverse = reverse;
        run.seconds = 8;
        run.omit = 0;
        let result = run.start_in(&pair.a, &cgroup).finish();
        let held = class_bytes_on(&pair.a, device).get(&hold).copied();
        let what = if reverse { "download" } else { "upload" };
        eprintln!(
            "{what}: receiver's seconds {:?} Mbit/s; the holding leaf counted {held_before:?} \
             then {held:?} bytes; fast path {}",
            result.intervals.iter().map(|b| b / 1e6).collect::<Vec<_>>(),
            daemon.status()["fast_path"]
        );
        let counted = held.unwrap_or(0) - held_before.unwrap_or(0);
        // At most its window at its limit, a burst and a queue: 25 + 3 + 13 KB.
        assert!(
            counted > 0 && counted < 64 * 1024,
            "{what}: the holding leaf 5a:{hold:x} counted {counted} bytes of the new iperf3's \
             first packets (expected some, and at most its 100 ms)"
        );
        seconds.push((what, result));
    }
    for (what, result) in seconds {
        let first = *result.intervals.first().expect("a first second");
        assert_within(&format!("{what}, first second"), first, 2e6, 0.3, 1.15);
        assert_within(
            &format!("{what}, whole run"),
            result.bits_per_second,
            2e6,
            0.5,
            1.15,
        );
    }
}

/// Connects to ADDR:PORT (argv 1, 2) and sends argv 3 bytes.
const SEND_BYTES: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"y" * int(sys.argv[3]))
s.close()
"#;

/// Continues a stopped process when dropped (before the daemon's own drop stops it).
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0 as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    }
}

/// The holding leaf degrades to unshaped: with the daemon stopped (SIGSTOP: its programs and
/// maps stay, no decision comes), a new process's connection is held for the window only, then
/// runs in the default class. What the kernel counted says so, whatever the machine's speed:
/// the holding leaf at most its 100 ms at 2 Mbit/s (with a burst and a queue), the rest of the
/// 4 MB elsewhere. Held for good, the 4 MB would all be counted there (16 s at 2 Mbit/s).
#[test]
fn a_new_connection_no_decision_comes_for_is_held_for_the_window_only() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
classes = { default = {} }
function classify(conn)
  if conn.remote_port == 5753 then return "default", "2mbit" end
end
"#;
    let daemon = DaemonProcess::start_bpf_policy(&pair.a, dir.path(), &cgroup, policy, &[]);
    let hold = holding_leaf_in_place(&pair);
    let before = class_bytes(&pair.a);
    let listener = pair
        .b
        .run(|| std::net::TcpListener::bind((NetnsPair::B_V4, 5754)).unwrap());
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        stream.read_to_end(&mut sink).unwrap();
        sink.len()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let stopped = Continue(daemon.pid());
    let size = 4_000_000;
    let mut cmd = pair.a.command("python3");
    cmd.args([
        "-c",
        SEND_BYTES,
        &NetnsPair::B_V4.to_string(),
        "5754",
        &size.to_string(),
    ]);
    let procs = cgroup.enter(&mut cmd);
    let started = std::time::Instant::now();
    let status = cmd.status().expect("run python3");
    let took = started.elapsed();
    drop(procs);
    assert!(status.success());
    assert_eq!(receiver.join().unwrap(), size);
    let after = class_bytes(&pair.a);
    drop(stopped);
    let delta = |m: &u16| after[m] - before.get(m).copied().unwrap_or(0);
    let held = delta(&hold);
    // The most any other class below the link counted: the default class's leaf (and its
    // parent), where packets without a class go.
    let elsewhere = after
        .keys()
        .filter(|&&m| m != hold && m != 1)
        .map(delta)
        .max()
        .unwrap_or(0);
    eprintln!(
        "daemon stopped: 4 MB sent in {:.3} s; the holding leaf counted {held} bytes, the \
         default class {elsewhere} (before: {before:?}, after: {after:?})",
        took.as_secs_f64()
    );
    assert!(
        held > 0 && held < 64 * 1024,
        "the holding leaf 5a:{hold:x} counted {held} bytes: expected the first packets only"
    );
    assert!(
        elsewhere >= size as u64,
        "the rest went unshaped, to the default class: it counted {elsewhere} bytes"
    );
}

/// Issue 11's acceptance: on the BPF path, a running connection whose class changes (here by a
/// reloaded policy) moves to the new class within a cycle, without being reset: the kernel
/// reads its class from the connection map on every packet.
///
/// What moved is read from the kernel, which the machine's load cannot change: the download's
/// bytes are counted by the slow class until the daemon says the connection is fast, and by the
/// fast class after. The speeds are held to their ceilings only: how close a flow comes to its
/// limit is a benchmark (on a loaded CI machine, retransmission timeouts in the first seconds
/// once left this flow at 89.6 % of the slow class: 3.24, 3.70 then 3.82 Mbit/s).
#[test]
fn with_bpf_a_running_connection_moves_to_its_new_class_without_a_reset() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = |class: &str| {
        format!(
            "classes = {{ slow = {{ ceil = \"4mbit\" }}, fast = {{ ceil = \"12mbit\" }}, \
             default = {{}} }}\n\
             function classify(conn)\n\
             \x20 if conn.remote_port == 5701 then return \"{class}\" end\n\
             \x20 return \"default\"\n\
             end\n"
        )
    };
    let daemon = DaemonProcess::start_bpf_policy(
        &pair.a,
        dir.path(),
        &cgroup,
        &policy("slow"),
        &["--interval", "1s"],
    );
    let script = dir.path().join("policy.lua");
    let _server = Server::start(&pair.b, 5701);
    // Download (-R), so the client's per-second figures are the receiver's; its bytes go through
    // the IFB's classes.
    let ifb = shaper::shape::ifb_name("veth0");
    let mut run = Run::tcp(NetnsPair::b_addr(4), 5701, 40701);
    run.reverse = true;
    run.seconds = 12;
    let measurement = run.start_in(&pair.a, &cgroup);
    let the_flow = |s: &serde_json::Value, class: &str| {
        s["connections"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["class"] == class
                    && c["connection"]
                        .as_str()
                        .is_some_and(|c| c.contains(":40701 ->"))
            })
        })
    };
    daemon.wait_for_all(3, "the download listed in class slow", |s| {
        the_flow(s, "slow")
    });
    let status = daemon.status();
    let minor = |name: &str| {
        let handle = status["classes"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .and_then(|c| c["handle"].as_str())
            .unwrap_or_else(|| panic!("class {name} has a handle: {status:#}"))
            .to_string();
        let minor = handle.rsplit(':').next().expect("major:minor");
        u16::from_str_radix(minor, 16).expect("a hex minor")
    };
    let (slow, fast) = (minor("slow"), minor("fast"));
    // Listed within a cycle of its start: four more seconds put the reload after the three
    // measured seconds the slow ceiling is checked over.
    std::thread::sleep(Duration::from_millis(4_000));
    let before = class_bytes_on(&pair.a, &ifb);
    std::fs::write(&script, policy("fast")).unwrap();
    let reload = daemon.control(&["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    daemon.wait_for_all(3, "the download listed in class fast", |s| {
        the_flow(s, "fast")
    });
    // The cycle that listed it also wrote the connection map; one more and nothing is left of
    // the slow class's queue either.
    daemon.cycles_pass(1);
    let moved = class_bytes_on(&pair.a, &ifb);
    let result = measurement.finish(); // panics if iperf3 lost its connection
    let after = class_bytes_on(&pair.a, &ifb);
    let count = |at: &std::collections::BTreeMap<u16, u64>, minor| *at.get(&minor).unwrap_or(&0);
    eprintln!(
        "measured the move: slow 5a:{slow:x} counted {} / {} / {} bytes, fast 5a:{fast:x} {} / \
         {} / {} (before the reload / once moved / at the end); receiver's seconds {:?}",
        count(&before, slow),
        count(&moved, slow),
        count(&after, slow),
        count(&before, fast),
        count(&moved, fast),
        count(&after, fast),
        result.intervals
    );
    assert!(
        count(&before, slow) > 1_000_000,
        "the download went through the slow class from its first packet"
    );
    assert_eq!(count(&before, fast), 0, "nothing in the fast class before");
    assert_eq!(
        count(&after, slow),
        count(&moved, slow),
        "the slow class counted nothing once the connection moved"
    );
    assert!(
        count(&after, fast) > count(&moved, fast),
        "the fast class carried the rest of the download"
    );
    // The ceilings held, each over three seconds (per-second figures move in 64 KB GRO steps):
    // the three before the reload (seconds 1-4 of the run), and three well after it, before the last (which iperf3 cuts).
    let i = &result.intervals;
    assert!(i.len() >= 10, "{i:?}");
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    assert_within("in the first class", mean(&i[..3]), 4e6, 0.0, 1.05);
    assert_within(
        "moved to the second class",
        mean(&i[i.len() - 4..i.len() - 1]),
        12e6,
        0.0,
        1.05,
    );
}

// ---- latency inside and between classes (issue 12) ----------------------------------------

use support::latency::{LoadResult, probe_under_load, top_priority_under_load};

/// The probe and `flows` bulk flows in one class limited to 2 Mbit/s up and 4 Mbit/s down.
fn shared_class(flows: u16, download: bool) -> LoadResult {
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![class("bulk", "2mbit:4mbit", Each::Class)]);
    let bulk = decision("bulk", "");
    let r = probe_under_load(
        &pair,
        &mut shaper,
        &classes,
        bulk.clone(),
        bulk,
        flows,
        download,
    );
    eprintln!(
        "measured {} {flows} flow(s): probe idle {}, loaded {}; goodput {:.3} Mbit/s; flows {:?}",
        if download { "download" } else { "upload" },
        r.idle,
        r.loaded,
        r.bulk.bits_per_second / 1e6,
        r.streams
    );
    r
}

fn assert_p95_within(what: &str, r: &LoadResult, ms: u64) {
    assert!(
        r.loaded.p95() <= Duration::from_millis(ms),
        "{what}: probe p95 {:?} over {ms} ms ({})",
        r.loaded.p95(),
        r.loaded
    );
}

/// Issue 12: a 1-byte request/response probe sharing a saturated class waited up to 2 s behind
/// the bulk flow's queue (p95 1,181 ms up, 1,156 ms down with packet-counted FIFOs). With
/// byte-limited, segmenting leaves and flow buckets it waits for about one packet.
#[test]
fn a_probe_sharing_a_saturated_class_keeps_a_low_latency() {
    let _serial = rate_lock();
    let up = shared_class(1, false);
    assert_p95_within("upload, 2 Mbit/s class", &up, 50);
    assert_within("bulk upload", up.bulk.bits_per_second, 2e6, 0.93, 1.01);
    let down = shared_class(1, true);
    assert_p95_within("download, 4 Mbit/s class", &down, 50);
    assert_within("bulk download", down.bulk.bits_per_second, 4e6, 0.93, 1.01);
}

/// Four bulk flows in one class: the probe still gets through, and the flows share the class
/// evenly (each within ±20 % of their mean; the shared FIFO gave 52 %..197 % downloading).
#[test]
fn four_bulk_flows_share_a_class_evenly_and_a_probe_stays_fast() {
    let _serial = rate_lock();
    for download in [false, true] {
        let r = shared_class(4, download);
        assert_p95_within("four bulk flows", &r, 50);
        assert_eq!(r.streams.len(), 4, "{:?}", r.streams);
        let mean = r.streams.iter().sum::<f64>() / 4.0;
        for s in &r.streams {
            assert!(
                (s / mean - 1.0).abs() <= 0.20,
                "download {download}: shares {:?} not within ±20 % of their mean",
                r.streams
            );
        }
    }
}

/// Between classes: a probe in a top-priority class while the bulk class saturates a shaped
/// 18 Mbit/s link (measured before this work: 0.1 ms).
#[test]
fn a_top_priority_probe_stays_fast_while_bulk_saturates_the_link() {
    let _serial = rate_lock();
    for download in [false, true] {
        let r = top_priority_under_load(download);
        eprintln!(
            "measured top priority, download {download}: {}; bulk {:.2} Mbit/s",
            r.loaded,
            r.bulk.bits_per_second / 1e6
        );
        assert_p95_within("top priority", &r, 5);
        assert_within("bulk on the link", r.bulk.bits_per_second, 18e6, 0.90, 1.01);
    }
}

/// Steady goodput at 1, 10 and 100 Mbit/s each way (2 and 4 Mbit/s: the limit tests above):
/// the byte-limited queues still keep one TCP flow at ≥ 93 % of its limit.
#[test]
fn goodput_holds_from_1_to_100_mbit() {
    let _serial = rate_lock();
    for mbit in [1u32, 10, 100] {
        let up = limited_run(4, Proto::Tcp, false, &format!("{mbit}mbit:unlimited"));
        assert_within(
            &format!("{mbit} Mbit/s up"),
            up,
            f64::from(mbit) * 1e6,
            0.93,
            1.01,
        );
        let down = limited_run(4, Proto::Tcp, true, &format!("unlimited:{mbit}mbit"));
        assert_within(
            &format!("{mbit} Mbit/s down"),
            down,
            f64::from(mbit) * 1e6,
            0.93,
            1.01,
        );
    }
}

/// `linklayer atm` with `overhead 44` (ADSL, PPPoE over LLC/SNAP): every packet is counted as
/// the 53-byte ATM cells its frame and the overhead fill, so fixed-size UDP datagrams arrive at
/// the cell rate computed here, well below what the same limit gives on Ethernet.
#[test]
fn an_atm_link_layer_counts_cells() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    shaper.capacity.framing = shaper::shape::Framing {
        overhead: 44,
        mpu: 0,
        link_layer: shaper::config::LinkLayer::Atm,
    };
    let (port, cport) = (5801, 40801);
    let flows = vec![(
        flow(Proto::Udp, 4, cport, port, 1),
        decision("default", "2mbit:unlimited"),
    )];
    shaper.shape(&ClassSet::default(), &flows);
    let _server = Server::start(&pair.b, port);
    let payload = 1000u32;
    let mut run = Run::tcp(NetnsPair::b_addr(4), port, cport);
    run.seconds = 11;
    run.udp_rate = Some("4M");
    run.length = Some(payload);
    let measured = run.start(&pair.a).finish().bits_per_second;
    // The kernel counts the Ethernet frame: payload + UDP 8 + IPv4 20 + Ethernet 14.
    let frame = payload + 8 + 20 + 14;
    let cells = (frame + 44).div_ceil(48);
    let expected = 2e6 * f64::from(payload) / f64::from(cells * 53);
    let ethernet = 2e6 * f64::from(payload) / f64::from(frame);
    eprintln!(
        "measured ATM: {:.3} Mbit/s of payload; {cells} cells a datagram give {:.3}, Ethernet \
         framing would give {:.3}",
        measured / 1e6,
        expected / 1e6,
        ethernet / 1e6
    );
    assert_within("ATM-framed payload", measured, expected, 0.95, 1.02);
}

/// Opens, uses once and closes UDP sockets as fast as it can for argv[2] seconds, then prints
/// how many per second.
const FLOODER: &str = r#"
import socket, sys, time
addr, secs = (sys.argv[1], 9), float(sys.argv[2])
n, start = 0, time.time()
while time.time() - start < secs:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", addr)
    s.close()
    n += 1
print(n / (time.time() - start))
"#;

/// Issue 27: two other processes in the cgroup (one per core) open and close UDP sockets as fast
/// as they can while a new process makes 20 sequential 256 KB downloads in a 4 Mbit/s class:
/// its reports still get through (the flood's are deferred, lost ones retried), so it stays
/// within 1.15× of its limit.
#[test]
#[ignore = "a measurement, not yet a test: 1.06x alone, 1.27x once in the full suite (run with --ignored)"]
fn short_transfers_of_a_new_process_hold_under_a_flood_of_new_sockets() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = first_packet_daemon(&pair, &cgroup, dir.path());
    let flooders: Vec<std::process::Child> = (0..2)
        .map(|_| {
            let mut cmd = pair.a.command("python3");
            cmd.args(["-c", FLOODER, &NetnsPair::B_V4.to_string(), "16"])
                .stdout(std::process::Stdio::piped());
            let procs = cgroup.enter(&mut cmd);
            let child = cmd.spawn().expect("start the flooder");
            drop(procs);
            child
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let server = NetnsPair::b_addr(4);
    let down = sequential_transfers(&pair, &cgroup, server, 5603, 20, 256 * 1024, false);
    let rates: Vec<String> = flooders
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect();
    let fast = daemon.status()["fast_path"].clone();
    eprintln!("flood: {rates:?} sockets/s per flooder; fast path {fast}; victim {down:.0} bit/s");
    assert_within(
        "20 short downloads of a new process under a socket flood",
        down,
        4e6,
        0.5,
        1.15,
    );
}

/// Holds a connection as python3 until the file argv[5] appears, then execs a program of another
/// name (a symlink to this Python) that downloads argv[3] bytes on a new connection and prints
/// the seconds it took.
const EXEC_THEN_DOWNLOAD: &str = r#"
import os, socket, sys, time
host, port, size, link, go = sys.argv[1:6]
s = socket.create_connection((host, int(port)))
s.set_inheritable(True)
os.symlink(sys.executable, link)
while not os.path.exists(go):
    time.sleep(0.02)
after = """
import socket, sys, time
start = time.time()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
n = 0
while n < int(sys.argv[3]):
    b = c.recv(65536)
    if not b:
        break
    n += len(b)
print(n, time.time() - start)
"""
os.execv(link, [link, "-c", after, host, port, size])
"#;

/// Issue 27: a python3 process (unlimited) holding a connection execs a program limited to
/// 4 Mbit/s by its name, which then downloads 2 MB on a new connection: at most 1.15× the limit
/// (before, the new connection ran at the old program's class: ≈2,600× the limit).
#[test]
fn after_exec_a_limited_program_holds_its_limit() {
    let _serial = rate_lock();
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start_bpf_policy(
        &pair.a,
        dir.path(),
        &cgroup,
        "classes = { limited = { ceil = \"4mbit\" }, default = {} }\n\
         function classify(conn)\n\
         \x20 if conn.process and conn.process.name == \"limitedprog\" then return \"limited\" end\n\
         \x20 return \"default\"\n\
         end\n",
        &["--uplink", "100mbit", "--downlink", "100mbit"],
    );
    const SIZE: usize = 2_000_000;
    let listener = pair
        .b
        .run(|| std::net::TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (_held, _) = listener.accept().unwrap();
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&vec![0x5a_u8; SIZE]).unwrap();
    });
    let link = dir.path().join("limitedprog");
    let go = dir.path().join("go");
    let mut cmd = pair.a.command("python3");
    cmd.args([
        "-c",
        EXEC_THEN_DOWNLOAD,
        &NetnsPair::B_V4.to_string(),
        &port.to_string(),
        &SIZE.to_string(),
        link.to_str().unwrap(),
        go.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::piped());
    let procs = cgroup.enter(&mut cmd);
    let child = cmd.spawn().expect("start python3");
    drop(procs);
    // Exec only once python3's connection was judged (as `default`, unlimited).
    let held = format!(":{port}");
    daemon.wait_for_all(2, "python3's connection in default", |s| {
        s["connections"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["connection"].as_str().is_some_and(|t| t.contains(&held))
                    && c["class"] == "default"
            })
        })
    });
    std::fs::write(&go, "").unwrap();
    let out = child.wait_with_output().unwrap();
    server.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut fields = text.split_whitespace();
    let bytes: f64 = fields.next().and_then(|f| f.parse().ok()).expect(&text);
    let secs: f64 = fields.next().and_then(|f| f.parse().ok()).expect(&text);
    assert_eq!(bytes as usize, SIZE, "{text}");
    assert_within(
        "a download after exec into a limited program",
        bytes * 8.0 / secs,
        4e6,
        0.5,
        1.15,
    );
}
