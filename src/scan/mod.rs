//! Stage 1, **scan**: the host's TCP and UDP sockets, IPv4 and IPv6, as [`Socket`] rows.
//!
//! The primary source is netlink sock_diag ([`DiagScanner`]): one dump per family × protocol,
//! with TCP byte counters from `tcp_info` (`bytes_acked` = uploaded, `bytes_received` =
//! downloaded). Where sock_diag is unavailable, [`ProcNetScanner`] reads `/proc/net/{tcp,udp}{,6}`,
//! which has no byte counters. [`open`] picks one; both implement [`SocketSource`], the narrow
//! trait the daemon depends on.
//!
//! Which sockets: TCP in every state but LISTEN and TIME_WAIT (listeners carry no traffic, and
//! TIME_WAIT sockets are gone from the process); UDP connected *and* unconnected (an unconnected
//! socket has remote `0.0.0.0:0`/`[::]:0`). IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are
//! reported as IPv4, because that is what goes on the wire and what a policy author writes.
//!
//! Both sources see only the network namespace of the calling thread.

mod destroy;
mod diag;
mod procnet;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use destroy::DestroyListener;
pub use diag::DiagScanner;
pub use procnet::ProcNetScanner;

/// Transport protocol of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
    /// The IP protocol number (`IPPROTO_TCP`, `IPPROTO_UDP`).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Socket state, with the kernel's TCP state names (UDP uses `Established` when connected and
/// `Close` when not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
}

impl State {
    /// From the kernel's `TCP_*` number (include/net/tcp_states.h).
    pub fn from_kernel(n: u8) -> Option<State> {
        use State::*;
        Some(match n {
            1 => Established,
            2 => SynSent,
            3 => SynRecv,
            4 => FinWait1,
            5 => FinWait2,
            6 => TimeWait,
            7 => Close,
            8 => CloseWait,
            9 => LastAck,
            10 => Listen,
            11 => Closing,
            12 => NewSynRecv,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        use State::*;
        match self {
            Established => "established",
            SynSent => "syn_sent",
            SynRecv => "syn_recv",
            FinWait1 => "fin_wait1",
            FinWait2 => "fin_wait2",
            TimeWait => "time_wait",
            Close => "close",
            CloseWait => "close_wait",
            LastAck => "last_ack",
            Listen => "listen",
            Closing => "closing",
            NewSynRecv => "new_syn_recv",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Socket {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: State,
    /// Owner uid of the socket (the creator's effective uid).
    pub uid: u32,
    /// Socket inode: the key joining a socket to the processes holding it. 0 for orphaned TCP
    /// sockets (closed by their process, still finishing in the kernel).
    pub inode: u64,
    /// The kernel's socket cookie: unique for the life of the system, unlike the 5-tuple. 0 when
    /// the source cannot tell it (`/proc/net`).
    #[serde(default)]
    pub cookie: u64,
    /// Bytes sent and acknowledged by the peer (TCP via sock_diag only).
    #[serde(default)]
    pub bytes_up: Option<u64>,
    /// Bytes received (TCP via sock_diag only).
    #[serde(default)]
    pub bytes_down: Option<u64>,
}

/// Identifies a socket across cycles: the key of the flow table and of every per-connection
/// record. The kernel's socket cookie, or (from `/proc/net`, which has none) the inode, which is
/// unique while the socket lives. One integer hashes far faster than the 5-tuple.
pub type SocketKey = u64;

impl Socket {
    /// This socket's [`SocketKey`].
    pub fn key(&self) -> SocketKey {
        if self.cookie != 0 {
            self.cookie
        } else {
            self.inode | 1 << 63
        }
    }

    /// 4 or 6, after IPv4-mapped addresses were normalised.
    pub fn family(&self) -> u8 {
        if self.local.is_ipv4() { 4 } else { 6 }
    }

    /// Whether the socket has a peer (connected UDP, or TCP past SYN).
    pub fn is_connected(&self) -> bool {
        !self.remote.ip().is_unspecified() || self.remote.port() != 0
    }
}

impl fmt::Display for Socket {
    /// `tcp 10.0.0.1:40000 -> 1.2.3.4:443 established`, as in bandwhich's readable connections.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {} {}",
            self.proto, self.local, self.remote, self.state
        )
    }
}

/// Reports `::ffff:a.b.c.d` as `a.b.c.d`; other addresses unchanged.
pub fn normalize_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Why a scan failed. A failed scan is retried next cycle; the daemon keeps its last decisions.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(
        "sock_diag is not available ({0}); is the inet_diag module (tcp_diag, udp_diag) loaded?"
    )]
    DiagUnavailable(std::io::Error),
    #[error("sock_diag dump of {what} failed: {error}")]
    Diag {
        what: &'static str,
        error: std::io::Error,
    },
    #[error("sock_diag answered with a malformed message for {what}: {message}")]
    Malformed { what: &'static str, message: String },
    #[error(
        "cannot subscribe to sock_diag's TCP destroy notifications ({0}); they need the tcp_diag \
         module and CAP_NET_ADMIN in the daemon's network namespace. Without them, on the u32 \
         path, what a TCP connection moves after its last scan is counted only as unattributed"
    )]
    DestroyUnavailable(std::io::Error),
    #[error("cannot read {path}: {message}")]
    ProcNet { path: String, message: String },
}

