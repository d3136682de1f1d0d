//! Loading, attaching and talking to the programs of `bpf/shaper.bpf.c` with aya.
//!
//! Everything is attached through links held by the [`aya::Ebpf`] inside [`BpfClassifier`]:
//! dropping it (or the process dying, even by SIGKILL) detaches every program, and nothing is
//! pinned, so no state outlives the daemon. Cgroup links run alongside other programs on the
//! cgroup (the kernel gives links `BPF_F_ALLOW_MULTI` semantics) and the download program is the
//! first tcx program on the interface's ingress, so programs others attached keep running too.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, MapError, RingBuf};
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::tc::{SchedClassifierLink, SchedClassifierLinkId, TcHandle};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, LinkOrder, ProgramError,
    RawTracePoint, SchedClassifier, SockOps, TcAttachType,
};
use aya::{Ebpf, EbpfError, EbpfLoader, Pod};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, fstatfs};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{BpfError, ByteCounters, ClosedSocket, NewSocket, ReportStats, SocketOwner};
use crate::scan::{Proto, normalize_addr};

/// The compiled programs (`bpf/build.sh` rebuilds it from `bpf/shaper.bpf.c`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/shaper.bpf.o");

/// The cls_bpf filter's pref when tcx is missing (Linux < 6.6): it must come before the mirred
/// redirect to the IFB, which therefore has to sit at a higher pref.
pub const CLS_BPF_PREF: u16 = 1;
/// The cls_bpf filter's handle within its pref.
const CLS_BPF_HANDLE: TcHandle = TcHandle::new(0, 1);

/// How the download program is attached to the interface's ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadHook {
    /// A tcx link (Linux ≥ 6.6), first in the chain, ahead of the legacy ingress qdisc.
    Tcx,
    /// A cls_bpf direct-action filter on the ingress qdisc at [`CLS_BPF_PREF`].
    ClsBpf,
}

// The structs below are copies of shaper.bpf.c's: `layout`'s test checks each field's name,
// offset and size against the compiled object's BTF. Their zerocopy derives read them from the
// ring buffer without `unsafe` and refuse to compile if one has a padding hole.

/// `struct classes` in shaper.bpf.c: full classids (`major << 16 | minor`), 0 = none.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable)]
struct RawClasses {
    up: u32,
    down: u32,
}

/// `struct counters` in shaper.bpf.c.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable)]
struct RawCounters {
    up: u64,
    down: u64,
}

/// `struct event` in shaper.bpf.c.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable)]
struct RawEvent {
    cookie: u64,
    cgroup_id: u64,
    ktime_ns: u64,
    tgid: u32,
    uid: u32,
    comm: [u8; 16],
    local_ip: [u32; 4],
    remote_ip: [u32; 4],
    local_port: u16,
    remote_port: u16,
    family: u16,
    protocol: u8,
    ingress: u8,
}

/// `struct exec_event` in shaper.bpf.c: a process with a class for new connections called exec.
/// It shares the ring buffer with [`RawEvent`] and is told from it by its size.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable)]
struct RawExec {
    ktime_ns: u64,
    tgid: u32,
    _pad: u32,
}

/// `struct close_event` in shaper.bpf.c: a socket's final counts. Told from the others by its
/// size.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable)]
struct RawClose {
    cookie: u64,
    cgroup_id: u64,
    up: u64,
    down: u64,
    tgid: u32,
    uid: u32,
    class_up: u32,
    class_down: u32,
    comm: [u8; 16],
    protocol: u8,
    _pad: [u8; 7],
}

/// `struct report_stats` in shaper.bpf.c.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable)]
struct RawReportStats {
    deferred: u64,
    lost: u64,
    exec_lost: u64,
    close_lost: u64,
    close_lost_up: u64,
    close_lost_down: u64,
}

// SAFETY: plain `repr(C)` integers and byte arrays without padding holes (`IntoBytes` proves
// that) and every bit pattern a valid value (`FromBytes` proves that): what aya's `Pod` asks,
// which it has no derive for.
unsafe impl Pod for RawClasses {}
// SAFETY: as above.
unsafe impl Pod for RawReportStats {}
// SAFETY: as above.
unsafe impl Pod for RawCounters {}

