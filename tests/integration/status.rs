//! What `shaper status` shows, against a daemon in a namespace: numbers in `--json`, tc handles
//! that name what `tc class show` lists.

use std::net::{TcpListener, TcpStream};

use crate::support::daemon::DaemonProcess;
use crate::support::netns::NetnsPair;

/// A TCP connection from `a` to `b`, kept open by the returned streams.
fn connection(pair: &NetnsPair) -> (TcpListener, TcpStream, TcpStream) {
    let listener = pair
        .b
        .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let client = pair.a.run(|| TcpStream::connect(addr).unwrap());
    let (server, _) = listener.accept().unwrap();
    (listener, client, server)
}

#[test]
fn status_json_has_integers_and_handles_tc_lists() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let _conn = connection(&pair);
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--connection-rate", "1mbit:3mbit"]);
    daemon.wait_for(10, "shaping the connection", |s| {
        s["interfaces"][0]["state"] == "shaping" && s["link"].is_object()
    });
    let out = daemon.control(&["status", "--all", "--json"]);
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        s["connection_rate"],
        serde_json::json!({"up": 1_000_000, "down": 3_000_000})
    );
    assert!(s["rate"].is_null(), "unset is null: {s}");
    assert!(s["usage"]["month"]["up"].is_u64(), "{s}");
    let conn = s["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["connection"].as_str().unwrap().starts_with("tcp "))
        .unwrap_or_else(|| panic!("the connection: {s:#}"));
    assert_eq!(conn["ceil"]["up"], 1_000_000, "{conn}");
    assert!(conn["rate_down"].is_u64(), "{conn}");
    let handle = conn["handle"].as_str().expect("a leaf handle");
    let tc = crate::support::output(pair.a.command("tc").args(["class", "show", "dev", "veth0"]));
    let tc = String::from_utf8_lossy(&tc.stdout);
    let line = tc
        .lines()
        .find(|l| l.contains(&format!("class htb {handle} ")))
        .unwrap_or_else(|| panic!("{handle} in tc:\n{tc}"));
    assert!(line.contains("ceil 1Mbit"), "{line}");
    for c in s["classes"].as_array().unwrap() {
        let h = c["handle"].as_str().expect("a class handle");
        assert!(tc.contains(&format!("class htb {h} ")), "{h} in tc:\n{tc}");
    }
    let text = String::from_utf8_lossy(&daemon.control(&["status", "--all"]).stdout).into_owned();
    assert!(
        text.contains(handle) && text.contains("1mbit:3mbit"),
        "{text}"
    );
}

/// A group made for one test (`groupadd`), deleted on drop.
pub struct TestGroup {
    pub name: String,
    pub gid: u32,
}

impl TestGroup {
    pub fn new() -> TestGroup {
        // Tests run in parallel in one process: a counter keeps their groups apart.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("shpst{}-{n}", std::process::id());
        let out = crate::support::output(std::process::Command::new("groupadd").arg(&name));
        assert!(out.status.success(), "groupadd {name}: {out:?}");
        let gid = nix_gid(&name);
        TestGroup { name, gid }
    }
}

fn nix_gid(name: &str) -> u32 {
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    groups
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{name} in /etc/group"))
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("groupdel")
            .arg(&self.name)
            .status();
    }
}

const NOBODY: u32 = 65534;

/// `cmd` to run as nobody with `groups` as its only supplementary groups.
pub fn as_nobody<'a>(
    cmd: &'a mut std::process::Command,
    groups: &[u32],
) -> &'a mut std::process::Command {
    use std::os::unix::process::CommandExt;
    let groups = groups.to_vec();
    // SAFETY: only async-signal-safe syscalls between fork and exec. Groups are set first, while
    // still root; `Command::uid` would drop them.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[test]
