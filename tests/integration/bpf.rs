//! The first-packet classifier (src/classify) against the real kernel: programs attached to a
//! cgroup the test creates (never the machine's root cgroup) and to the veth of a namespace pair,
//! with HTB trees set up by `tc`. Class counters are read with `tc -s`; the assertions count
//! packets, which the CPU's speed cannot move.
//!
//! The sockets belong to a child: this test binary re-executed to run the ignored test
//! `bpf::child_main`, moved into the test's cgroup before it runs (so every socket it creates
//! is covered), entered into namespace `a`, and driven over stdin/stdout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use shaper::classify::{BpfClassifier, DownloadHook, NewSocket};
use shaper::scan::Proto;

use crate::support::cgroup::TestCgroup;
use crate::support::netns::{Netns, NetnsPair};

const ENV: &str = "SHAPER_TEST_BPF_CHILD";
const CHILD_COMM: &str = "shaper-bpfkid";
const NOBODY: u32 = 65534;
const IFB: &str = "ifbt0";
/// `SO_COOKIE` (asm-generic/socket.h; the same on every architecture shaper builds for).
const SO_COOKIE: i32 = 57;

/// A child process in the test's cgroup and namespace `a`; killed and reaped on drop.
pub(crate) struct Kid {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Kid {
    pub(crate) fn start(ns: &Netns, cgroup: &TestCgroup, as_nobody: bool) -> Kid {
        let exe = std::env::current_exe().expect("test binary path");
        Kid::start_by(ns.command(exe), cgroup, as_nobody)
    }

