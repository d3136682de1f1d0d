//! Network-namespace test kit: a pair of throw-away namespaces joined by a veth, for tests that
//! need a real kernel network (sockets, qdiscs, filters) without touching the host's.
//!
//! ```text
//!   <name>-a                              <name>-b
//!   veth0 10.77.0.1/24, fd00:77::1/64 ─── veth0 10.77.0.2/24, fd00:77::2/64
//! ```
//!
//! Each namespace is deleted when its [`Netns`] is dropped, which also happens while a failing
//! test unwinds. Namespaces left by a test process that was killed outright are swept the next
//! time the kit is used (their names carry the creating pid). Addresses exist only inside the
//! namespaces, so tests can run in parallel and nothing reaches the host's network.
//!
//! The kit needs CAP_NET_ADMIN (CI runs as root). Without it, creating a pair panics with a message
//! saying so: a network test never passes without having run.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace this kit creates; followed by `<pid>-<n>-<a|b>`.
pub const PREFIX: &str = "shtest-";

/// One named network namespace (`/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Two namespaces joined by a veth pair with IPv4 and IPv6 addresses on both ends.
#[derive(Debug)]
pub struct NetnsPair {
    /// The side a test usually treats as "this host" (where shaper runs).
    pub a: Netns,
    /// The peer (servers, traffic sinks).
    pub b: Netns,
}

impl NetnsPair {
    /// The veth's name on both sides.
    pub const IFNAME: &'static str = "veth0";
    pub const A_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    pub const B_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    pub const A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
    pub const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);

    /// Creates the pair, or panics explaining why it could not (e.g. missing CAP_NET_ADMIN).
    pub fn new() -> NetnsPair {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        let a = Netns::create(format!("{base}-a"));
        let b = Netns::create(format!("{base}-b"));
        // Created directly inside the namespaces, so the fixed name cannot clash on the host.
        run_ip(&[
            "link",
            "add",
            Self::IFNAME,
            "netns",
            &a.name,
            "type",
            "veth",
            "peer",
            "name",
            Self::IFNAME,
            "netns",
            &b.name,
        ]);
        for (ns, v4, v6) in [(&a, Self::A_V4, Self::A_V6), (&b, Self::B_V4, Self::B_V6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", Self::IFNAME]);
            // nodad: the address is usable at once instead of after ~1 s of duplicate detection.
            ns.ip(&[
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                Self::IFNAME,
                "nodad",
            ]);
            ns.ip(&["link", "set", Self::IFNAME, "up"]);
        }
        NetnsPair { a, b }
    }

    /// The peer's address for a family (4 or 6), as seen from `a`.
    /// Whether a TCP connection from `b` to a listener in `a` opens within half a second: its
    /// SYN must pass `a`'s ingress (where a redirect to a missing device would drop it).
    pub fn inbound_opens(&self) -> bool {
        let listener = self
            .a
            .run(|| std::net::TcpListener::bind((Self::A_V4, 0)).unwrap());
        let addr = listener.local_addr().unwrap();
        self.b.run(|| {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500))
                .is_ok()
        })
    }

    /// Whether inbound TCP works again within `limit`. After a fault at `a`'s ingress, `b` may
    /// first have to resolve `a`'s address again (its ARP answers were dropped too), which takes
    /// up to a second of retries.
    pub fn inbound_opens_within(&self, limit: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if self.inbound_opens() {
                return true;
            }
        }
        false
    }

    pub fn b_addr(family: u8) -> IpAddr {
        if family == 6 {
            Self::B_V6.into()
        } else {
            Self::B_V4.into()
        }
    }

    /// `a`'s address for a family (4 or 6).
    pub fn a_addr(family: u8) -> IpAddr {
        if family == 6 {
            Self::A_V6.into()
        } else {
            Self::A_V4.into()
        }
    }
}

impl Netns {
    fn create(name: String) -> Netns {
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
        if !out.status.success() {
            panic!(
                "cannot create network namespace {name}: {}\n\
                 Network-namespace tests need CAP_NET_ADMIN: run the suite as root \
                 (e.g. `sudo -E cargo test`). They do not skip themselves.",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn open(&self) -> File {
        File::open(format!("/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("cannot open namespace {}: {e}", self.name))
    }

    /// Runs `f` on a thread that has entered this namespace; a panic in `f` propagates.
    /// Sockets created by `f` belong to the namespace even after `f` returns.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = self.open();
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&file).unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A command that runs `program` inside this namespace. The child is a direct child of the
    /// test (no `ip netns exec` in between), so its pid is the one that owns its sockets.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let file = self.open();
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open because the closure owns `file`.
        unsafe {
            cmd.pre_exec(move || enter(&file));
        }
        cmd
    }

    /// Runs `ip -n <ns> ARGS` and panics with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }
}

fn enter(file: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth ends, qdiscs and IFBs inside it with it.
        let _ = delete_netns(&self.name);
    }
}

fn delete_netns(name: &str) -> std::io::Result<Output> {
    Command::new("ip").args(["netns", "del", name]).output()
}

/// Runs `ip ARGS`, returning stdout; panics with stderr on failure.
pub fn run_ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names `ip netns list` shows.
pub fn list_netns() -> Vec<String> {
    run_ip(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Deletes kit namespaces whose creating process no longer exists (a test run killed by SIGKILL
/// or a timeout cannot run destructors).
pub fn sweep_stale() {
    for name in list_netns() {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = delete_netns(&name);
        }
    }
}