fn the_status_group_reads_status_but_cannot_stop_or_reload() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let group = TestGroup::new();
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = DaemonProcess::start(
        &pair.a,
        dir.path(),
        &["--dry-run", "--status-group", &group.name],
    );
    let socket = std::fs::metadata(dir.path().join("run/shaper.sock")).unwrap();
    assert_eq!(socket.mode() & 0o777, 0o660);
    assert_eq!(socket.gid(), group.gid);
    let run = |args: &[&str], groups: &[u32]| {
        let mut cmd = crate::support::shaper();
        cmd.args(args)
            .arg("--runtime-dir")
            .arg(dir.path().join("run"));
        crate::support::output(as_nobody(&mut cmd, groups))
    };
    let out = run(&["status", "--json"], &[group.gid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s["cycles"].is_u64());
    for command in ["stop", "reload"] {
        let out = run(&[command], &[group.gid]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} as a member");
        assert!(
            err.contains(&format!("status group \"{}\"", group.name))
                && err.contains(&format!("sudo shaper {command}")),
            "{err}"
        );
    }
    // Not a member: the socket does not open, and the message says how to be let in.
    let out = run(&["status"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("status_group"), "{err}");
    // Still running, still root's to stop.
    daemon.status();
    assert!(daemon.control(&["stop"]).status.success());
}

#[test]
fn a_status_group_that_does_not_exist_fails_the_start_naming_the_fix() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let mut d = DaemonProcess::spawn(
        &pair.a,
        dir.path(),
        &["--dry-run", "--status-group", "nosuchgroup-shp"],
    );
    let exit = d.child.take().unwrap().wait().unwrap();
    let log = d.log_text();
    assert!(!exit.success(), "{log}");
    assert!(log.contains("groupadd nosuchgroup-shp"), "{log}");
}

/// A process in namespace `a` that names itself `name` (prctl PR_SET_NAME), connects to `to`,
/// sends 2 MB and holds the connection; prints `ready` once sent.
const NAMED: &str = r#"
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
s = socket.create_connection((sys.argv[2], int(sys.argv[3])))
s.sendall(b"x" * 2_000_000)
print("ready", flush=True)
time.sleep(120)
"#;

#[test]
fn control_characters_in_names_are_escaped_for_people_and_raw_in_json() {
    use std::io::{BufRead, BufReader, Read};
    const RAW: &str = "\x1b[31mev\nil";
    const SHOWN: &str = "\\x1b[31mev\\nil";
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        "local shaper = require(\"shaper\")\n\
         classes = { default = { prio = 4 } }\n\
         function classify(conn, ctx)\n\
         \x20 if conn.process then shaper.notify(\"seen\", \"from \" .. conn.process.name) end\n\
         \x20 return \"default\"\n\
         end\n",
    )
    .unwrap();
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--script", script.to_str().unwrap()]);
    let listener = pair
        .b
        .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let mut named = pair
        .a
        .command("/usr/bin/python3")
        .args([
            "-c",
            NAMED,
            RAW,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let (mut server, _) = listener.accept().unwrap();
    let mut sink = vec![0u8; 2_000_000];
    server.read_exact(&mut sink).unwrap();
    let mut ready = String::new();
    BufReader::new(named.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    let pid = named.id();
    // JSON keeps the raw name.
    daemon.wait_for(20, "the named process is seen", |s| {
        s["processes"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["name"] == RAW && p["pid"] == pid))
    });
    let text = |args: &[&str]| {
        let out = daemon.control(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // People see it escaped, on one row with its pid, and nothing raw reaches the terminal.
    let status = text(&["status"]);
    let row = format!("{SHOWN} ({pid})");
    assert!(status.lines().any(|l| l.starts_with(&row)), "{status}");
    assert!(
        !status.contains('\x1b') && !status.contains("\nil"),
        "{status}"
    );
    assert!(
        status.contains(&format!("seen: from {SHOWN}")),
        "the event escaped: {status}"
    );
    let all = text(&["status", "--all"]);
    assert!(
        all.lines()
            .any(|l| l.starts_with("tcp ") && l.contains(&row)),
        "{all}"
    );
    assert!(!all.contains('\x1b') && !all.contains("\nil"), "{all}");
    let events = &daemon.status()["events"];
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"] == format!("from {RAW}")),
        "{events}"
    );
    // The event's log line: one line, escaped.
    let log = daemon.log_text();
    assert!(log.contains(&format!("event seen: from {SHOWN}")), "{log}");
    assert!(!log.contains('\x1b') && !log.contains("\nil"), "{log}");
    // Usage, once saved (every second here): escaped by name, raw in JSON.
    let usage = |json: bool| {
        let mut cmd = crate::support::shaper();
        cmd.args(["usage", "--by", "process", "--state-dir"])
            .arg(dir.path().join("state"));
        if json {
            cmd.arg("--json");
        }
        let out = crate::support::output(&mut cmd);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let json: serde_json::Value = serde_json::from_str(&usage(true)).unwrap();
        let rows = json["rows"].as_array().unwrap();
        if rows
            .iter()
            .any(|r| r["name"] == RAW && r["up"].as_u64() >= Some(2_000_000))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{json:#}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let table = usage(false);
    assert!(table.lines().any(|l| l.starts_with(SHOWN)), "{table}");
    assert!(
        !table.contains('\x1b') && !table.contains("\nil"),
        "{table}"
    );
    let _ = named.kill();
    let _ = named.wait();
}