    /// As [`Kid::start`], by `cmd`: this test binary, or a command that runs it (`nsenter`).
    pub(crate) fn start_by(mut cmd: Command, cgroup: &TestCgroup, as_nobody: bool) -> Kid {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.dir.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let procs_fd: RawFd = procs.as_raw_fd();
        cmd.args([
            "--exact",
            "bpf::child_main",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        // SAFETY: write/setgroups/setgid/setuid are async-signal-safe; `procs` outlives spawn.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writer: the child is in the cgroup before it creates anything.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if as_nobody
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(NOBODY) != 0
                        || libc::setuid(NOBODY) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start child");
        drop(procs);
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut kid = Kid {
            child,
            stdin,
            stdout,
        };
        assert_eq!(kid.read_line(), "ready");
        kid
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn read_line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read child");
            assert!(n > 0, "child exited early");
            if let Some(at) = line.find("BPFKID ") {
                return line[at + 7..].trim_end().to_string();
            }
        }
    }

    /// Sends one request; returns the answer's words.
    pub(crate) fn ask(&mut self, request: &str) -> Vec<String> {
        writeln!(self.stdin, "{request}").expect("write child");
        self.stdin.flush().unwrap();
        let answer = self.read_line();
        assert!(
            !answer.starts_with("error"),
            "child failed `{request}`: {answer}"
        );
        answer.split_whitespace().map(str::to_string).collect()
    }

    /// Creates a socket (`tcp4`, `tcp6`, `udp4`, `udp6`); returns its index and cookie.
    pub(crate) fn socket(&mut self, kind: &str) -> (usize, u64) {
        let a = self.ask(&format!("socket {kind}"));
        (a[0].parse().unwrap(), a[1].parse().unwrap())
    }

    /// Connects socket `i`; returns its local address.
    pub(crate) fn connect(&mut self, i: usize, to: SocketAddr) -> SocketAddr {
        self.ask(&format!("connect {i} {to}"))[1].parse().unwrap()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: runs only when started by [`Kid::start`].
#[test]
#[ignore = "run as a child process by the bpf tests"]
fn child_main() {
    if std::env::var_os(ENV).is_none() {
        return;
    }
    let name = std::ffi::CString::new(CHILD_COMM).unwrap();
    // SAFETY: PR_SET_NAME with a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let mut sockets: Vec<socket2::Socket> = Vec::new();
    let mut classifier: Option<BpfClassifier> = None;
    let out = |s: String| {
        println!("BPFKID {s}");
        std::io::stdout().flush().unwrap();
    };
    out("ready".into());
    for line in std::io::stdin().lines() {
        let line = line.unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        let idx = |k: usize| w[k].parse::<usize>().unwrap();
        let addr = |k: usize| w[k].parse::<SocketAddr>().unwrap();
        let answer: std::io::Result<String> = (|| match w[0] {
            "socket" => {
                let (domain, ty) = match w[1] {
                    "tcp4" => (socket2::Domain::IPV4, socket2::Type::STREAM),
                    "tcp6" => (socket2::Domain::IPV6, socket2::Type::STREAM),
                    "udp4" => (socket2::Domain::IPV4, socket2::Type::DGRAM),
                    _ => (socket2::Domain::IPV6, socket2::Type::DGRAM),
                };
                let s = socket2::Socket::new(domain, ty, None)?;
                let c = cookie(&s);
                sockets.push(s);
                Ok(format!("{} {c}", sockets.len() - 1))
            }
            "connect" => {
                let s = &sockets[idx(1)];
                s.connect(&addr(2).into())?;
                Ok(format!("ok {}", local(s)))
            }
            "bind" => {
                let s = &sockets[idx(1)];
                s.bind(&addr(2).into())?;
                Ok(format!("ok {}", local(s)))
            }
            "listen" => {
                sockets[idx(1)].listen(16)?;
                Ok("ok".into())
            }
            "accept" => {
                let (s, peer) = sockets[idx(1)].accept()?;
                let c = cookie(&s);
                sockets.push(s);
                let peer = peer.as_socket().unwrap();
                Ok(format!("{} {c} {peer}", sockets.len() - 1))
            }
            // send I N [COUNT]: COUNT writes (datagrams on UDP) of N bytes.
            "send" => {
                let s = &mut sockets[idx(1)];
                let buf = vec![7u8; idx(2)];
                for _ in 0..w.get(3).map_or(1, |c| c.parse().unwrap()) {
                    s.write_all(&buf)?;
                }
                Ok("ok".into())
            }
            "sendto" => {
                let buf = vec![7u8; idx(3)];
                sockets[idx(1)].send_to(&buf, &addr(2).into())?;
                Ok("ok".into())
            }
            // recv I N: reads until N bytes arrived (UDP: N datagrams).
            "recv" => {
                let s = &mut sockets[idx(1)];
                let stream = s.r#type()? == socket2::Type::STREAM;
                let mut buf = vec![0u8; 65536];
                let mut got = 0;
                while got < idx(2) {
                    let n = s.read(&mut buf)?;
                    got += if stream { n } else { 1 };
                }
                Ok("ok".into())
            }
            "attach" => {
                // As the daemon does on this kernel (the child is already in the namespace).
                let hook = crate::support::kernel::download_hook();
                let c = BpfClassifier::attach_with(Path::new(w[1]), w[2], hook)
                    .and_then(|mut c| c.attach_cls_bpf().map(|()| c))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let ids = c.program_ids();
                classifier = Some(c);
                Ok(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
            }
            // probe PATH: `ok`, or `refused VARIANT message`.
            "probe" => Ok(match shaper::classify::probe(Path::new(w[1])) {
                Ok(()) => "ok".into(),
                Err(e) => {
                    let variant = format!("{e:?}");
                    let variant = variant.split([' ', '{', '(']).next().unwrap_or_default();
                    format!("refused {variant} {e}")
                }
            }),
            // connect-many ADDR N: N sequential TCP connections; one `t COOKIE NS` line each.
            "connect-many" => {
                for _ in 0..idx(2) {
                    let s = socket2::Socket::new(
                        socket2::Domain::for_address(addr(1)),
                        socket2::Type::STREAM,
                        None,
                    )?;
                    let c = cookie(&s);
                    let t0 = monotonic_ns();
                    s.connect(&addr(1).into())?;
                    out(format!("t {c} {t0}"));
                }
                Ok("done".into())
            }
            _ => Ok(format!("error unknown request {line:?}")),
        })();
        out(answer.unwrap_or_else(|e| format!("error {e}")));
    }
    drop(classifier);
}

pub(crate) fn cookie(s: &socket2::Socket) -> u64 {
    let mut v = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the size given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    v
}

fn local(s: &socket2::Socket) -> SocketAddr {
    s.local_addr().unwrap().as_socket().unwrap()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A namespace pair with HTB `5a:` (classes 10, 20, default 30) on `a`'s veth and on an IFB fed
/// by a u32 mirred redirect on its ingress (prio 2, as shaper installs it), and permanent
/// neighbour entries so no ARP or neighbour discovery lands in a class.
struct Lab {
    pair: NetnsPair,
}

impl Lab {
    fn new() -> Lab {
        let pair = NetnsPair::new();
        let a = pair.a.name().to_string();
        pair.a.ip(&["link", "add", IFB, "type", "ifb"]);
        pair.a.ip(&["link", "set", IFB, "up"]);
        for dev in ["veth0", IFB] {
            tc(
                &a,
                &format!("qdisc add dev {dev} root handle 5a: htb default 30"),
            );
            for minor in [10, 20, 30] {
                tc(
                    &a,
                    &format!("class add dev {dev} parent 5a: classid 5a:{minor} htb rate 1gbit"),
                );
            }
        }
        tc(&a, "qdisc add dev veth0 ingress");
        tc(
            &a,
            &format!(
                "filter add dev veth0 parent ffff: prio 2 protocol all u32 match u32 0 0 \
                 action mirred egress redirect dev {IFB}"
            ),
        );
        for (here, there, v4, v6) in [
            (&pair.a, &pair.b, NetnsPair::B_V4, NetnsPair::B_V6),
            (&pair.b, &pair.a, NetnsPair::A_V4, NetnsPair::A_V6),
        ] {
            let mac = mac_of(there);
            for ip in [IpAddr::from(v4), IpAddr::from(v6)] {
                here.ip(&[
                    "neigh",
                    "replace",
                    &ip.to_string(),
                    "lladdr",
                    &mac,
                    "dev",
                    "veth0",
                    "nud",
                    "permanent",
                ]);
            }
        }
        Lab { pair }
    }

    /// Attaches a classifier as the daemon does on this kernel: the download program on tcx from
    /// Linux 6.6, else (or with `SHAPER_DOWNLOAD_HOOK=cls_bpf`) as a cls_bpf filter on veth0's
    /// ingress qdisc — so each test below runs on the hook the kernel it runs on takes.
    fn attach(&self, cgroup: &TestCgroup) -> Attached {
        attach_as_the_daemon_does(&self.pair.a, &cgroup.dir, "veth0")
    }

    /// The cls_bpf download filters on veth0's ingress (`tc filter show` lines of kind `bpf`).
    fn cls_bpf_filters(&self) -> Vec<String> {
        cls_bpf_filters(self.pair.a.name())
    }

    /// `(packets, bytes)` of class `5a:minor` on `dev` in namespace `a` (`tc -s class show`;
    /// this tc prints classes as text even with `-j`).
    fn class(&self, dev: &str, minor: u32) -> (u64, u64) {
        let out = Command::new("tc")
            .args(["-n", self.pair.a.name(), "-s", "class", "show", "dev", dev])
            .output()
            .expect("run tc");
        let text = String::from_utf8_lossy(&out.stdout);
        let head = format!("class htb 5a:{minor:x} ");
        let mut lines = text.lines().skip_while(|l| !l.starts_with(&head));
        lines
            .next()
            .unwrap_or_else(|| panic!("no class 5a:{minor:x} on {dev}: {text}"));
        // " Sent 123 bytes 4 pkt (dropped 0, ...)"
        let sent: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        match sent.as_slice() {
            ["Sent", bytes, "bytes", packets, "pkt", ..] => {
                (packets.parse().unwrap(), bytes.parse().unwrap())
            }
            _ => panic!("unexpected tc output for 5a:{minor:x} on {dev}: {text}"),
        }
    }
}

/// A classifier attached in a test's namespace and dropped there: a cls_bpf download filter is
/// deleted by interface index in the dropping thread's namespace, which in the test's own would
/// name another device.
pub(crate) struct Attached {
    classifier: Option<BpfClassifier>,
    ns: std::fs::File,
}

impl std::ops::Deref for Attached {
    type Target = BpfClassifier;
    fn deref(&self) -> &BpfClassifier {
        self.classifier.as_ref().expect("attached until dropped")
    }
}

impl std::ops::DerefMut for Attached {
    fn deref_mut(&mut self) -> &mut BpfClassifier {
        self.classifier.as_mut().expect("attached until dropped")
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let classifier = self.classifier.take();
        let ns = self.ns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: plain syscall on a descriptor `self` keeps open over the scope.
                if unsafe { libc::setns(ns, libc::CLONE_NEWNET) } != 0 {
                    panic!(
                        "setns to drop the classifier: {}",
                        std::io::Error::last_os_error()
                    );
                }
                drop(classifier);
            });
        });
    }
}

/// [`Lab::attach`] for any namespace, asserting the hook taken.
fn attach_as_the_daemon_does(ns: &Netns, cgroup: &Path, dev: &str) -> Attached {
    let expected = crate::support::kernel::download_hook();
    let c = ns
        .run(|| {
            let mut c = BpfClassifier::attach_with(cgroup, dev, expected)?;
            c.attach_cls_bpf()?;
            Ok::<_, shaper::classify::BpfError>(c)
        })
        .unwrap_or_else(|e| panic!("attach: {e}"));
    assert_eq!(
        c.download_hook(),
        expected,
        "tcx from Linux 6.6 (this is {:?}), cls_bpf before it or when {}=cls_bpf",
        crate::support::kernel::release(),
        shaper::daemon::bpf::DOWNLOAD_HOOK_ENV
    );
    assert!(!c.download_pending(), "the download program is attached");
    let ns = std::fs::File::open(format!("/run/netns/{}", ns.name())).expect("open the namespace");
    Attached {
        classifier: Some(c),
        ns,
    }
}

/// The cls_bpf download filters on veth0's ingress in namespace `ns`.
fn cls_bpf_filters(ns: &str) -> Vec<String> {
    let out = Command::new("tc")
        .args(["-n", ns, "filter", "show", "dev", "veth0", "ingress"])
        .output()
        .expect("run tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains(" tc_ingress "))
        .map(str::to_string)
        .collect()
}

fn tc(ns: &str, args: &str) {
    let out = Command::new("tc")
        .args(["-n", ns])
        .args(args.split_whitespace())
        .output()
        .expect("run tc");
    assert!(
        out.status.success(),
        "tc {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac_of(ns: &Netns) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "link", "show", "veth0"])).expect("ip -j output");
    v[0]["address"].as_str().unwrap().to_string()
}

/// A TCP listener in `ns` that accepts and drains every connection.
fn tcp_sink(ns: &Netns, ip: IpAddr) -> SocketAddr {
    let l = ns.run(|| TcpListener::bind((ip, 0)).expect("bind sink"));
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            });
        }
    });
    addr
}

