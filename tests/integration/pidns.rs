//! The BPF classifier with the daemon in a PID namespace of its own (`unshare --pid --fork
//! --mount-proc`, as in a container): the kernel reports a new socket's creator by its pid on
//! the host, which names no process (or another one) in the daemon's `/proc`. The owner is found
//! by the socket instead. Asserted on what the CPU cannot move: which HTB class counted the
//! packets while no cycle ran, and the pid the status shows against the kernel's own record of
//! the process's pid in that namespace (`NSpid` in the host's `/proc`).

use std::process::Stdio;

use crate::bpf::Kid;
use crate::fastpath::{IFB, SLOW_IPERF, class_bytes, tc};
use crate::support::cgroup::TestCgroup;
use crate::support::daemon::{DaemonProcess, first_child, wait_until};
use crate::support::netns::NetnsPair;
use crate::support::traffic::Server;

/// A process's pid in its own PID namespace, as the kernel says (`NSpid:` of the host's
/// `/proc/<pid>/status`, innermost last).
fn pid_in_namespace(host_pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    line.split_whitespace().last().unwrap().parse().unwrap()
}

/// A process started after the daemon, in the daemon's PID namespace and in class `slow` by
/// its name: with a cycle a minute away, its upload and download land in the class's leaves (the
/// fast path found the process by its socket), the status shows its connections under its name
/// and its pid in that namespace, and the tie to its host pid that lets the kernel classify its
/// next connections is counted.
#[test]
fn a_daemon_in_its_own_pid_namespace_finds_a_new_processs_owner_by_its_socket() {
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start_bpf_policy_in_own_pid_namespace(
        &pair.a,
        dir.path(),
        &cgroup,
        SLOW_IPERF,
        &[
            "--uplink",
            "10mbit",
            "--downlink",
            "10mbit",
            "--interval",
            "60s",
        ],
    );
    let status = daemon.status();
    assert_eq!(
        status["pid"], 1,
        "the daemon is its namespace's first process"
    );
    assert_eq!(status["classifier"], "bpf", "{}", daemon.log_text());
    assert!(status["own_pid_namespace"].is_object(), "{status}");
    let log = daemon.log_text();
    assert_eq!(
        log.matches("runs in a PID namespace of its own").count(),
        1,
        "said once:\n{log}"
    );
    let cycles = || daemon.status()["cycles"].as_u64().unwrap();

    for (reverse, dev, ceil, cport) in [
        (false, "veth0", "2Mbit", 40223_u16),
        (true, IFB, "4Mbit", 40224),
    ] {
        let port = 5231 + u16::from(reverse);
        let _server = Server::start(&pair.b, port);
        let before = class_bytes(&pair.a, dev, ceil);
        let cycles_before = cycles();
        let mut cmd = daemon.in_pid_namespace(&pair.a, "iperf3");
        cmd.args(["-c", &NetnsPair::B_V4.to_string(), "-p", &port.to_string()])
            .args(["--cport", &cport.to_string(), "-t", "600", "-b", "8M"])
            .args(if reverse { &["-R"][..] } else { &[][..] })
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let procs = cgroup.enter(&mut cmd);
        let mut nsenter = cmd.spawn().expect("start nsenter iperf3");
        drop(procs);
        // nsenter forks the program it runs into the PID namespace.
        let iperf3 = first_child(nsenter.id(), "nsenter starting iperf3");
        let local_pid = pid_in_namespace(iperf3);
        assert_ne!(
            local_pid, iperf3,
            "iperf3 runs in the daemon's PID namespace"
        );

        let what = |text: &str| {
            format!(
                "reverse {reverse}: {text}\nstatus:\n{}\nclasses:\n{}\nlog:\n{}",
                String::from_utf8_lossy(&daemon.control(&["status", "--all"]).stdout),
                tc(&pair.a, &["-s", "class", "show", "dev", dev]),
                daemon.log_text()
            )
        };
        wait_until(3, "the class's leaf counting 64 KiB", || {
            (class_bytes(&pair.a, dev, ceil).0 >= before.0 + 64 * 1024)
                .then_some(())
                .ok_or_else(|| what("it counted less"))
        });
        assert_eq!(cycles(), cycles_before, "{}", what("a cycle ran"));
        // The data connection, under its process's name and its pid here, in its class.
        let all = daemon.status_all();
        let connection = all["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["connection"]
                    .as_str()
                    .is_some_and(|t| t.contains(&format!(":{cport} ")))
            })
            .cloned()
            .unwrap_or_else(|| panic!("{}", what("no connection from port {cport}")));
        assert_eq!(
            connection["process"],
            format!("iperf3 ({local_pid})"),
            "{connection}"
        );
        assert_eq!(connection["pid"], local_pid, "{connection}");
        assert_eq!(connection["class"], "slow", "{connection}");
        eprintln!("reverse {reverse}: fast path {}", all["fast_path"]);
        let ns = &all["own_pid_namespace"];
        assert!(ns["by_socket"].as_u64().unwrap() >= 2, "{ns}");
        assert!(
            ns["processes"].as_u64().unwrap() >= 1,
            "iperf3's host pid is tied to its pid here: {ns}"
        );

        // SAFETY: plain syscall on a process this test started (nsenter's child).
        unsafe { libc::kill(iperf3 as i32, libc::SIGKILL) };
        let _ = nsenter.wait();
    }
}