/// The programs of shaper.bpf.c, attached to one cgroup and one interface, with their maps.
///
/// Drop it in the network namespace it was attached in: a cls_bpf download filter (kernels
/// without tcx) is deleted over netlink by interface index. That filter is also the one thing a
/// SIGKILL leaves behind (tc filters are not links): it goes with the ingress qdisc (`shaper
/// clear`), and [`Self::attach_cls_bpf`] replaces one a killed run left.
pub struct BpfClassifier {
    /// Owns the programs and their links; dropping it detaches everything.
    ebpf: Ebpf,
    interface: String,
    /// The cls_bpf filter's link, once attached (`DownloadHook::ClsBpf` only).
    cls_bpf: Option<SchedClassifierLinkId>,
    conn_class: HashMap<MapData, u64, RawClasses>,
    proc_class: HashMap<MapData, u32, RawClasses>,
    sock_bytes: HashMap<MapData, u64, RawCounters>,
    shaped_ifaces: HashMap<MapData, u32, u8>,
    hold_class: Array<MapData, RawClasses>,
    events: RingBuf<MapData>,
    report_stats: Array<MapData, RawReportStats>,
    download: DownloadHook,
    /// Processes that called exec, reported since [`Self::take_execs`] last ran.
    execs: Vec<u32>,
    /// Sockets that closed, reported since [`Self::take_closed`] last ran.
    closed: Vec<ClosedSocket>,
    /// Why exec is not noticed in the kernel, if the hook could not be attached.
    exec_hook_error: Option<String>,
}

impl std::fmt::Debug for BpfClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfClassifier")
            .field("download", &self.download)
            .finish_non_exhaustive()
    }
}

/// Deletes the cls_bpf download filter a killed run left on `interface`'s ingress (the one part
/// of the classifier a SIGKILL leaves behind: tc filters are not links), so a run that does not
/// put its own there (u32 filters, or a tcx link) is not classified by a dead run's maps.
/// Returns whether one was there. Call it only for an ingress qdisc that is shaper's: the filter
/// is found by shaper's reserved pref and handle alone.
pub fn remove_stale_download_filter(interface: &str) -> bool {
    SchedClassifierLink::attached(
        interface,
        TcAttachType::Ingress,
        CLS_BPF_PREF,
        CLS_BPF_HANDLE,
        None,
    )
    .ok()
    .is_some_and(|stale| aya::programs::Link::detach(stale).is_ok())
}

/// Checks that BPF can be used here: `cgroup` is a cgroup v2 directory and every program loads
/// (capabilities, kernel features, verifier). Attaches nothing. The error is the one line the
/// daemon logs when it falls back to u32.
pub fn probe(cgroup: &Path) -> Result<(), BpfError> {
    open_cgroup(cgroup)?;
    let mut ebpf = load_object()?;
    load_programs(&mut ebpf)
}

impl BpfClassifier {
    /// Loads the programs and attaches them: upload, owners and reports to `cgroup` (a cgroup v2
    /// directory; its descendants are covered too), download to the ingress of `interface`,
    /// looked up in the calling thread's network namespace.
    pub fn attach(cgroup: &Path, interface: &str) -> Result<BpfClassifier, BpfError> {
        Self::attach_with(cgroup, interface, DownloadHook::Tcx)
    }