/// A TCP listener in `ns` that sends `n` bytes to every connection, then closes it.
fn tcp_source(ns: &Netns, ip: IpAddr, n: usize) -> SocketAddr {
    let l = ns.run(|| TcpListener::bind((ip, 0)).expect("bind source"));
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(&vec![1u8; n]);
        }
    });
    addr
}

/// A UDP socket in `ns` that receives (and never answers), so a connected sender gets no ICMP
/// "port unreachable"; keep it alive as long as datagrams are sent to it.
fn udp_sink(ns: &Netns, ip: IpAddr) -> (UdpSocket, SocketAddr) {
    let s = ns.run(|| UdpSocket::bind((ip, 0)).expect("bind UDP sink"));
    let addr = s.local_addr().unwrap();
    (s, addr)
}

/// Waits for the event of `cookie` (normally at once; a loaded machine gets the allowance).
fn event_for(c: &mut BpfClassifier, cookie: u64, seen: &mut Vec<NewSocket>) -> NewSocket {
    let deadline = Instant::now() + crate::support::daemon::allowance(5);
    loop {
        if let Some(e) = seen.iter().find(|e| e.cookie == cookie) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no event for cookie {cookie}; got {seen:?}"
        );
        seen.extend(c.poll_new_sockets(Duration::from_millis(100)));
    }
}

