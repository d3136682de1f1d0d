//! A probe: a child process with a known name, command line, uid and cgroup that opens sockets in
//! a namespace and sends bytes on request. It is this test binary re-executed to run the ignored
//! test `probe::probe_main`, so no extra program has to be installed.
//!
//! Protocol (stdin/stdout, one line each): the probe prints `PROBE <kind> <local address>` per
//! socket and `PROBE ready`; then `send N` sends N bytes on the TCP/IPv4 socket (answer
//! `PROBE sent`), `fork` starts a `sleep` that inherits that socket (answer `PROBE forked <pid>`),
//! and end of input makes it exit.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use super::netns::{Netns, NetnsPair};

/// The comm the probe gives itself.
pub const PROBE_NAME: &str = "shaper-probe";
/// The uid the probe runs as (nobody).
pub const PROBE_UID: u32 = 65534;
const ENV: &str = "SHAPER_TEST_PROBE";

/// Peers the probe connects to (all in the peer namespace `b`).
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub tcp4: SocketAddr,
    pub tcp6: SocketAddr,
    pub udp4: SocketAddr,
}

/// A running probe; killed, reaped and its cgroup removed on drop.
pub struct Probe {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// `(kind, local address)` of each socket: tcp4, tcp6, udp4 (connected), udp6 (unconnected).
    pub sockets: Vec<(String, SocketAddr)>,
    pub cgroup: Option<Cgroup>,
    grandchildren: Vec<u32>,
}

impl Probe {
    /// Starts a probe inside `ns`, moved into a fresh cgroup.
    pub fn start(ns: &Netns, targets: Targets) -> Probe {
        let exe = std::env::current_exe().expect("test binary path");
        let mut cmd = ns.command(exe);
        cmd.args([
            "--exact",
            "probe::probe_main",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            ENV,
            format!("{} {} {}", targets.tcp4, targets.tcp6, targets.udp4),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        // Dropping to nobody must follow the setns that `ns.command` queued (setns needs root), and
        // std's own uid switch runs before pre_exec closures, so it is done here.
        // SAFETY: setgroups/setgid/setuid are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(PROBE_UID) != 0
                    || libc::setuid(PROBE_UID) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start probe");
        let cgroup = Cgroup::create(child.id());
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut probe = Probe {
            child,
            stdin,
            stdout,
            sockets: Vec::new(),
            cgroup: Some(cgroup),
            grandchildren: Vec::new(),
        };
        loop {
            let line = probe.read_line();
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("ready"), _) => break,
                (Some(kind), Some(addr)) => probe
                    .sockets
                    .push((kind.to_string(), addr.parse().expect("probe address"))),
                _ => panic!("unexpected probe output {line:?}"),
            }
        }
        probe
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn local(&self, kind: &str) -> SocketAddr {
        self.sockets
            .iter()
            .find(|(k, _)| k == kind)
            .unwrap_or_else(|| panic!("probe has no {kind} socket"))
            .1
    }

    fn read_line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read probe");
            assert!(n > 0, "probe exited early");
            // libtest may print `test probe::probe_main ... ` on the same line first.
            if let Some(at) = line.find("PROBE ") {
                return line[at + 6..].trim_end().to_string();
            }
        }
    }

    fn ask(&mut self, request: &str) -> String {
        let stdin = self.stdin.as_mut().expect("probe stdin open");
        writeln!(stdin, "{request}").expect("write probe");
        stdin.flush().unwrap();
        self.read_line()
    }

    /// Sends `n` bytes on the TCP/IPv4 socket and waits until they were written.
    pub fn send(&mut self, n: usize) {
        assert_eq!(self.ask(&format!("send {n}")), "sent");
    }

    /// Starts a child of the probe that inherits the TCP/IPv4 socket; returns its pid.
    pub fn fork(&mut self) -> u32 {
        let answer = self.ask("fork");
        let pid = answer
            .strip_prefix("forked ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected probe answer {answer:?}"));
        self.grandchildren.push(pid);
        pid
    }

    /// Ends the probe and waits for it.
    pub fn stop(&mut self) {
        self.stdin.take();
        for pid in self.grandchildren.drain(..) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop();
        self.cgroup.take();
    }
}

/// A cgroup v2 directory the probe is moved into, removed on drop.
pub struct Cgroup {
    dir: std::path::PathBuf,
    /// The path as `/proc/<pid>/cgroup` shows it.
    pub path: String,
}

impl Cgroup {
    fn create(pid: u32) -> Cgroup {
        let mount = cgroup2_mount().expect(
            "these tests need a writable cgroup v2 hierarchy (cgroup2 in /proc/self/mountinfo)",
        );
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("shaper-test-{}-{n}", std::process::id());
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let cgroup = Cgroup {
            dir,
            path: format!("/{name}"),
        };
        std::fs::write(cgroup.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", cgroup.dir.display()));
        cgroup
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The probe has been reaped by now; an empty cgroup can be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(Into::into))
            .flatten()
    })
}

/// Listeners in `b` that accept and drain every connection, for the probe to connect to.
pub fn start_sinks(pair: &NetnsPair) -> Targets {
    use std::net::TcpListener;
    let listen = |addr: std::net::IpAddr| {
        let l = pair
            .b
            .run(|| TcpListener::bind((addr, 0)).expect("bind sink"));
        let local = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s, &mut std::io::sink());
                });
            }
        });
        local
    };
    Targets {
        tcp4: listen(NetnsPair::B_V4.into()),
        tcp6: listen(NetnsPair::B_V6.into()),
        udp4: SocketAddr::new(NetnsPair::B_V4.into(), 5353),
    }
}

/// The probe's body; does nothing unless started by [`Probe::start`].
pub fn probe_body() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    let addrs: Vec<SocketAddr> = spec.split(' ').map(|a| a.parse().unwrap()).collect();
    std::fs::write("/proc/self/comm", PROBE_NAME).expect("set probe name");
    let tcp4 = TcpStream::connect(addrs[0]).expect("probe tcp4 connect");
    let tcp6 = TcpStream::connect(addrs[1]).expect("probe tcp6 connect");
    let udp4 = UdpSocket::bind((NetnsPair::A_V4, 0)).unwrap();
    udp4.connect(addrs[2]).unwrap();
    let udp6 = UdpSocket::bind((NetnsPair::A_V6, 0)).unwrap();
    let out = std::io::stdout();
    let mut out = out.lock();
    for (kind, addr) in [
        ("tcp4", tcp4.local_addr()),
        ("tcp6", tcp6.local_addr()),
        ("udp4", udp4.local_addr()),
        ("udp6", udp6.local_addr()),
    ] {
        writeln!(out, "PROBE {kind} {}", addr.unwrap()).unwrap();
    }
    writeln!(out, "PROBE ready").unwrap();
    out.flush().unwrap();
    let mut children = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("send ") {
            let n: usize = n.parse().unwrap();
            (&tcp4).write_all(&vec![0x5a; n]).unwrap();
            writeln!(out, "PROBE sent").unwrap();
        } else if line == "fork" {
            let fd = tcp4.as_raw_fd();
            let mut cmd = Command::new("sleep");
            cmd.arg("60");
            // SAFETY: fcntl on a descriptor we own, in the forked child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                    Ok(())
                });
            }
            let child = cmd.spawn().unwrap();
            writeln!(out, "PROBE forked {}", child.id()).unwrap();
            children.push(child);
        }
        out.flush().unwrap();
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop((tcp4, tcp6, udp4, udp6));
}