    /// [`Self::attach`], choosing the download hook: `Tcx` tries tcx, and where the kernel has
    /// none (Linux < 6.6) leaves the download program for [`Self::attach_cls_bpf`]; `ClsBpf`
    /// does so at once (for tests and for forcing it).
    pub fn attach_with(
        cgroup: &Path,
        interface: &str,
        hook: DownloadHook,
    ) -> Result<BpfClassifier, BpfError> {
        let cgroup_dir = open_cgroup(cgroup)?;
        let Some(ifindex) = interface_index(interface) else {
            return Err(BpfError::Interface {
                interface: interface.into(),
                message: "no such interface".into(),
            });
        };
        let mut ebpf = load_object()?;
        load_programs(&mut ebpf)?;
        // The owner recorder first, so a socket created while attaching has its owner when its
        // first packet meets the egress program. Cgroup links take no flags (aya's `Single` is
        // 0) and always behave as BPF_F_ALLOW_MULTI: they run alongside other programs.
        let mode = CgroupAttachMode::Single;
        program::<CgroupSock>(&mut ebpf, "sock_create")?
            .attach(&cgroup_dir, mode)
            .map_err(|e| program_error("sock_create", e))?;
        program::<SockOps>(&mut ebpf, "sock_ops")?
            .attach(&cgroup_dir, mode)
            .map_err(|e| program_error("sock_ops", e))?;
        program::<CgroupSock>(&mut ebpf, "sock_release")?
            .attach(&cgroup_dir, mode)
            .map_err(|e| program_error("sock_release", e))?;
        for (name, kind) in [
            ("skb_egress", CgroupSkbAttachType::Egress),
            ("skb_ingress", CgroupSkbAttachType::Ingress),
        ] {
            program::<CgroupSkb>(&mut ebpf, name)?
                .attach(&cgroup_dir, kind, mode)
                .map_err(|e| program_error(name, e))?;
        }
        let download = match hook {
            DownloadHook::Tcx => attach_tcx(program(&mut ebpf, "tc_ingress")?, interface),
            DownloadHook::ClsBpf => DownloadHook::ClsBpf,
        };
        // Not required: without it an exec'd process's new sockets keep the class decided for
        // the program it ran before until the daemon reads the process again (its next report
        // or scan).
        let exec_hook_error = [
            ("on_exec", "sched_process_exec"),
            ("on_exit", "sched_process_exit"),
        ]
        .into_iter()
        .find_map(|(name, tracepoint)| {
            program::<RawTracePoint>(&mut ebpf, name)
                .and_then(|p| {
                    p.load().map_err(|e| program_error(name, e))?;
                    p.attach(tracepoint).map_err(|e| program_error(name, e))
                })
                .err()
        })
        .map(|e| e.to_string());
        let mut classifier = BpfClassifier {
            interface: interface.into(),
            cls_bpf: None,
            conn_class: take_map(&mut ebpf, "conn_class")?,
            proc_class: take_map(&mut ebpf, "proc_class")?,
            sock_bytes: take_map(&mut ebpf, "sock_bytes")?,
            shaped_ifaces: take_map(&mut ebpf, "shaped_ifaces")?,
            hold_class: Array::try_from(
                ebpf.take_map("hold_class")
                    .ok_or_else(|| missing("map", "hold_class"))?,
            )
            .map_err(|e| map_error("hold_class", e))?,
            events: RingBuf::try_from(
                ebpf.take_map("events")
                    .ok_or_else(|| missing("map", "events"))?,
            )
            .map_err(|e| map_error("events", e))?,
            report_stats: Array::try_from(
                ebpf.take_map("report_stats")
                    .ok_or_else(|| missing("map", "report_stats"))?,
            )
            .map_err(|e| map_error("report_stats", e))?,
            ebpf,
            download,
            execs: Vec::new(),
            closed: Vec::new(),
            exec_hook_error,
        };
        classifier.set_shaped_interface(None, ifindex)?;
        Ok(classifier)
    }

    /// Counts bytes on the interface with index `new` (the shaped one, re-created or first
    /// seen), no longer on `old`. Bytes on other interfaces (loopback, a bridge) are not the
    /// bill and are not counted.
    pub fn set_shaped_interface(&mut self, old: Option<u32>, new: u32) -> Result<(), BpfError> {
        if let Some(old) = old.filter(|&o| o != new) {
            ignore_missing(self.shaped_ifaces.remove(&old))
                .map_err(|e| map_error("shaped_ifaces", e))?;
        }
        self.shaped_ifaces
            .insert(new, 1, 0)
            .map_err(|e| map_error("shaped_ifaces", e))
    }

    /// How the download program is attached.
    pub fn download_hook(&self) -> DownloadHook {
        self.download
    }