const C10: u32 = 0x5a_0010;
const C20: u32 = 0x5a_0020;

#[test]
fn bpf_connection_class_applies_from_the_first_packet() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut c = lab.attach(&cg);
    let sink = tcp_sink(&lab.pair.b, NetnsPair::B_V4.into());
    let mut kid = Kid::start(&lab.pair.a, &cg, true);

    // TCP: the cookie is mapped before connect, so the SYN is the first packet in 5a:10.
    let (tcp, cookie) = kid.socket("tcp4");
    c.set_connection(cookie, Some(C10), Some(C20)).unwrap();
    kid.connect(tcp, sink);
    assert_eq!(
        lab.class("veth0", 0x10).0,
        2,
        "SYN and handshake ACK in 5a:10"
    );
    kid.ask(&format!("send {tcp} 100000"));
    assert!(lab.class("veth0", 0x10).1 >= 100_000);

    // UDP: 20 datagrams of 100 bytes = exactly 20 packets of 142 bytes on the wire.
    let (udp, ucookie) = kid.socket("udp6");
    c.set_connection(ucookie, Some(C20), None).unwrap();
    let (_keep, peer) = udp_sink(&lab.pair.b, NetnsPair::B_V6.into());
    kid.connect(udp, peer);
    kid.ask(&format!("send {udp} 100 20"));
    assert_eq!(lab.class("veth0", 0x20), (20, 20 * (100 + 8 + 40 + 14)));

    // Per-socket counters, IP bytes: the UDP socket's are exact.
    let counted = c.counters(ucookie).expect("counters of the UDP socket");
    assert_eq!((counted.up, counted.down), (20 * (100 + 8 + 40), 0));
    assert!(c.counters(cookie).unwrap().up > 100_000);

    // A connection removed from the map goes back to the default class.
    c.remove_connection(ucookie).unwrap();
    kid.ask(&format!("send {udp} 100 5"));
    assert_eq!(lab.class("veth0", 0x20).0, 20);
}

