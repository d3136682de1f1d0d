//! The control socket under hostile clients (idle ones, endless lines) and the daemon's own
//! files and folders under another user's reach (issue 15, items 4 and 5).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::daemon::DaemonProcess;
use crate::support::netns::{Netns, NetnsPair};

const NOBODY: u32 = 65534;

fn qdiscs(ns: &Netns) -> String {
    let out = ns.command("tc").args(["qdisc", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

fn connect(dir: &Path) -> UnixStream {
    UnixStream::connect(dir.join("run/shaper.sock")).unwrap()
}

#[test]
fn a_hundred_idle_clients_block_neither_status_nor_sigterm() {
    let pair = NetnsPair::new();
    let before = qdiscs(&pair.a);
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = DaemonProcess::start(&pair.a, dir.path(), &["--rate", "10mbit:10mbit"]);
    daemon.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
    let idle: Vec<UnixStream> = (0..100).map(|_| connect(dir.path())).collect();
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    let status = daemon.status();
    let took = started.elapsed();
    assert!(status["cycles"].as_u64().is_some());
    assert!(took < Duration::from_secs(1), "status took {took:?}");

    // A client that never sends is answered with an error and closed, not kept forever.
    for client in &idle {
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(client).read_line(&mut line).unwrap();
        assert!(line.contains("no request within 2s"), "{line}");
    }
    // Their tasks end (and free their slots) right after answering.
    std::thread::sleep(Duration::from_millis(300));

    // Past the limit of clients served at once, a client is told so at once.
    let fresh: Vec<UnixStream> = (0..128).map(|_| connect(dir.path())).collect();
    let extra = connect(dir.path());
    extra
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&extra)
        .read_line(&mut line)
        .expect("an answer at once");
    assert!(line.contains("128 control clients already"), "{line}");

    let started = Instant::now();
    let exit = daemon.signal(libc::SIGTERM);
    let took = started.elapsed();
    assert!(exit.success(), "{exit}: {}", daemon.log_text());
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    assert_eq!(qdiscs(&pair.a), before, "torn down");
    drop((idle, fresh));
}

#[test]
fn only_root_stops_or_reloads_through_a_socket_widened_to_others() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--dry-run"]);
    let socket = dir.path().join("run/shaper.sock");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let as_nobody = |args: &[&str]| {
        crate::support::output(
            crate::support::shaper()
                .args(args)
                .arg("--runtime-dir")
                .arg(dir.path().join("run"))
                .uid(NOBODY)
                .gid(NOBODY),
        )
    };
    let out = as_nobody(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for command in ["stop", "reload"] {
        let out = as_nobody(&[command]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} as nobody");
        assert!(err.contains("only root may reload or stop shaper"), "{err}");
    }
    daemon.status();
}

#[test]
fn an_endless_request_line_is_refused_without_growing_memory() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--dry-run"]);
    let pid = daemon.child.as_ref().unwrap().id();
    daemon.status();
    let before = vm_hwm_kib(pid);

    let stream = connect(dir.path());
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0usize;
        // 300 MB, or until the daemon hangs up.
        while sent < 300 << 20 {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    let sent = flood.join().unwrap();
    assert!(
        line.contains("longer than the limit of 65536 bytes"),
        "{line}"
    );
    assert!(sent < 300 << 20, "the daemon hung up ({sent} bytes sent)");
    let after = vm_hwm_kib(pid);
    assert!(
        after < before + 8 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
    // Still serving.
    daemon.status();
}

#[test]
fn runtime_and_state_dirs_others_can_write_are_refused_naming_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let pair = NetnsPair::new();
    for (sub, how) in [("run", "owned"), ("state", "open")] {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join(sub);
        std::fs::create_dir(&bad).unwrap();
        if how == "owned" {
            std::os::unix::fs::chown(&bad, Some(NOBODY), None).unwrap();
        } else {
            std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let mut d = DaemonProcess::spawn(&pair.a, dir.path(), &["--dry-run"]);
        let exit = d.child.take().unwrap().wait().unwrap();
        let log = d.log_text();
        assert!(!exit.success(), "{sub} accepted: {log}");
        let b = bad.display();
        assert!(
            log.contains(&format!("`chown root:root {b}; chmod 755 {b}`")),
            "{log}"
        );
        assert!(!dir.path().join("run/shaper.sock").exists());
    }
    // Nor does `shaper stop` talk to a socket in a runtime dir another user owns.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(NOBODY), None).unwrap();
    let out = crate::support::output(
        crate::support::shaper()
            .args(["stop", "--runtime-dir"])
            .arg(&run),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("owned by uid 65534") && err.contains("chmod 755"),
        "{err}"
    );
    // Missing dirs are created, root's and 0755.
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--dry-run"]);
    for sub in ["run", "state"] {
        let mode = std::fs::metadata(dir.path().join(sub))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "{sub}");
    }
    drop(daemon);
}

#[test]
fn a_pid_file_planted_as_a_symlink_is_not_followed() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, run.join("shaper.pid")).unwrap();
    let mut d = DaemonProcess::spawn(&pair.a, dir.path(), &["--dry-run"]);
    let exit = d.child.take().unwrap().wait().unwrap();
    let log = d.log_text();
    assert!(!exit.success(), "{log}");
    assert!(log.contains("if it is a symlink, remove it"), "{log}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

/// Clients that connect and hold on, each reconnecting a second after it is closed, as an
/// attacker would: `metrics` ones to 127.0.0.1:PORT sending `GET /metrics` a byte a second;
/// `idle` ones to the unix socket PATH sending nothing. Prints `started` once every client has
/// connected, then each second `open N answers A`, where A counts, by their first word, the
/// answers the daemon gave before closing (`503`, `408`, `{"ok":false…` as `refused`…).
const FLOOD: &str = r#"
import asyncio, collections, json, socket, sys
kind, where, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = {"open": 0, "started": 0}
answers = collections.Counter()
async def connect():
    if kind == "metrics":
        return await asyncio.open_connection("127.0.0.1", int(where))
    return await asyncio.open_unix_connection(where)
async def client():
    first = True
    while True:
        try:
            r, w = await connect()
        except OSError:
            await asyncio.sleep(1)
            continue
        state["open"] += 1
        if first:
            first = False
            state["started"] += 1
        try:
            request = b"GET /metrics HTTP/1.0\r\n\r\n" if kind == "metrics" else b""
            data = b""
            for i in range(1000):
                if i < len(request):
                    w.write(request[i:i + 1])
                    await w.drain()
                try:
                    data = await asyncio.wait_for(r.read(4096), 1.0)
                    break
                except asyncio.TimeoutError:
                    continue
            if data.startswith(b"HTTP/"):
                answers[data.split(b" ")[1].decode()] += 1
            elif b"already" in data:
                answers["busy"] += 1
            elif data:
                answers["other"] += 1
            else:
                answers["closed"] += 1
        except OSError:
            answers["reset"] += 1
        finally:
            state["open"] -= 1
            w.close()
        await asyncio.sleep(1)
async def report():
    said = False
    while True:
        if not said and state["started"] == n:
            print("started", flush=True)
            said = True
        print("open", state["open"], "answers", json.dumps(answers), flush=True)
        await asyncio.sleep(1)
async def main():
    await asyncio.gather(report(), *(client() for _ in range(n)))
asyncio.run(main())
"#;

/// A running [`FLOOD`], killed on drop.
struct Flood {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Flood {
    /// Starts `cmd` (python3 as whoever the test wants) on `FLOOD KIND WHERE N` and waits until
    /// all N clients have connected.
    fn start(cmd: &mut std::process::Command, kind: &str, at: &str, n: usize) -> Flood {
        use std::process::Stdio;
        let mut child = cmd
            .args(["-c", FLOOD, kind, at, &n.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let flood = Flood { child, lines };
        loop {
            let line = flood
                .lines
                .recv_timeout(Duration::from_secs(60))
                .expect("the flood's clients connect");
            if line == "started" {
                return flood;
            }
        }
    }

    /// The flood's last report (`open N answers {...}`), after checking it still runs.
    fn report(&mut self) -> String {
        assert!(self.child.try_wait().unwrap().is_none(), "the flood died");
        // Reports come each second: wait for a fresh one.
        let mut last = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a report");
        while let Ok(line) = self.lines.try_recv() {
            last = line;
        }
        last
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs root's `status` and `reload` `rounds` times against `daemon`; each must succeed. The
/// slowest answer.
fn root_is_served(daemon: &DaemonProcess, rounds: usize) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..rounds {
        for args in [&["status", "--json"][..], &["reload"][..]] {
            let started = Instant::now();
            let out = daemon.control(args);
            slowest = slowest.max(started.elapsed());
            assert!(
                out.status.success(),
                "{args:?} as root: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    slowest
}

#[test]
fn three_hundred_slow_metrics_clients_lock_neither_root_nor_metrics_out() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(
        &pair.a,
        dir.path(),
        &["--dry-run", "--metrics-listen", "127.0.0.1:9639"],
    );
    let mut flood = Flood::start(
        &mut pair.a.command("/usr/bin/python3"),
        "metrics",
        "9639",
        300,
    );
    // Root is answered while the 300 are at it (the issue's figure is 1 s; a generous bound
    // here, as the machine may be busy: before the separate budgets root was refused outright).
    let slowest = root_is_served(&daemon, 5);
    eprintln!("root's slowest status/reload with 300 slow metrics clients: {slowest:?}");
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
    // The excess was told so (503), not closed silently; the slow ones were dropped after the
    // header deadline (408).
    std::thread::sleep(Duration::from_secs(3));
    let report = flood.report();
    eprintln!("flood: {report}");
    assert!(report.starts_with("open "), "{report}");
    assert!(
        report.contains("\"503\"") && report.contains("\"408\""),
        "{report}"
    );
    assert!(!report.contains("closed"), "{report}");
    drop(flood);
    // Once the flood ends, a scrape with bare-LF line ends is answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let mut stream = pair
            .a
            .run(|| std::net::TcpStream::connect("127.0.0.1:9639").unwrap());
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\n\n").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
        if !answer.starts_with("HTTP/1.0 503") || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("# EOF\n"), "{answer}");
}

#[test]
fn two_hundred_idle_clients_of_the_status_group_do_not_lock_root_out() {
    use std::os::unix::fs::PermissionsExt;
    let group = crate::status::TestGroup::new();
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = DaemonProcess::start(
        &pair.a,
        dir.path(),
        &["--dry-run", "--status-group", &group.name],
    );
    let socket = dir.path().join("run/shaper.sock");
    let mut python = std::process::Command::new("/usr/bin/python3");
    let mut flood = Flood::start(
        crate::status::as_nobody(&mut python, &[group.gid]),
        "idle",
        socket.to_str().unwrap(),
        200,
    );
    let slowest = root_is_served(&daemon, 5);
    eprintln!("root's slowest status/reload with 200 idle status_group clients: {slowest:?}");
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
    // The member was held to its share and told so.
    let report = flood.report();
    eprintln!("flood: {report}");
    assert!(report.contains("\"busy\""), "{report}");
    assert!(!report.contains("closed"), "{report}");
}

#[test]
fn status_and_stop_find_a_daemon_whose_runtime_dir_was_deleted() {
    use std::os::unix::fs::PermissionsExt;
    let pair = NetnsPair::new();
    let before = qdiscs(&pair.a);
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = DaemonProcess::start(&pair.a, dir.path(), &["--rate", "10mbit:10mbit"]);
    daemon.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
    let pid = daemon.child.as_ref().unwrap().id();
    let run = dir.path().join("run");
    std::fs::remove_dir_all(&run).unwrap();
    // Put back within a few cycles (polled: how soon depends on the machine's load).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = daemon.control(&["status", "--json"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status after the runtime dir was deleted: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // As at start: the dir root's and 0755, the socket 0600, the pid file names the daemon.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&run), 0o755);
    assert_eq!(mode(&run.join("shaper.sock")), 0o600);
    let named = std::fs::read_to_string(run.join("shaper.pid")).unwrap();
    assert_eq!(named.trim(), pid.to_string());
    assert!(
        daemon.log_text().contains("put back"),
        "{}",
        daemon.log_text()
    );
    // A second daemon on the same runtime dir is still refused (the pid file is locked again).
    let second = tempfile::tempdir().unwrap();
    let other = crate::support::output(
        pair.a
            .command(env!("CARGO_BIN_EXE_shaper"))
            .args(["run", "--dry-run", "-i", "veth0", "--runtime-dir"])
            .arg(&run)
            .arg("--state-dir")
            .arg(second.path()),
    );
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{err}");
    assert!(
        err.contains(&format!("another shaper (pid {pid}) is running")),
        "{err}"
    );
    let out = daemon.control(&["stop"]);
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exit = daemon.exit_within(30);
    assert!(exit.success(), "{exit}: {}", daemon.log_text());
    assert_eq!(qdiscs(&pair.a), before, "torn down");
    assert!(!run.join("shaper.sock").exists() && !run.join("shaper.pid").exists());
}