    /// Whether the download program still waits for [`Self::attach_cls_bpf`].
    pub fn download_pending(&self) -> bool {
        self.download == DownloadHook::ClsBpf && self.cls_bpf.is_none()
    }

    /// Attaches (again) the download program as a cls_bpf filter at [`CLS_BPF_PREF`] on the
    /// interface's ingress qdisc, which must exist: where tcx is missing, the program lives in
    /// that qdisc and goes whenever the qdisc is deleted (a replaced redirect, a deleted IFB),
    /// so the daemon calls this after each apply that added the ingress. The filter always has
    /// the same pref and handle, so one already there (ours from before, or a killed run's) is
    /// replaced, not doubled. Does nothing on tcx. Call it in the interface's network namespace.
    pub fn attach_cls_bpf(&mut self) -> Result<(), BpfError> {
        if self.download != DownloadHook::ClsBpf {
            return Ok(());
        }
        let prog = program::<SchedClassifier>(&mut self.ebpf, "tc_ingress")?;
        if let Some(link) = self.cls_bpf.take() {
            // Gone with its qdisc, usually: the error says only that.
            let _ = prog.detach(link);
        }
        // A killed run's filter is found at our pref and handle (aya's `qdisc_detach_program`,
        // by name, gives up on the u32 redirect's options). A link to it deletes it as it is
        // detached; none is the usual case.
        if let Ok(stale) = SchedClassifierLink::attached(
            &self.interface,
            TcAttachType::Ingress,
            CLS_BPF_PREF,
            CLS_BPF_HANDLE,
            None,
        ) {
            let _ = aya::programs::Link::detach(stale);
        }
        let netlink = TcAttachOptions::Netlink(NlOptions {
            priority: CLS_BPF_PREF,
            handle: CLS_BPF_HANDLE,
            ..NlOptions::default()
        });
        let link = prog
            .attach_with_options(&self.interface, TcAttachType::Ingress, netlink)
            .map_err(|e| BpfError::Interface {
                interface: self.interface.clone(),
                message: format!("cls_bpf on the ingress qdisc: {e}"),
            })?;
        self.cls_bpf = Some(link);
        Ok(())
    }