#[test]
fn bpf_process_default_classifies_new_connections_without_userspace() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut c = lab.attach(&cg);
    let sink = tcp_sink(&lab.pair.b, NetnsPair::B_V6.into());
    let mut kid = Kid::start(&lab.pair.a, &cg, true);
    c.set_process_default(kid.pid(), Some(C20), None).unwrap();

    let (tcp, cookie) = kid.socket("tcp6");
    kid.connect(tcp, sink);
    assert_eq!(lab.class("veth0", 0x20).0, 2, "SYN and ACK in 5a:20");
    kid.ask(&format!("send {tcp} 50000"));
    assert!(lab.class("veth0", 0x20).1 >= 50_000);
    assert_eq!(lab.class("veth0", 0x10).0, 0);

    // The connection's own class wins over its process's.
    c.set_connection(cookie, Some(C10), None).unwrap();
    kid.ask(&format!("send {tcp} 50000"));
    assert!(lab.class("veth0", 0x10).1 >= 50_000);

    // A process without a class for new connections is left to the default class.
    c.remove_process(kid.pid()).unwrap();
    let before = lab.class("veth0", 0x20).0;
    let (udp, _) = kid.socket("udp4");
    let (_keep, peer) = udp_sink(&lab.pair.b, NetnsPair::B_V4.into());
    kid.connect(udp, peer);
    kid.ask(&format!("send {udp} 100 3"));
    assert_eq!(lab.class("veth0", 0x20).0, before);
}

#[test]
fn bpf_download_packets_land_in_the_ifb_class() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut c = lab.attach(&cg);
    let mut kid = Kid::start(&lab.pair.a, &cg, true);

    // UDP (unconnected, IPv4): 30 datagrams from the peer, exactly 30 packets in the IFB's 5a:10.
    let (udp, ucookie) = kid.socket("udp4");
    c.set_connection(ucookie, None, Some(C10)).unwrap();
    let bound: SocketAddr = kid.ask(&format!("bind {udp} {}:0", NetnsPair::A_V4))[1]
        .parse()
        .unwrap();
    lab.pair.b.run(|| {
        let s = UdpSocket::bind((NetnsPair::B_V4, 0)).unwrap();
        for _ in 0..30 {
            s.send_to(&[3u8; 200], bound).unwrap();
        }
    });
    kid.ask(&format!("recv {udp} 30"));
    assert_eq!(lab.class(IFB, 0x10), (30, 30 * (200 + 8 + 20 + 14)));

    // TCP, IPv6, classified by its process: everything the peer sends lands in 5a:20.
    c.set_process_default(kid.pid(), None, Some(C20)).unwrap();
    let source = tcp_source(&lab.pair.b, NetnsPair::B_V6.into(), 200_000);
    let (tcp, _) = kid.socket("tcp6");
    kid.connect(tcp, source);
    kid.ask(&format!("recv {tcp} 200000"));
    let (_, bytes) = lab.class(IFB, 0x20);
    assert!(bytes >= 200_000, "IFB 5a:20 has {bytes} bytes");
    // The redirect still carries everything else: nothing was lost on the way.
    assert!(
        lab.class(IFB, 0x30).0 < 50,
        "little else in the default class"
    );

    // TCP passive, IPv4: an accepted socket is found by its own cookie, not its listener's
    // (whose socket storage it starts as a copy of), so its class wins over the process's.
    let (l, _) = kid.socket("tcp4");
    let listen: SocketAddr = kid.ask(&format!("bind {l} {}:0", NetnsPair::A_V4))[1]
        .parse()
        .unwrap();
    kid.ask(&format!("listen {l}"));
    let mut client = lab
        .pair
        .b
        .run(|| std::net::TcpStream::connect(listen).unwrap());
    let a = kid.ask(&format!("accept {l}"));
    let (accepted, cookie): (usize, u64) = (a[0].parse().unwrap(), a[1].parse().unwrap());
    c.set_connection(cookie, None, Some(C10)).unwrap();
    let (_, before) = lab.class(IFB, 0x10);
    client.write_all(&[5u8; 100_000]).unwrap();
    kid.ask(&format!("recv {accepted} 100000"));
    let (_, after) = lab.class(IFB, 0x10);
    assert!(
        after - before >= 100_000,
        "IFB 5a:10 got {} bytes",
        after - before
    );
}

