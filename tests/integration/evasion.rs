//! Ways a local process could step around the policy (issue 27), each against a real daemon in
//! a namespace, on both classifiers: a name that is not UTF-8, and `exec` into another program.
//! The assertions are the class the daemon put each connection in, which no machine load moves.

use std::net::TcpListener;
use std::process::{Child, Stdio};

use crate::support::cgroup::TestCgroup;
use crate::support::daemon::{DaemonProcess, wait_until};
use crate::support::netns::NetnsPair;

const POLICY: &str = r#"
classes = {
  free = {},
  limited = { ceil = "1mbit" },
  byname = { ceil = "2mbit" },
  default = {},
}
function classify(conn)
  local p = conn.process
  if not p then return "default" end
  if p.name == "\xff\xfeblockme" then return "byname" end
  if p.name == "limitedprog" then return "limited" end
  return "free"
end
"#;

/// Renames itself to bytes that are not UTF-8, then holds one connection.
const RENAME: &str = r#"
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"\xff\xfeblockme", 0, 0, 0)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
time.sleep(120)
"#;

/// Holds one connection, then (when the file argv[3] appears) execs a program of another name
/// (a symlink to this Python, so `comm` changes) that keeps the connection and opens another.
const EXEC: &str = r#"
import os, socket, sys, time
host, port, go, link = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.create_connection((host, int(port)))
s.set_inheritable(True)
os.symlink(sys.executable, link)
while not os.path.exists(go):
    time.sleep(0.02)
after = "import socket, sys, time\ns = socket.create_connection((sys.argv[1], int(sys.argv[2])))\ntime.sleep(120)"
os.execv(link, [link, "-c", after, host, port])
"#;

struct Setup {
    pair: NetnsPair,
    cgroup: TestCgroup,
    dir: tempfile::TempDir,
    daemon: DaemonProcess,
    listener: TcpListener,
}

fn setup(classifier: &str) -> Setup {
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = if classifier == "bpf" {
        DaemonProcess::start_bpf_policy(&pair.a, dir.path(), &cgroup, POLICY, &[])
    } else {
        let script = dir.path().join("policy.lua");
        std::fs::write(&script, POLICY).unwrap();
        let d = DaemonProcess::start(&pair.a, dir.path(), &["--script", script.to_str().unwrap()]);
        d.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
        d
    };
    assert_eq!(daemon.status()["classifier"], classifier);
    let listener = pair
        .b
        .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    Setup {
        pair,
        cgroup,
        dir,
        daemon,
        listener,
    }
}

impl Setup {
    fn python(&self, script: &str, extra: &[&str]) -> Child {
        python(&self.pair, &self.cgroup, &self.listener, script, extra)
    }

    /// Waits until `ok` holds for the (class, process) of each connection to the listener.
    fn wait_for_classes(&self, what: &str, ok: impl Fn(&[(String, String)]) -> bool) {
        let port = self.listener.local_addr().unwrap().port();
        self.daemon
            .wait_for_all(2, what, |s| ok(&connections_to(s, port)));
    }
}