    /// The kernel's ids of our programs (as `bpftool prog` lists them): for status, and for
    /// checking that none is left once the classifier is gone.
    pub fn program_ids(&self) -> Vec<u32> {
        self.ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok())
            .map(|i| i.id())
            .collect()
    }

    /// Puts the connection with socket cookie `cookie` into classes `up` (on the interface) and
    /// `down` (on the IFB): full classids, `major << 16 | minor`. `None` in a direction: its
    /// process's class for new connections, else the qdisc's default class.
    pub fn set_connection(
        &mut self,
        cookie: u64,
        up: Option<u32>,
        down: Option<u32>,
    ) -> Result<(), BpfError> {
        let value = raw_classes(up, down);
        self.conn_class
            .insert(cookie, value, 0)
            .map_err(|e| map_error("conn_class", e))
    }

    /// Forgets a connection: its classes and its byte counters. Unknown cookies are fine.
    pub fn remove_connection(&mut self, cookie: u64) -> Result<(), BpfError> {
        ignore_missing(self.conn_class.remove(&cookie)).map_err(|e| map_error("conn_class", e))?;
        ignore_missing(self.sock_bytes.remove(&cookie)).map_err(|e| map_error("sock_bytes", e))
    }

    /// The classes for connections of process `tgid` that have no classes of their own yet
    /// (new ones, from their first packet, before userspace has seen them).
    pub fn set_process_default(
        &mut self,
        tgid: u32,
        up: Option<u32>,
        down: Option<u32>,
    ) -> Result<(), BpfError> {
        let value = raw_classes(up, down);
        self.proc_class
            .insert(tgid, value, 0)
            .map_err(|e| map_error("proc_class", e))
    }

    /// Names the holding leaf per direction (full classids; `None`: no holding that way): where
    /// a new socket whose process has no classes yet goes for at most its first 100 ms, until
    /// the daemon decides it (see shaper.bpf.c's `hold_of`).
    pub fn set_hold(&mut self, up: Option<u32>, down: Option<u32>) -> Result<(), BpfError> {
        self.hold_class
            .set(0, raw_classes(up, down), 0)
            .map_err(|e| map_error("hold_class", e))
    }

    /// Forgets a process's classes for new connections (e.g. when it exits).
    pub fn remove_process(&mut self, tgid: u32) -> Result<(), BpfError> {
        ignore_missing(self.proc_class.remove(&tgid)).map_err(|e| map_error("proc_class", e))
    }

    /// Waits up to `timeout` for new sockets, then returns every one waiting.
    pub fn poll_new_sockets(&mut self, timeout: Duration) -> Vec<NewSocket> {
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        // An error or a timeout just means nothing to read, which the drain below finds out by
        // itself.
        let _ = nix::poll::poll(
            &mut [PollFd::new(self.events.as_fd(), PollFlags::POLLIN)],
            timeout,
        );
        self.drain_new_sockets()
    }

    /// Every new socket waiting in the ring buffer, without blocking; exec and close reports
    /// found on the way are kept for [`Self::take_execs`] and [`Self::take_closed`].
    pub fn drain_new_sockets(&mut self) -> Vec<NewSocket> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(tgid) = parse_exec(&item) {
                self.execs.push(tgid);
            } else if let Some(c) = parse_close(&item) {
                self.closed.push(c);
            } else if let Some(s) = parse_event(&item) {
                out.push(s);
            }
        }
        out
    }

    /// The sockets that closed since the last call, with their final counts (reports read by
    /// [`Self::drain_new_sockets`]).
    pub fn take_closed(&mut self) -> Vec<ClosedSocket> {
        std::mem::take(&mut self.closed)
    }

    /// The processes (tgids) that called exec since the last call, as reported by the kernel,
    /// which has already dropped their classes for new connections.
    pub fn take_execs(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.execs)
    }

    /// Why the kernel does not see exec and exit, when their hooks could not be attached
    /// (processes' classes for new connections are then kept only while they have connections).
    pub fn exec_hook_error(&self) -> Option<&str> {
        self.exec_hook_error.as_deref()
    }

    /// Reports the kernel deferred or could not make, since the programs were attached.
    pub fn report_stats(&self) -> ReportStats {
        let s = self.report_stats.get(&0, 0).unwrap_or_default();
        ReportStats {
            deferred: s.deferred,
            lost: s.lost,
            exec_lost: s.exec_lost,
            close_lost: s.close_lost,
            close_lost_bytes: ByteCounters {
                up: s.close_lost_up,
                down: s.close_lost_down,
            },
        }
    }

    /// Bytes the socket with this cookie sent and received since the programs were attached.
    pub fn counters(&self, cookie: u64) -> Option<ByteCounters> {
        self.sock_bytes.get(&cookie, 0).ok().map(to_counters)
    }
}

fn raw_classes(up: Option<u32>, down: Option<u32>) -> RawClasses {
    RawClasses {
        up: up.unwrap_or(0),
        down: down.unwrap_or(0),
    }
}