#[test]
fn bpf_reports_new_sockets_with_owner_and_tuple() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut c = lab.attach(&cg);
    let sink4 = tcp_sink(&lab.pair.b, NetnsPair::B_V4.into());
    let sink6 = tcp_sink(&lab.pair.b, NetnsPair::B_V6.into());
    let mut kid = Kid::start(&lab.pair.a, &cg, true);
    let cgroup_id = shaper::classify::cgroup_id(&cg.dir).unwrap();
    let mut seen = Vec::new();
    let mut check = |c: &mut BpfClassifier,
                     cookie: u64,
                     proto: Proto,
                     local: SocketAddr,
                     remote: SocketAddr,
                     tgid: u32| {
        let e = event_for(c, cookie, &mut seen);
        assert_eq!(
            (e.tgid, e.uid, e.comm.as_str(), e.cgroup_id, e.proto),
            (tgid, NOBODY, CHILD_COMM, cgroup_id, proto),
            "{e:?}"
        );
        assert_eq!((e.local, e.remote), (local, remote), "{e:?}");
    };

    // TCP active, v4 and v6.
    for sink in [sink4, sink6] {
        let (i, cookie) = kid.socket(if sink.is_ipv4() { "tcp4" } else { "tcp6" });
        let local = kid.connect(i, sink);
        check(&mut c, cookie, Proto::Tcp, local, sink, kid.pid());
    }
    // Connected UDP, v4; unconnected UDP, v6 (remote unspecified).
    let (_keep, peer4) = udp_sink(&lab.pair.b, NetnsPair::B_V4.into());
    let (i, cookie) = kid.socket("udp4");
    let local = kid.connect(i, peer4);
    kid.ask(&format!("send {i} 10"));
    check(&mut c, cookie, Proto::Udp, local, peer4, kid.pid());
    let (i, cookie) = kid.socket("udp6");
    let local: SocketAddr = kid.ask(&format!("bind {i} [{}]:0", NetnsPair::A_V6))[1]
        .parse()
        .unwrap();
    kid.ask(&format!("sendto {i} [{}]:9 10", NetnsPair::B_V6));
    check(
        &mut c,
        cookie,
        Proto::Udp,
        local,
        "[::]:0".parse().unwrap(),
        kid.pid(),
    );
    // TCP passive, v6: the accepted socket inherits its owner from the listener.
    let (l, _) = kid.socket("tcp6");
    let listen: SocketAddr = kid.ask(&format!("bind {l} [{}]:0", NetnsPair::A_V6))[1]
        .parse()
        .unwrap();
    kid.ask(&format!("listen {l}"));
    let client = lab.pair.b.run(|| {
        let mut s = std::net::TcpStream::connect(listen).unwrap();
        s.write_all(b"hello").unwrap(); // an accepted socket is reported on its first packet
        s
    });
    let a = kid.ask(&format!("accept {l}"));
    let (accepted, peer): (u64, SocketAddr) = (a[1].parse().unwrap(), a[2].parse().unwrap());
    check(&mut c, accepted, Proto::Tcp, listen, peer, kid.pid());
    drop(client);
}