/// A source of socket rows. The daemon and the tests depend only on this.
pub trait SocketSource: Send {
    /// All sockets of interest, in the calling thread's network namespace.
    fn scan(&mut self) -> Result<Vec<Socket>, ScanError>;
    /// The socket with this tuple (as the scan reports it) and cookie, `None` when the kernel
    /// no longer has it. sock_diag answers from its hash tables; this default scans everything
    /// and matches the cookie (or, from a source without cookies, the tuple).
    fn find(
        &mut self,
        proto: Proto,
        local: SocketAddr,
        remote: SocketAddr,
        cookie: u64,
    ) -> Result<Option<Socket>, ScanError> {
        Ok(self.scan()?.into_iter().find(|s| {
            s.proto == proto
                && if s.cookie != 0 {
                    s.cookie == cookie
                } else {
                    (s.local, s.remote) == (local, remote)
                }
        }))
    }
    /// Short name for logs and `status`.
    fn name(&self) -> &'static str;
}

/// Which implementation [`open`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// sock_diag, falling back to /proc/net when sock_diag cannot be opened.
    #[default]
    Auto,
    /// netlink sock_diag only.
    Diag,
    /// /proc/net only (no byte counters).
    Proc,
}

/// Opens a socket source. `Auto` tries sock_diag with one real dump and falls back to /proc/net
/// with a warning when it does not work.
pub fn open(backend: Backend) -> Result<Box<dyn SocketSource>, ScanError> {
    match backend {
        Backend::Diag => Ok(Box::new(DiagScanner::new()?)),
        Backend::Proc => Ok(Box::new(ProcNetScanner::new())),
        Backend::Auto => match DiagScanner::new().and_then(|mut s| s.probe().map(|()| s)) {
            Ok(s) => Ok(Box::new(s)),
            Err(e) => {
                tracing::warn!("{e}; falling back to /proc/net (no per-connection byte counters)");
                Ok(Box::new(ProcNetScanner::new()))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:443".parse().unwrap();
        assert_eq!(normalize_addr(mapped), "10.1.2.3:443".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(normalize_addr(v6), v6);
        let v4: SocketAddr = "1.2.3.4:5".parse().unwrap();
        assert_eq!(normalize_addr(v4), v4);
    }

    #[test]
    fn states_round_trip_kernel_numbers() {
        for n in 1..=12 {
            let s = State::from_kernel(n).unwrap();
            assert_eq!(s as u8 + 1, n, "{s}");
        }
        assert_eq!(State::from_kernel(0), None);
        assert_eq!(State::from_kernel(13), None);
    }
}