fn to_counters(c: RawCounters) -> ByteCounters {
    ByteCounters {
        up: c.up,
        down: c.down,
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn parse_exec(bytes: &[u8]) -> Option<u32> {
    let e = RawExec::read_from_bytes(bytes).ok()?;
    Some(e.tgid)
}

fn parse_close(bytes: &[u8]) -> Option<ClosedSocket> {
    let e = RawClose::read_from_bytes(bytes).ok()?;
    let proto = match i32::from(e.protocol) {
        libc::IPPROTO_TCP => Proto::Tcp,
        libc::IPPROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let comm_len = e.comm.iter().position(|&c| c == 0).unwrap_or(e.comm.len());
    let class = |id: u32| (id != 0).then_some(id);
    Some(ClosedSocket {
        cookie: e.cookie,
        proto,
        owner: (e.tgid != 0).then(|| SocketOwner {
            tgid: e.tgid,
            uid: e.uid,
            comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
            cgroup_id: e.cgroup_id,
        }),
        bytes: ByteCounters {
            up: e.up,
            down: e.down,
        },
        classes: (class(e.class_up), class(e.class_down)),
    })
}

/// An interface's index in this network namespace.
pub fn interface_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

fn parse_event(bytes: &[u8]) -> Option<NewSocket> {
    let e = RawEvent::read_from_bytes(bytes).ok()?;
    let proto = match i32::from(e.protocol) {
        libc::IPPROTO_TCP => Proto::Tcp,
        libc::IPPROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let ip = |words: [u32; 4]| -> Option<IpAddr> {
        let mut b = [0u8; 16];
        for (chunk, w) in b.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        match i32::from(e.family) {
            libc::AF_INET => Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()),
            libc::AF_INET6 => Some(Ipv6Addr::from(b).into()),
            _ => None,
        }
    };
    let comm_len = e.comm.iter().position(|&c| c == 0).unwrap_or(e.comm.len());
    Some(NewSocket {
        cookie: e.cookie,
        tgid: e.tgid,
        uid: e.uid,
        comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
        cgroup_id: e.cgroup_id,
        proto,
        local: normalize_addr(SocketAddr::new(ip(e.local_ip)?, e.local_port)),
        remote: normalize_addr(SocketAddr::new(ip(e.remote_ip)?, e.remote_port)),
        first_inbound: e.ingress != 0,
        reported_at: Duration::from_nanos(e.ktime_ns),
    })
}

/// Opens a cgroup v2 directory, refusing anything else (a v1 hierarchy, a plain directory).
fn open_cgroup(path: &Path) -> Result<File, BpfError> {
    let dir = File::open(path).map_err(|error| BpfError::Open {
        path: path.to_owned(),
        error,
    })?;
    let is_dir = dir.metadata().map(|m| m.is_dir()).unwrap_or(false);
    let cgroup2 = fstatfs(&dir).is_ok_and(|st| st.filesystem_type() == CGROUP2_SUPER_MAGIC);
    if !is_dir || !cgroup2 {
        return Err(BpfError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    Ok(dir)
}

/// The cgroup v2 mount point from /proc/mounts (`/sys/fs/cgroup` on most distributions,
/// `/sys/fs/cgroup/unified` in hybrid mode).
pub fn cgroup2_root() -> Result<std::path::PathBuf, BpfError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|error| BpfError::Open {
        path: "/proc/mounts".into(),
        error,
    })?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| f[1].into())
        .ok_or(BpfError::NoCgroup2Mount)
}

/// The id the kernel gives a cgroup v2 directory (what `bpf_get_current_cgroup_id` returns).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

fn load_object() -> Result<Ebpf, BpfError> {
    EbpfLoader::new()
        .load(OBJECT)
        .map_err(|e| ebpf_error("loading bpf/shaper.bpf.o", e))
}

/// Loads every program (the verifier runs here), attaching none.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    let loaded = |name, r: Result<(), ProgramError>| r.map_err(|e| program_error(name, e));
    loaded(
        "sock_create",
        program::<CgroupSock>(ebpf, "sock_create")?.load(),
    )?;
    loaded("sock_ops", program::<SockOps>(ebpf, "sock_ops")?.load())?;
    loaded(
        "sock_release",
        program::<CgroupSock>(ebpf, "sock_release")?.load(),
    )?;
    loaded(
        "skb_egress",
        program::<CgroupSkb>(ebpf, "skb_egress")?.load(),
    )?;
    loaded(
        "skb_ingress",
        program::<CgroupSkb>(ebpf, "skb_ingress")?.load(),
    )?;
    loaded(
        "tc_ingress",
        program::<SchedClassifier>(ebpf, "tc_ingress")?.load(),
    )
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| missing("program", name))?
        .try_into()
        .map_err(|e| program_error(name, e))
}

fn take_map<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, BpfError> {
    let map = ebpf.take_map(name).ok_or_else(|| missing("map", name))?;
    HashMap::try_from(map).map_err(|e| map_error(name, e))
}