#[test]
fn bpf_programs_go_with_the_classifier_and_with_a_killed_owner() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let sink = tcp_sink(&lab.pair.b, NetnsPair::B_V4.into());

    let cls_bpf = crate::support::kernel::download_hook() == DownloadHook::ClsBpf;
    let filters_while_attached = usize::from(cls_bpf);

    // Dropped in this process.
    let c = lab.attach(&cg);
    let ids = c.program_ids();
    assert_eq!(ids.len(), 8, "six programs and the exec and exit hooks");
    assert!(ids.iter().all(|id| loaded(*id)));
    assert_eq!(lab.cls_bpf_filters().len(), filters_while_attached);
    drop(c);
    wait_unloaded(&ids);
    assert_eq!(lab.cls_bpf_filters(), Vec::<String>::new(), "dropped");

    // Attached by a child that is then SIGKILLed (root: it loads programs).
    let other = TestCgroup::new();
    let mut owner = Kid::start(&lab.pair.a, &other, false);
    let ids: Vec<u32> = owner
        .ask(&format!("attach {} veth0", cg.dir.display()))
        .iter()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 8, "six programs and the exec and exit hooks");
    assert!(ids.iter().all(|id| loaded(*id)));
    assert_eq!(lab.cls_bpf_filters().len(), filters_while_attached);
    owner.child.kill().unwrap();
    owner.child.wait().unwrap();
    if cls_bpf {
        // A tc filter is not a link: the killed owner's outlives it (the daemon's restart
        // replaces it, `shaper clear` removes it with the ingress qdisc), holding the download
        // program, and only that one.
        let left = lab.cls_bpf_filters();
        assert_eq!(left.len(), 1, "the killed owner's filter stays: {left:?}");
        wait_unloaded_but(&ids, 1);
        tc(lab.pair.a.name(), "filter del dev veth0 ingress pref 1");
    }
    wait_unloaded(&ids);

    // Traffic still flows, both ways, for a process in the cgroup.
    let mut kid = Kid::start(&lab.pair.a, &cg, true);
    let (i, _) = kid.socket("tcp4");
    kid.connect(i, sink);
    kid.ask(&format!("send {i} 10000"));
    let source = tcp_source(&lab.pair.b, NetnsPair::B_V4.into(), 10_000);
    let (j, _) = kid.socket("tcp4");
    kid.connect(j, source);
    kid.ask(&format!("recv {j} 10000"));
}

fn loaded(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
}

fn wait_unloaded(ids: &[u32]) {
    wait_unloaded_but(ids, 0);
}

/// Waits until at most `kept` of `ids` are still loaded.
fn wait_unloaded_but(ids: &[u32], kept: usize) {
    let deadline = Instant::now() + crate::support::daemon::allowance(5);
    while ids.iter().filter(|id| loaded(**id)).count() > kept {
        assert!(
            Instant::now() < deadline,
            "programs {ids:?} still loaded: something still holds them"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Prints (does not assert) how long it takes from `connect()` to the new socket's event being
/// read in userspace, over 1000 sequential connections.
#[test]
fn bpf_new_socket_event_latency() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut c = lab.attach(&cg);
    let sink = tcp_sink(&lab.pair.b, NetnsPair::B_V4.into());
    let mut kid = Kid::start(&lab.pair.a, &cg, true);
    const N: usize = 1000;
    let reader = std::thread::spawn(move || {
        let mut read_at = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while read_at.len() < N && Instant::now() < deadline {
            for e in c.poll_new_sockets(Duration::from_millis(100)) {
                read_at.insert(e.cookie, monotonic_ns());
            }
        }
        read_at
    });
    writeln!(kid.stdin, "connect-many {sink} {N}").unwrap();
    kid.stdin.flush().unwrap();
    let mut started = HashMap::new();
    loop {
        let line = kid.read_line();
        let w: Vec<&str> = line.split_whitespace().collect();
        if w[0] == "done" {
            break;
        }
        started.insert(w[1].parse::<u64>().unwrap(), w[2].parse::<u64>().unwrap());
    }
    let read_at = reader.join().unwrap();
    let mut lat: Vec<u64> = started
        .iter()
        .filter_map(|(cookie, t0)| read_at.get(cookie).map(|t| t.saturating_sub(*t0)))
        .collect();
    lat.sort_unstable();
    assert_eq!(lat.len(), N, "every connection was reported");
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "connect() → event read, {N} connections: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        pct(50),
        pct(99),
        *lat.last().unwrap() as f64 / 1000.0
    );
}

/// Programs someone else attached to the cgroup and the ingress (here: a second classifier)
/// keep working while ours are attached and after ours are gone.
#[test]
fn bpf_runs_alongside_other_programs() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    // Without tcx the download program is a cls_bpf filter at shaper's own pref and handle, one
    // per interface (the daemon's interface lock keeps a second daemon off it): a second
    // classifier's filter replaces the first's. So there, theirs only classifies uploads and
    // downloads go through ours, then, without ours, unclassified through the redirect.
    let tcx = crate::support::kernel::download_hook() == DownloadHook::Tcx;
    let mut theirs = lab.attach(&cg);
    let ours = lab.attach(&cg);
    assert_eq!(lab.cls_bpf_filters().len(), usize::from(!tcx), "one filter");
    let mut kid = Kid::start(&lab.pair.a, &cg, true);
    theirs
        .set_process_default(kid.pid(), Some(C20), Some(C20))
        .unwrap();
    let (sink, peer) = udp_sink(&lab.pair.b, NetnsPair::B_V4.into());
    let (udp, _) = kid.socket("udp4");
    let local = kid.connect(udp, peer);
    let both_ways = |kid: &mut Kid| {
        kid.ask(&format!("send {udp} 100 10"));
        for _ in 0..10 {
            sink.send_to(&[1u8; 100], local).unwrap();
        }
        kid.ask(&format!("recv {udp} 10"));
    };
    both_ways(&mut kid);
    assert_eq!(lab.class("veth0", 0x20).0, 10, "their upload class holds");
    let their_downloads = if tcx { 10 } else { 0 };
    assert_eq!(
        lab.class(IFB, 0x20).0,
        their_downloads,
        "their download class holds (tcx)"
    );
    drop(ours);
    assert_eq!(lab.cls_bpf_filters(), Vec::<String>::new(), "ours went");
    both_ways(&mut kid);
    assert_eq!(
        lab.class("veth0", 0x20).0,
        20,
        "and still does without ours"
    );
    assert_eq!(lab.class(IFB, 0x20).0, 2 * their_downloads);
}