/// Sends SIGCONT to a stopped daemon when dropped, so a failing test does not leave it stopped
/// (its guard could not stop it then).
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        // SAFETY: plain syscall on the daemon this test started.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// A TCP sink in `b` that reads every connection to the end, on threads of its own.
fn sink(pair: &NetnsPair) -> std::net::SocketAddr {
    let listener = pair
        .b
        .run(|| std::net::TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &stream, &mut std::io::sink());
            });
        }
    });
    addr
}

/// The kernel's class for a process's new connections is keyed by its host pid: once a first
/// socket has tied a process's host pid to its pid in the daemon's namespace, its next
/// connections are classified by the kernel alone. With the daemon stopped (SIGSTOP), a new
/// connection of the tied process lands in its class's leaf, and one of a process that was
/// never tied (started while the daemon is stopped) does not.
#[test]
fn once_tied_a_process_is_classified_by_the_kernel_while_the_daemon_is_stopped() {
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    // The kids run this test binary: `integration-<hash>`, cut to 15 bytes by the kernel.
    let policy = r#"
classes = { slow = { ceil = { up = "2mbit", down = "4mbit" } }, default = {} }
function classify(conn)
  if conn.process and conn.process.name:sub(1, 12) == "integration-" then return "slow" end
  return "default"
end
"#;
    let daemon = DaemonProcess::start_bpf_policy_in_own_pid_namespace(
        &pair.a,
        dir.path(),
        &cgroup,
        policy,
        &["--uplink", "10mbit", "--downlink", "10mbit"],
    );
    let to = sink(&pair);
    let exe = std::env::current_exe().unwrap();
    let kid = || {
        let cmd = daemon.in_pid_namespace(&pair.a, exe.to_str().unwrap());
        Kid::start_by(cmd, &cgroup, false)
    };
    let mut tied = kid();
    let (first, _) = tied.socket("tcp4");
    let from = tied.connect(first, to);
    tied.ask(&format!("send {first} 1000"));
    daemon.wait_for_all(
        5,
        "the first connection decided and its process tied",
        |s| {
            let decided = s["connections"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["class"] == "slow"
                        && c["connection"]
                            .as_str()
                            .is_some_and(|t| t.contains(&format!("{from} ")))
                })
            });
            decided && s["own_pid_namespace"]["processes"].as_u64() >= Some(1)
        },
    );
    let mut untied = kid();

    let stopped = Stopped::new(daemon.inner.unwrap());
    let leaf = || class_bytes(&pair.a, "veth0", "2Mbit");
    let what = |text: &str| {
        format!(
            "{text}\nclasses:\n{}\nlog:\n{}",
            tc(&pair.a, &["-s", "class", "show", "dev", "veth0"]),
            daemon.log_text()
        )
    };
    let wait = |text: &str, done: &dyn Fn((u64, u64)) -> bool| {
        wait_until(3, text, || {
            done(leaf()).then_some(()).ok_or_else(|| what(""))
        });
    };
    let before = leaf();
    let (other, _) = untied.socket("tcp4");
    untied.connect(other, to);
    untied.ask(&format!("send {other} 65536"));
    wait("the untied process's 64 KiB through the tree", &|now| {
        now.1 >= before.1 + 65536
    });
    assert_eq!(
        leaf().0,
        before.0,
        "{}",
        what("nothing classified the untied process's connection while the daemon was stopped")
    );
    let (second, _) = tied.socket("tcp4");
    tied.connect(second, to);
    tied.ask(&format!("send {second} 65536"));
    wait(
        "the tied process's next connection in its class's leaf",
        &|now| now.0 >= before.0 + 65536,
    );
    drop(stopped);
}

/// A process outside the daemon's PID namespace (here the test's own, the host's) has no pid
/// the daemon could name: its connections are classified by what can be seen of them (here the
/// port), shown without an owner, never under another process's pid; the log says so once and
/// the status counts them.
#[test]
fn a_process_outside_the_daemons_pid_namespace_is_classified_by_what_can_be_seen() {
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let to = sink(&pair);
    let policy = format!(
        r#"
classes = {{ seen = {{ ceil = "2mbit" }}, named = {{ ceil = "3mbit" }}, default = {{}} }}
function classify(conn)
  if conn.process then return "named" end
  if conn.remote_port == {} then return "seen" end
  return "default"
end
"#,
        to.port()
    );
    let daemon = DaemonProcess::start_bpf_policy_in_own_pid_namespace(
        &pair.a,
        dir.path(),
        &cgroup,
        &policy,
        &["--uplink", "10mbit", "--downlink", "10mbit"],
    );
    let mut outside = Kid::start(&pair.a, &cgroup, false);
    let mut locals = Vec::new();
    for _ in 0..2 {
        let (s, _) = outside.socket("tcp4");
        locals.push(outside.connect(s, to));
        outside.ask(&format!("send {s} 1000"));
    }
    daemon.wait_for_all(5, "both connections decided, without an owner", |s| {
        let conns = s["connections"].as_array().cloned().unwrap_or_default();
        locals.iter().all(|local| {
            conns.iter().any(|c| {
                c["connection"]
                    .as_str()
                    .is_some_and(|t| t.contains(&format!("{local} ")))
                    && c["class"] == "seen"
                    && c["pid"].is_null()
                    && c["process"].is_null()
            })
        }) && s["own_pid_namespace"]["unresolved"].as_u64() >= Some(2)
    });
    let log = daemon.log_text();
    assert_eq!(
        log.matches("was not found in shaper's PID namespace")
            .count(),
        1,
        "said once:\n{log}"
    );
    let text = String::from_utf8_lossy(&daemon.control(&["status"]).stdout).into_owned();
    assert!(text.contains("PID namespace of its own"), "{text}");
}