/// The download program as the first tcx program of the interface's ingress (Linux ≥ 6.6);
/// where that fails, `ClsBpf`: left for [`BpfClassifier::attach_cls_bpf`] once the ingress
/// qdisc is there.
fn attach_tcx(prog: &mut SchedClassifier, interface: &str) -> DownloadHook {
    let tcx = TcAttachOptions::TcxOrder(LinkOrder::first());
    match prog.attach_with_options(interface, TcAttachType::Ingress, tcx) {
        Ok(_) => DownloadHook::Tcx,
        Err(e) => {
            tracing::debug!(
                "tcx on {interface}: {e}; the download program will be a cls_bpf filter"
            );
            DownloadHook::ClsBpf
        }
    }
}

fn missing(kind: &str, name: &str) -> BpfError {
    BpfError::Bpf {
        what: format!("{kind} {name}"),
        message: "missing from bpf/shaper.bpf.o (rebuild it with bpf/build.sh)".into(),
    }
}

/// Sorts an io error from the bpf syscall into the cause a user can act on.
fn syscall_error(what: String, source: io::Error) -> BpfError {
    match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => BpfError::Permission { what, source },
        Some(libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
            BpfError::KernelTooOld { what, source }
        }
        _ => BpfError::Bpf {
            what,
            message: source.to_string(),
        },
    }
}

fn map_error(name: &str, e: MapError) -> BpfError {
    let what = format!("map {name}");
    match e {
        MapError::CreateError { io_error, .. } => syscall_error(what, io_error),
        MapError::SyscallError(s) => syscall_error(format!("{what} ({})", s.call), s.io_error),
        other => BpfError::Bpf {
            what,
            message: other.to_string(),
        },
    }
}

fn program_error(name: &'static str, e: ProgramError) -> BpfError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } if io_error.raw_os_error() != Some(libc::EPERM) => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            BpfError::Verifier {
                program: name,
                error: io_error,
                log: lines[lines.len().saturating_sub(12)..].join(" | "),
            }
        }
        ProgramError::LoadError { io_error, .. } => {
            syscall_error(format!("loading program {name}"), io_error)
        }
        ProgramError::SyscallError(s) => {
            syscall_error(format!("program {name} ({})", s.call), s.io_error)
        }
        other => BpfError::Bpf {
            what: format!("program {name}"),
            message: other.to_string(),
        },
    }
}

fn ebpf_error(what: &str, e: EbpfError) -> BpfError {
    match e {
        EbpfError::MapError(m) => map_error(what, m),
        EbpfError::ProgramError(p) => program_error("(loading)", p),
        other => BpfError::Bpf {
            what: what.into(),
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod layout;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_records_are_told_apart_by_size() {
        // One ring buffer carries all three; `drain_new_sockets` tells them apart by length.
        let sizes = [
            size_of::<RawEvent>(),
            size_of::<RawExec>(),
            size_of::<RawClose>(),
        ];
        assert!(
            sizes
                .iter()
                .all(|&a| sizes.iter().filter(|&&b| b == a).count() == 1)
        );
    }

    #[test]
    fn events_parse_into_sockets() {
        let mut e = RawEvent {
            cookie: 7,
            cgroup_id: 9,
            ktime_ns: 1_000,
            tgid: 42,
            uid: 1000,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            local_ip: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            remote_ip: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            local_port: 40000,
            remote_port: 443,
            family: libc::AF_INET as u16,
            protocol: libc::IPPROTO_TCP as u8,
            ingress: 0,
        };
        let bytes = |e: &RawEvent| e.as_bytes().to_vec();
        let s = parse_event(&bytes(&e)).expect("a TCP/IPv4 event parses");
        assert_eq!(
            (s.cookie, s.tgid, s.uid, s.comm.as_str(), s.proto),
            (7, 42, 1000, "curl", Proto::Tcp)
        );
        assert_eq!(s.local, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(s.remote, "10.0.0.2:443".parse().unwrap());
        e.protocol = 1; // ICMP: not ours
        assert_eq!(parse_event(&bytes(&e)), None);
        assert_eq!(parse_event(&bytes(&e)[..10]), None);
    }
}
