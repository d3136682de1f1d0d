//! First-packet classification in the kernel: BPF programs that put every packet of a socket into
//! its HTB class by setting `skb->priority`, so a connection is shaped from its first packet
//! instead of from the next scan.
//!
//! [`BpfClassifier`] owns the programs (loaded from `bpf/shaper.bpf.o`, built from
//! `bpf/shaper.bpf.c`), their links and their maps. The daemon tells it which class each
//! connection (by socket cookie) and each process (by tgid, for connections it has not seen yet)
//! goes to, and reads the sockets the kernel reports as new ([`NewSocket`]) and the per-socket
//! byte counters. Where BPF cannot be used, [`probe`] says why in one line, and the daemon keeps
//! the scan + u32 path. See docs/design.md, "First-packet classifier".

mod bpf;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use bpf::{
    BpfClassifier, CLS_BPF_PREF, DownloadHook, cgroup_id, cgroup2_root, interface_index, probe,
    remove_stale_download_filter,
};

use crate::scan::Proto;

/// A socket created in the attached cgroup, reported once, on its first packet either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSocket {
    /// The kernel's socket cookie, the key of [`BpfClassifier::set_connection`] (sock_diag
    /// reports the same value).
    pub cookie: u64,
    /// The process that created the socket (for an accepted socket: the listener's creator).
    pub tgid: u32,
    pub uid: u32,
    pub comm: String,
    /// The creating process's cgroup v2 id (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    pub proto: Proto,
    /// IPv4-mapped addresses are reported as IPv4 (as the scan does).
    pub local: SocketAddr,
    /// `0.0.0.0:0` / `[::]:0` for an unconnected UDP socket.
    pub remote: SocketAddr,
    /// The socket's first packet was inbound (an unconnected UDP server's first datagram).
    pub first_inbound: bool,
    /// When the kernel wrote the event, on CLOCK_MONOTONIC (for latency figures).
    pub reported_at: Duration,
}

/// Reports of new sockets the kernel did not make at once, since the programs were attached:
/// what a flood of new sockets cost, for status, metrics and the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportStats {
    /// Sockets of processes that had a class, not reported while the ring buffer was filling:
    /// they were classified by their process's class and are found by the next scan.
    pub deferred: u64,
    /// Sockets whose report found the ring buffer full; each is reported again on a later
    /// packet, and until then classified by its process's class if it has one.
    pub lost: u64,
    /// exec reports that found the ring buffer full (the process is read again when its name
    /// or executable is next compared).
    pub exec_lost: u64,
    /// Close reports that found the ring buffer full: their sockets' bytes reach no owner and
    /// are counted as unattributed.
    pub close_lost: u64,
    /// The bytes of those sockets.
    pub close_lost_bytes: ByteCounters,
}

/// Who created a socket, as recorded in the kernel when it was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOwner {
    pub tgid: u32,
    pub uid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

/// A socket's final byte counts, reported once by the kernel when it closed: a TCP connection
/// once it reached TCP_CLOSE (its last data sent), a UDP socket when it was released. Its owner
/// and classes come with it, so a connection that lived less than a cycle is charged too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedSocket {
    pub cookie: u64,
    pub proto: Proto,
    /// `None` for a socket older than the programs (its creation was not seen).
    pub owner: Option<SocketOwner>,
    /// Everything it moved on the shaped interface since the programs were attached.
    pub bytes: ByteCounters,
    /// The full classids its packets had at the end, per direction (`None`: the default
    /// class).
    pub classes: (Option<u32>, Option<u32>),
}

/// Bytes a socket sent and received at the IP layer, every segment with its headers. From its
/// counter (UDP): on the shaped interface since the programs were attached, uploads before the
/// qdiscs (a GSO/GRO packet counts its headers once per segment it stands for). In a TCP close
/// report: tcp_info's payload plus headers per segment, as the scan reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteCounters {
    pub up: u64,
    pub down: u64,
}

/// Why the BPF classifier cannot be used. Each message names the cause and the fix; the daemon
/// logs it once and falls back to the scan + u32 path.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "{path}: not a cgroup v2 directory; give the cgroup v2 mount (fstype cgroup2 in \
         /proc/mounts) or a directory under it"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/mounts)")]
    NoCgroup2Mount,
    #[error("cannot open {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "the kernel refused BPF ({what}: {source}); run as root or grant CAP_BPF, \
         CAP_NET_ADMIN and CAP_PERFMON (and check kernel.unprivileged_bpf_disabled / lockdown)"
    )]
    Permission {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "the kernel lacks what the classifier needs ({what}: {source}); it needs Linux ≥ 5.8 \
         with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and BTF"
    )]
    KernelTooOld {
        what: String,
        source: std::io::Error,
    },
    #[error("the verifier rejected program {program}: {error}; verifier log (end): {log}")]
    Verifier {
        program: &'static str,
        error: std::io::Error,
        log: String,
    },
    #[error("cannot attach the download program to the ingress of {interface}: {message}")]
    Interface { interface: String, message: String },
    #[error("BPF {what}: {message}")]
    Bpf { what: String, message: String },
}