/// The (class, process) of each connection to `port` in a `status --all --json`.
fn connections_to(status: &serde_json::Value, port: u16) -> Vec<(String, String)> {
    let port = format!(":{port}");
    status["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["connection"].as_str().is_some_and(|t| t.contains(&port)))
        .map(|c| {
            (
                c["class"].as_str().unwrap_or("").to_string(),
                c["process"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// `python3 -c SCRIPT B_V4 PORT EXTRA…` in namespace `a` and `cgroup`.
fn python(
    pair: &NetnsPair,
    cgroup: &TestCgroup,
    listener: &TcpListener,
    script: &str,
    extra: &[&str],
) -> Child {
    let port = listener.local_addr().unwrap().port().to_string();
    let mut cmd = pair.a.command("python3");
    cmd.args(["-c", script, &NetnsPair::B_V4.to_string(), &port])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let procs = cgroup.enter(&mut cmd);
    let child = cmd.spawn().expect("start python3");
    drop(procs);
    child
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn a_name_that_is_not_utf8_is_still_seen_by_the_policy(classifier: &str) {
    let s = setup(classifier);
    let _p = Kill(s.python(RENAME, &[]));
    s.wait_for_classes("the renamed process's connection in its class", |c| {
        c.len() == 1 && c[0].0 == "byname" && c[0].1.contains("blockme")
    });
}

#[test]
fn a_name_that_is_not_utf8_is_still_seen_by_the_policy_u32() {
    a_name_that_is_not_utf8_is_still_seen_by_the_policy("u32");
}

#[test]
fn a_name_that_is_not_utf8_is_still_seen_by_the_policy_bpf() {
    a_name_that_is_not_utf8_is_still_seen_by_the_policy("bpf");
}

fn after_exec_the_new_program_is_judged(classifier: &str) {
    let s = setup(classifier);
    let go = s.dir.path().join("go");
    let link = s.dir.path().join("limitedprog");
    let _p = Kill(s.python(EXEC, &[go.to_str().unwrap(), link.to_str().unwrap()]));
    s.wait_for_classes("the connection before exec", |c| {
        c.len() == 1 && c[0].0 == "free"
    });
    std::fs::write(&go, "").unwrap();
    s.wait_for_classes("both connections judged as the new program", |c| {
        c.len() == 2
            && c.iter()
                .all(|(class, process)| class == "limited" && process.starts_with("limitedprog"))
    });
}

#[test]
fn after_exec_the_new_program_is_judged_u32() {
    after_exec_the_new_program_is_judged("u32");
}

#[test]
fn after_exec_the_new_program_is_judged_bpf() {
    after_exec_the_new_program_is_judged("bpf");
}

/// The cls_bpf download filters on veth0's ingress (the first-packet classifier's on kernels
/// without tcx).
fn cls_bpf_filters(ns: &crate::support::netns::Netns) -> Vec<String> {
    let out = crate::support::output(
        ns.command("tc")
            .args(["filter", "show", "dev", "veth0", "ingress"]),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains(" tc_ingress "))
        .map(str::to_string)
        .collect()
}

/// A run killed on the cls_bpf download path leaves its filter (tc filters are not links); a
/// restart that does not put its own there (u32 filters, or a tcx link) removes it, so the dead
/// run's class ids are not written into the new tree.
#[test]
fn a_killed_runs_cls_bpf_filter_is_removed_whatever_classifier_starts_next() {
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let cgroup_dir = cgroup.dir.to_str().unwrap().to_string();
    let bpf = ["--classifier", "bpf", "--cgroup", &cgroup_dir];
    let env = [(shaper::daemon::bpf::DOWNLOAD_HOOK_ENV, "cls_bpf")];
    for next in [&["--classifier", "u32"][..], &bpf[..]] {
        let mut killed = DaemonProcess::start_with_env(&pair.a, dir.path(), &bpf, &env);
        killed.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
        wait_until(1, "the cls_bpf filter attached", || {
            match cls_bpf_filters(&pair.a) {
                f if f.len() == 1 => Ok(()),
                f => Err(format!("{f:?}\n{}", killed.log_text())),
            }
        });
        killed.signal(libc::SIGKILL);
        assert_eq!(cls_bpf_filters(&pair.a).len(), 1, "left by SIGKILL");
        let daemon = DaemonProcess::start(&pair.a, dir.path(), next);
        daemon.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
        assert_eq!(
            cls_bpf_filters(&pair.a),
            Vec::<String>::new(),
            "{next:?}:\n{}",
            daemon.log_text()
        );
        assert!(
            daemon
                .log_text()
                .contains("removed the first-packet classifier's filter")
        );
    }
}

const FLOOD_POLICY: &str = r#"
classes = { victim = { ceil = "4mbit" }, flood = {}, default = {} }
function classify(conn)
  local p = conn.process
  if p and p.name == "victim" then return "victim" end
  if p and p.name == "flooder" then return "flood" end
  return "default"
end
"#;

/// Opens, uses and closes UDP sockets as fast as it can (each socket's one datagram makes the
/// kernel report it) until killed, writing how many it made to the file argv[3] every 500.
const FLOODER: &str = r#"
import ctypes, os, socket, sys
ctypes.CDLL(None).prctl(15, b"flooder", 0, 0, 0)
addr, count = (sys.argv[1], 9), sys.argv[3]
n = 0
while True:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", addr)
    s.close()
    n += 1
    if n % 500 == 0:
        with open(count + ".tmp", "w") as f:
            f.write(str(n))
        os.replace(count + ".tmp", count)
"#;

/// Holds a connection it writes to, and creates the file argv[3] once it has sent on it.
const VICTIM: &str = r#"
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"victim", 0, 0, 0)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.send(b"x" * 100)
open(sys.argv[3], "w").close()
while True:
    s.send(b"x" * 100)
    time.sleep(0.05)
"#;

/// A flood of new sockets from a process that already has a class, while the daemon cannot
/// drain the kernel's queue (stopped: what a busy machine does to it, made certain): the
/// flooder's reports are deferred and counted instead of filling the queue, so a process never
/// seen before still gets its report through and its class once the daemon runs again.
#[test]
fn a_socket_flood_is_deferred_and_counted_and_a_new_process_still_gets_its_class() {
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start_bpf_policy(&pair.a, dir.path(), &cgroup, FLOOD_POLICY, &[]);
    let listener = pair
        .b
        .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let count_file = dir.path().join("flooded");
    let sent = dir.path().join("victim-sent");
    let flooded = || -> u64 {
        std::fs::read_to_string(&count_file)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    };
    let _flooder = Kill(python(
        &pair,
        &cgroup,
        &listener,
        FLOODER,
        &[count_file.to_str().unwrap()],
    ));
    // The flooder has a class in the kernel once its first sockets were decided.
    daemon.wait_for(2, "the flooder's sockets decided", |s| {
        s["fast_path"]["sockets"].as_u64() > Some(0)
    });
    let pid = daemon.pid();
    // SAFETY: plain syscalls on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    // 2,000 unread reports (about 190 KiB) are well past the 64 KiB where deferral starts.
    let from = flooded();
    wait_until(
        2,
        "2,000 sockets flooded while the daemon is stopped",
        || {
            let n = flooded();
            (n >= from + 2_000)
                .then_some(())
                .ok_or(format!("{n} from {from}"))
        },
    );
    let _victim = Kill(python(
        &pair,
        &cgroup,
        &listener,
        VICTIM,
        &[sent.to_str().unwrap()],
    ));
    wait_until(2, "the victim sent on its connection", || {
        sent.exists().then_some(()).ok_or(String::new())
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    let port = listener.local_addr().unwrap().port();
    daemon.wait_for_all(5, "the victim in its class and the flood counted", |s| {
        connections_to(s, port)
            .iter()
            .any(|(class, _)| class == "victim")
            && s["fast_path"]["deferred"].as_u64() > Some(0)
    });
    eprintln!(
        "fast path after the flood: {}",
        daemon.status()["fast_path"]
    );
    let metrics = String::from_utf8_lossy(&daemon.control(&["metrics"]).stdout).into_owned();
    assert!(
        metrics.contains("shaper_fast_path_reports_total{outcome=\"deferred\"}"),
        "{metrics}"
    );
}