/// `probe` says why BPF cannot be used, in words naming the fix, and loads everything when it can.
#[test]
fn bpf_probe_names_the_reason() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    shaper::classify::probe(&cg.dir).expect("root can load the programs here");
    let not_cgroup = tempfile::tempdir().unwrap();
    let e = shaper::classify::probe(not_cgroup.path()).unwrap_err();
    assert!(
        matches!(e, shaper::classify::BpfError::NotCgroup2 { .. }),
        "{e}"
    );
    // Without privileges (the child runs as nobody), the kernel refuses and the reason says so.
    let mut kid = Kid::start(&lab.pair.a, &cg, true);
    let answer = kid.ask(&format!("probe {}", cg.dir.display()));
    assert_eq!(answer[..2], ["refused", "Permission"], "{answer:?}");
    assert!(answer.join(" ").contains("CAP_BPF"), "{answer:?}");
}

/// Where tcx is missing (Linux < 6.6) the download program is a cls_bpf filter ahead of the
/// redirect; forced here. It classifies the same way and goes with the classifier.
#[test]
fn bpf_cls_bpf_fallback_classifies_download_and_leaves_no_filter() {
    let lab = Lab::new();
    let cg = TestCgroup::new();
    let mut c = lab
        .pair
        .a
        .run(|| {
            let mut c = BpfClassifier::attach_with(&cg.dir, "veth0", DownloadHook::ClsBpf)?;
            assert!(c.download_pending());
            // Twice: the second replaces the first (as after a re-added ingress qdisc).
            c.attach_cls_bpf()?;
            c.attach_cls_bpf()?;
            Ok::<_, shaper::classify::BpfError>(c)
        })
        .unwrap_or_else(|e| panic!("attach: {e}"));
    assert!(!c.download_pending());
    assert_eq!(c.download_hook(), DownloadHook::ClsBpf);
    let filters = || {
        lab.pair.a.run(|| {
            let out = Command::new("tc")
                .args(["filter", "show", "dev", "veth0", "ingress"])
                .output()
                .expect("run tc");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    assert!(filters().contains("bpf"), "{}", filters());
    let mut kid = Kid::start(&lab.pair.a, &cg, true);
    let (udp, cookie) = kid.socket("udp4");
    c.set_connection(cookie, None, Some(C10)).unwrap();
    let (sink, peer) = udp_sink(&lab.pair.b, NetnsPair::B_V4.into());
    let local = kid.connect(udp, peer);
    for _ in 0..12 {
        sink.send_to(&[2u8; 300], local).unwrap();
    }
    kid.ask(&format!("recv {udp} 12"));
    assert_eq!(lab.class(IFB, 0x10), (12, 12 * (300 + 8 + 20 + 14)));
    // A cls_bpf filter is removed over netlink, in the dropping thread's namespace.
    lab.pair.a.run(move || drop(c));
    let left = filters();
    assert!(!left.contains("bpf"), "cls_bpf filter left behind: {left}");
    assert!(left.contains("mirred"), "the redirect stays: {left}");
}
