//! `shaper run` end to end in a namespace: it installs, reloads, follows rate files, answers
//! `status`, refuses a second instance, and leaves nothing behind on SIGTERM.

use std::net::{TcpListener, TcpStream};

use crate::support::daemon::{DaemonProcess, allowance};
use crate::support::netns::{Netns, NetnsPair};

fn kernel_view(ns: &Netns) -> (String, String) {
    let tc = ns.command("tc").args(["qdisc", "show"]).output().unwrap();
    (
        ns.ip(&["-o", "link", "show"]),
        String::from_utf8_lossy(&tc.stdout).into_owned(),
    )
}

/// The HTB classes of veth0, as `tc class show` prints them. Only HTB's: an fq_codel leaf also
/// lists a class per active flow (`class fq_codel 8001:3a5 parent 8001:`), which come and go
/// with the traffic, not with shaper.
fn classes(ns: &Netns) -> String {
    let out = ns
        .command("tc")
        .args(["class", "show", "dev", "veth0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("class htb "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A TCP connection from `a` to `b`, kept open by the returned pair of streams.
fn connection(pair: &NetnsPair) -> (TcpListener, TcpStream, TcpStream) {
    let listener = pair
        .b
        .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let client = pair.a.run(|| TcpStream::connect(addr).unwrap());
    let (server, _) = listener.accept().unwrap();
    (listener, client, server)
}

fn shaping(s: &serde_json::Value) -> bool {
    s["interfaces"][0]["state"] == "shaping"
}

#[test]
fn runs_reports_status_and_sigterm_leaves_nothing_behind() {
    let pair = NetnsPair::new();
    let before = kernel_view(&pair.a);
    let dir = tempfile::tempdir().unwrap();
    let _conn = connection(&pair);
    let mut daemon =
        DaemonProcess::start(&pair.a, dir.path(), &["--connection-rate", "1mbit:3mbit"]);
    daemon.wait_for(10, "shaping", shaping);
    let status = daemon.status();
    assert!(status["cycles"].as_u64().unwrap() >= 1);
    assert_eq!(status["policy"], "<built-in policy>");
    assert!(status["stages_ms"]["total"].as_f64().is_some());
    let text = String::from_utf8_lossy(&daemon.control(&["status"]).stdout).into_owned();
    assert!(
        text.contains("interface veth0: shaping") && text.contains("CLASS"),
        "{text}"
    );
    assert!(
        classes(&pair.a).contains("ceil 1Mbit"),
        "{}",
        classes(&pair.a)
    );
    // A second daemon on the same runtime dir refuses to start.
    let mut second = DaemonProcess::spawn(&pair.a, dir.path(), &[]);
    let exit = second.child.take().unwrap().wait().unwrap();
    assert!(!exit.success());
    assert!(
        second.log_text().contains("another shaper"),
        "{}",
        second.log_text()
    );
    let exit = daemon.signal(libc::SIGTERM);
    assert!(exit.success(), "{exit}: {}", daemon.log_text());
    assert_eq!(
        kernel_view(&pair.a),
        before,
        "SIGTERM removes everything shaper installed"
    );
    assert!(!dir.path().join("run/shaper.sock").exists());
    assert!(
        dir.path().join("state/usage.ron").exists(),
        "usage flushed at shutdown"
    );
}

#[test]
fn script_edits_apply_and_broken_edits_keep_the_previous_policy() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        "function classify(conn) return nil, \"1mbit\" end\n",
    )
    .unwrap();
    let _conn = connection(&pair);
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--script", script.to_str().unwrap()]);
    daemon.wait_for(10, "1 Mbit/s installed", |_| {
        classes(&pair.a).contains("ceil 1Mbit")
    });
    std::fs::write(
        &script,
        "function classify(conn) return nil, \"3mbit\" end\n",
    )
    .unwrap();
    // Nothing but the file watcher reloads the script: no reload is sent.
    let start = std::time::Instant::now();
    daemon.wait_for(1, "the edit applied", |_| {
        classes(&pair.a).contains("ceil 3Mbit")
    });
    eprintln!("edit applied after {:?} (cycle 200 ms)", start.elapsed());
    std::fs::write(&script, "function classify(conn)\n  return nil, \n").unwrap();
    daemon.wait_for_log(1, "policy.lua:3:");
    daemon.cycles_pass(2);
    assert!(
        classes(&pair.a).contains("ceil 3Mbit"),
        "the previous shaping stays"
    );
    let out = daemon.control(&["reload"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy.lua:3:"));
    std::fs::write(
        &script,
        "function classify(conn) return nil, \"5mbit\" end\n",
    )
    .unwrap();
    let out = daemon.control(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.wait_for(5, "the reload applied", |_| {
        classes(&pair.a).contains("ceil 5Mbit")
    });
}

#[test]
fn rate_files_move_the_limit_and_deletion_keeps_it() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("connection-rate");
    let _conn = connection(&pair);
    let daemon = DaemonProcess::start(
        &pair.a,
        dir.path(),
        &[
            "--connection-rate",
            "1mbit",
            "--connection-rate-file",
            file.to_str().unwrap(),
        ],
    );
    daemon.wait_for(10, "the flag's value while the file is absent", |_| {
        classes(&pair.a).contains("ceil 1Mbit")
    });
    let tmp = dir.path().join("connection-rate.tmp");
    std::fs::write(&tmp, "2mbit\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    daemon.wait_for(1, "the file's value", |_| {
        classes(&pair.a).contains("ceil 2Mbit")
    });
    std::fs::remove_file(&file).unwrap();
    daemon.cycles_pass(2);
    assert!(
        classes(&pair.a).contains("ceil 2Mbit"),
        "deleting the file keeps the last value"
    );
    std::fs::write(&file, "fast").unwrap();
    daemon.cycles_pass(2);
    assert!(
        classes(&pair.a).contains("ceil 2Mbit"),
        "a malformed file keeps the last value"
    );
    assert!(
        daemon.log_text().contains("rate file"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_missing_interface_is_waited_for() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    // A veth inside the namespace stands in for ppp0 (this kernel has no dummy driver).
    let add = || {
        pair.a.ip(&[
            "link", "add", "dummy9", "type", "veth", "peer", "name", "dummy9p",
        ])
    };
    let mut d = DaemonProcess::spawn(&pair.a, dir.path(), &["-i", "dummy9"]);
    d.wait_for_log(1, "dummy9: interface not present; waiting");
    let dummy9 = |s: &serde_json::Value, state: &str| {
        s["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "dummy9" && i["state"] == state)
    };
    d.wait_for(1, "the daemon answers while it waits", |s| {
        dummy9(s, "waiting")
    });
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "still running: {}",
        d.log_text()
    );
    add();
    pair.a.ip(&["link", "set", "dummy9", "up"]);
    d.wait_for(5, "dummy9 shaped", |s| dummy9(s, "shaping"));
    // The interface goes away and comes back (a ppp redial): reinstalled within a cycle or two.
    pair.a.ip(&["link", "del", "dummy9"]);
    d.wait_for(1, "dummy9 missed", |s| dummy9(s, "waiting"));
    add();
    d.wait_for(5, "dummy9 shaped again", |_| {
        let out = pair
            .a
            .command("tc")
            .args(["qdisc", "show", "dev", "dummy9"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("htb 5a:")
    });
}

fn ingress_filters(ns: &Netns) -> String {
    let out = ns
        .command("tc")
        .args(["filter", "show", "dev", "veth0", "ingress"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Breaks the IFB with `ip FAULT` while a daemon runs: inbound traffic must flow again at once
/// (not at the next cycle), and the next cycle must rebuild the IFB, up, with the redirect.
/// "At once" is told by the cycle count, not the clock: with 20 s between cycles, traffic must
/// flow again, and the watcher log it, while no cycle has run.
fn ifb_fault_leaves_inbound_flowing_and_is_repaired(fault: &[&str]) {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--interval", "20s"]);
    daemon.wait_for(10, "shaping", shaping);
    assert!(pair.inbound_opens(), "inbound TCP before the fault");
    let cycles = |s: &serde_json::Value| s["cycles"].as_u64().unwrap();
    let before = cycles(&daemon.status());
    pair.a.ip(fault);
    assert!(
        pair.inbound_opens_within(allowance(2)),
        "inbound TCP still dropped after `ip {fault:?}`; ingress: {}\nlog:\n{}",
        ingress_filters(&pair.a),
        daemon.log_text()
    );
    // The watcher logs right after its deletion, which the connection above may beat.
    daemon.wait_for_log(1, "inbound traffic flows unshaped");
    assert_eq!(
        cycles(&daemon.status()),
        before,
        "the watcher, not a cycle, removed the redirect:\n{}",
        daemon.log_text()
    );
    // The next cycle rebuilds the IFB (up), its tree and the redirect.
    daemon.wait_for(20, "the IFB (up) and the redirect rebuilt", |_| {
        ingress_filters(&pair.a).contains("Redirect to device shp-veth0")
            && pair
                .a
                .ip(&["-o", "link", "show", "shp-veth0"])
                .contains(",UP")
    });
    daemon.wait_for(20, "shaping again", shaping);
    assert!(
        pair.inbound_opens_within(allowance(3)),
        "inbound TCP after the rebuild"
    );
}

#[test]
fn a_deleted_ifb_leaves_inbound_traffic_flowing_and_is_rebuilt() {
    ifb_fault_leaves_inbound_flowing_and_is_repaired(&["link", "del", "shp-veth0"]);
}

#[test]
fn an_ifb_set_down_leaves_inbound_traffic_flowing_and_is_rebuilt() {
    ifb_fault_leaves_inbound_flowing_and_is_repaired(&["link", "set", "shp-veth0", "down"]);
}

#[test]
fn a_tree_changed_by_hand_is_repaired_within_a_cycle() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let _conn = connection(&pair);
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--connection-rate", "1mbit:3mbit"]);
    daemon.wait_for(10, "shaping", |s| {
        shaping(s) && classes(&pair.a).contains("ceil 1Mbit")
    });
    let out = pair
        .a
        .command("tc")
        .args(["qdisc", "del", "dev", "veth0", "root"])
        .output()
        .unwrap();
    // Deleted (tc succeeded); not checked as gone afterwards, which would race the repair.
    assert!(out.status.success());
    // Repaired at the next cycle, without any connection changing.
    daemon.wait_for(2, "the tree repaired", |_| {
        classes(&pair.a).contains("ceil 1Mbit")
    });
    assert!(
        daemon.log_text().contains("changed by another program"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn two_daemons_on_one_interface_refuse_each_other_whatever_their_runtime_dirs() {
    let pair = NetnsPair::new();
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _conn = connection(&pair);
    let mut first = DaemonProcess::start(&pair.a, dir1.path(), &["--connection-rate", "1mbit"]);
    first.wait_for(10, "shaping", shaping);
    let tree = classes(&pair.a);
    assert!(tree.contains("ceil 1Mbit"), "{tree}");
    let pid = first.child.as_ref().unwrap().id();

    let mut second = DaemonProcess::spawn(&pair.a, dir2.path(), &["--connection-rate", "3mbit"]);
    let exit = second.exit_within(5);
    assert!(!exit.success(), "the second daemon must refuse to start");
    let log = second.log_text();
    assert!(
        log.contains(&format!(
            "veth0 is already shaped by another shaper (pid {pid})"
        )),
        "{log}"
    );
    first.cycles_pass(2);
    assert_eq!(classes(&pair.a), tree, "the first daemon's tree is intact");
    first.wait_for(5, "still shaping", shaping);

    // SIGKILL leaves no stale claim: the next daemon starts and takes over the tree.
    first.signal(libc::SIGKILL);
    let third = DaemonProcess::start(&pair.a, dir2.path(), &["--connection-rate", "3mbit"]);
    third.wait_for(10, "the new daemon shapes", |_| {
        classes(&pair.a).contains("ceil 3Mbit")
    });
}

#[test]
fn a_failed_reload_shows_in_status_until_a_good_one() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    let good = "function classify(conn) return nil, \"1mbit\" end\n";
    std::fs::write(&script, good).unwrap();
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--script", script.to_str().unwrap()]);
    daemon.wait_for(10, "shaping", shaping);
    assert!(daemon.status()["reload_error"].is_null());

    std::fs::write(&script, "function classify(conn)\n  return nil, \n").unwrap();
    let out = daemon.control(&["reload"]);
    assert!(!out.status.success(), "reload of a broken script fails");
    let error = &daemon.status()["reload_error"];
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("policy.lua:3:"), "{error:#}");
    assert!(
        error["at"].as_str().is_some_and(|t| t.contains('T')),
        "{error:#}"
    );
    let text = String::from_utf8_lossy(&daemon.control(&["status"]).stdout).into_owned();
    assert!(
        text.contains("reload failed at ") && text.contains("policy.lua:3:"),
        "{text}"
    );

    std::fs::write(&script, good).unwrap();
    assert!(daemon.control(&["reload"]).status.success());
    assert!(
        daemon.status()["reload_error"].is_null(),
        "cleared by a good reload"
    );

    // Unsafe permissions are a reload failure like a syntax error.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = daemon.control(&["reload"]);
    assert!(
        !out.status.success(),
        "reload of a world-writable script fails"
    );
    let message = daemon.status()["reload_error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("policy.lua"), "{message}");
}

#[test]
fn a_failed_usage_save_shows_in_status_until_a_save_succeeds() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &[]);
    daemon.wait_for(10, "shaping", shaping);
    // A directory where usage.ron goes: the rename that saves it fails, even for root.
    let usage = dir.path().join("state/usage.ron");
    loop {
        let _ = std::fs::remove_file(&usage);
        match std::fs::create_dir_all(dir.path().join("state"))
            .and_then(|()| std::fs::create_dir(&usage))
        {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("{e}"),
        }
    }
    daemon.wait_for(5, "the save failure in status", |s| {
        s["usage_save_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("usage.ron"))
    });
    let text = String::from_utf8_lossy(&daemon.control(&["status"]).stdout).into_owned();
    assert!(text.contains("usage save failed at "), "{text}");
    std::fs::remove_dir(&usage).unwrap();
    daemon.wait_for(5, "cleared by a successful save", |s| {
        s["usage_save_error"].is_null()
    });
    assert!(usage.is_file());
}

/// The `tc`/`ip` command lines in `text`, in order: what a plan printed or a dry run logged.
fn operations(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("tc ") || l.starts_with("ip "))
        .map(str::to_string)
        .collect()
}

#[test]
fn plan_prints_what_a_dry_run_would_apply() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let _conn = connection(&pair);
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        "classes = { bulk = { prio = 6, ceil = \"4mbit\" } }\n\
         function classify(conn) if conn.remote_port ~= 22 then return \"bulk\", \"1mbit\" end end\n",
    )
    .unwrap();
    let flags = [
        "--script",
        script.to_str().unwrap(),
        "--rate",
        "3mbit:6mbit",
        "--connection-rate",
        "500kbit",
    ];
    let plan = pair
        .a
        .command(env!("CARGO_BIN_EXE_shaper"))
        .args(["plan", "-i", "veth0", "--state-dir"])
        .arg(dir.path().join("state"))
        .args(flags)
        .output()
        .unwrap();
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let text = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert!(
        text.contains("made from this command's configuration")
            && text.contains("no daemon answers"),
        "{text}"
    );
    let planned = operations(&text);
    assert!(
        planned.iter().any(|l| l.contains("ceil 1mbit")),
        "the connection's own leaf: {planned:#?}"
    );
    let mut args = vec!["--dry-run"];
    args.extend(flags);
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &args);
    daemon.wait_for(10, "a dry run", |s| {
        s["interfaces"][0]["state"] == "dry-run"
    });
    let logged = daemon.log_text();
    // One log line per operation.
    let would: Vec<String> = logged
        .lines()
        .filter_map(|l| l.split_once("would apply: "))
        .map(|(_, op)| op.trim().to_string())
        .collect();
    assert!(!would.is_empty(), "no plan logged:\n{logged}");
    assert_eq!(would, planned, "log:\n{logged}");
    assert!(classes(&pair.a).is_empty(), "a dry run installs nothing");
    // With a daemon running, the plan says it is not made from that daemon's configuration.
    let again = pair
        .a
        .command(env!("CARGO_BIN_EXE_shaper"))
        .args(["plan", "-i", "veth0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .args(flags)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("not the running daemon's (pid"), "{text}");
}

/// The daemon's thread count and resident memory (KiB), from /proc.
fn footprint(daemon: &DaemonProcess) -> (usize, u64) {
    let pid = daemon.child.as_ref().expect("running").id();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (threads, rss)
}

/// Whether a TCP connection from `a` to `b` opens within `limit` (outbound passes the upload
/// tree; its answers pass the ingress redirect).
fn outbound_opens_within(pair: &NetnsPair, limit: std::time::Duration) -> bool {
    let listener = pair
        .b
        .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        let opened = pair.a.run(|| {
            TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500)).is_ok()
        });
        if opened {
            return true;
        }
    }
    false
}

#[test]
fn under_each_fault_traffic_flows_and_the_daemon_stays_bounded() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    let good = "classes = { bulk = { prio = 7, ceil = \"3mbit\" } }\n\
                function classify(conn) return \"bulk\" end\n";
    std::fs::write(&script, good).unwrap();
    let _conn = connection(&pair);
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--script", script.to_str().unwrap()]);
    daemon.wait_for(10, "shaping", |s| {
        shaping(s) && classes(&pair.a).contains("ceil 3Mbit")
    });
    let (threads, rss) = footprint(&daemon);
    let check = |fault: &str| {
        assert!(
            pair.inbound_opens_within(allowance(3)),
            "{fault}: inbound TCP\nlog:\n{}",
            daemon.log_text()
        );
        assert!(
            outbound_opens_within(&pair, allowance(3)),
            "{fault}: outbound TCP\nlog:\n{}",
            daemon.log_text()
        );
        let (t, r) = footprint(&daemon);
        eprintln!("{fault}: {t} threads (from {threads}), {r} KiB resident (from {rss})");
        assert!(t <= threads + 4, "{fault}: {t} threads, {threads} at start");
        assert!(
            r <= rss + 32 * 1024,
            "{fault}: {r} KiB resident, {rss} at start"
        );
    };

    pair.a.ip(&["link", "del", "shp-veth0"]);
    check("IFB deleted");

    let out = pair
        .a
        .command("tc")
        .args(["qdisc", "del", "dev", "veth0", "root"])
        .output()
        .unwrap();
    assert!(out.status.success());
    check("root qdisc deleted by hand");

    std::fs::write(&script, "function classify(conn) while true do end end\n").unwrap();
    daemon.wait_for_log(3, "instruction budget exceeded");
    daemon.cycles_pass(2);
    check("a policy that never returns");
    std::fs::write(&script, "function classify(conn)\n  return nil, \n").unwrap();
    daemon.wait_for_log(1, "policy.lua:3:");
    daemon.cycles_pass(2);
    check("a policy with a syntax error");
    std::fs::write(&script, good).unwrap();

    let socket = dir.path().join("run/shaper.sock");
    let idle: Vec<_> = (0..100)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let mut long = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let _ = std::io::Write::write_all(&mut long, &vec![b'x'; 8 << 20]);
    check("100 idle control clients and an 8 MB request line");
    // Served one after another, the idle clients (2 s each) would keep status past its 30 s.
    let out = daemon.control(&["status"]);
    assert!(out.status.success(), "status answers beside idle clients");
    drop(idle);

    daemon.wait_for(10, "shaping again", |s| {
        shaping(s) && classes(&pair.a).contains("ceil 3Mbit")
    });
}
