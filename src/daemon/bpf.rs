//! The daemon's side of the first-packet classifier ([`crate::classify`]): attaching it at start
//! (or saying in one line why the u32 path stays), and keeping its maps equal to the plan last
//! applied — each connection's leaves by socket cookie, and each process's leaves for the
//! connections it opens before a cycle has seen them.

use std::path::{Path, PathBuf};

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use super::flows::FlowTable;
use crate::classify::{
    BpfClassifier, BpfError, DownloadHook, NewSocket, ReportStats, cgroup2_root,
};
use crate::config::{ClassifierChoice, Config};
use crate::process::Pid;
use crate::process::pidns::{PidTranslation, numbers_as_the_kernel};
use crate::scan::{Proto, Socket, SocketKey, SocketSource, State};
use crate::shape::model::MAJOR;
use crate::shape::{Target, Targets};

/// Set to `cls_bpf`, makes the download program a cls_bpf filter even where tcx exists: the
/// path kernels before 6.6 take, for tests.
pub const DOWNLOAD_HOOK_ENV: &str = "SHAPER_DOWNLOAD_HOOK";

/// The oldest Linux the BPF object loads on: `report_once` uses the result of an atomic fetch-or
/// (BPF_FETCH, 5.12). The ring buffer needs 5.8; the download program's tcx hook 6.6 (before
/// it, a cls_bpf filter); the rest is older.
pub const OLDEST_LINUX: (u32, u32) = (5, 12);

/// `(major, minor)` of the running kernel, if it can be read.
fn kernel_release() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = text.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// On a kernel older than [`OLDEST_LINUX`], why the classifier failed in one line, instead of
/// the verifier's log of the first instruction it did not know.
fn too_old(release: Option<(u32, u32)>) -> Option<String> {
    let (major, minor) = release.filter(|r| *r < OLDEST_LINUX)?;
    Some(format!(
        "Linux {major}.{minor} is older than {}.{}, the oldest the BPF classifier loads on",
        OLDEST_LINUX.0, OLDEST_LINUX.1
    ))
}

/// Full classids (`5a:minor`) per direction; `None` = the default class.
type Classids = (Option<u32>, Option<u32>);

/// How the owners of reported sockets were found while the daemon's `/proc` is not the initial
/// PID namespace's (see [`crate::process::pidns`]), for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnPidNamespace {
    /// Reported sockets whose owner was found by the socket (sock_diag, then the descriptors).
    pub by_socket: u64,
    /// Reported sockets gone before they could be looked up, owned by their creator through a
    /// tie learnt from one of its earlier sockets.
    pub by_tie: u64,
    /// Reported sockets no owner was found for (a process outside the namespace, or a socket
    /// closed at once): classified by what can be seen of them.
    pub unresolved: u64,
    /// Processes whose host tgid is known, so the kernel holds their class for new connections.
    pub processes: usize,
}

/// A reported socket whose owner the fast path looked up by the socket: what to learn from.
#[derive(Debug)]
struct Lookup {
    cookie: u64,
    host_tgid: u32,
    comm: String,
    first_inbound: bool,
}

/// Owners while the daemon's `/proc` is not the initial PID namespace's.
#[derive(Debug)]
struct OwnNamespace {
    translation: PidTranslation,
    figures: OwnPidNamespace,
    /// The reports of the last [`BpfState::owners_of`], for [`BpfState::learn_owners`].
    lookups: Vec<Lookup>,
    warned_unresolved: bool,
}

/// The attached classifier and what its maps hold.
pub struct BpfState {
    classifier: BpfClassifier,
    cgroup: PathBuf,
    /// By socket cookie, as written to `conn_class`.
    connections: FxHashMap<u64, Classids>,
    /// By tgid, as written to `proc_class`.
    processes: FxHashMap<u32, Classids>,
    /// The holding leaf as written to `hold_class` (`None`: not written, or the write failed).
    hold: Option<Classids>,
    /// The last write to `hold_class` failed (logged once until one succeeds).
    hold_failed: bool,
    /// Map writes that failed since the last report (logged once per sync).
    failed: usize,
    /// The kernel's report figures as last logged, and when (one line a minute at most).
    warned_reports: (ReportStats, Option<std::time::Instant>),
    /// When lingering process entries were last checked against `/proc`.
    lingering_checked: Option<std::time::Instant>,
    /// Why the cls_bpf download filter could not be attached, as last logged.
    download_error: Option<String>,
    /// Set when the kernel's tgids are not the daemon's pids (a PID namespace of its own).
    own_namespace: Option<OwnNamespace>,
    /// The programs are on the cgroup v2 root: every socket's bytes are theirs to count.
    sees_every_socket: bool,
}

impl std::fmt::Debug for BpfState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfState")
            .field("cgroup", &self.cgroup)
            .field("connections", &self.connections.len())
            .field("processes", &self.processes.len())
            .finish_non_exhaustive()
    }
}

impl BpfState {
    /// Attaches the classifier as `config.classifier` says, for `interfaces` (the daemon's, in
    /// the calling thread's namespace). `auto`: on any failure, logs one line with the reason
    /// and returns `None` (the scan + u32 path). `bpf`: the failure is an error. `u32`: `None`.
    pub fn start(config: &Config, interfaces: &[String]) -> anyhow::Result<Option<BpfState>> {
        if config.classifier == ClassifierChoice::U32 {
            tracing::info!("classifier: u32 filters (classifier = u32)");
            return Ok(None);
        }
        match BpfState::attach(config, interfaces) {
            Ok(state) => {
                tracing::info!(
                    "classifier: BPF on cgroup {} and {}'s ingress ({:?}): connections are shaped \
                     from their first packet",
                    state.cgroup.display(),
                    interfaces[0],
                    state.classifier.download_hook()
                );
                if state.own_namespace.is_some() {
                    tracing::warn!(
                        "classifier: shaper runs in a PID namespace of its own (a container, \
                         PrivatePIDs=, a pod): the kernel names a new socket's process by its pid \
                         on the host, which is not ours. Each new socket's owner is found by the \
                         socket instead (sock_diag, then the descriptors under /proc); a \
                         process's class for new connections reaches the kernel once one of its \
                         sockets has tied its host pid to ours. Sockets of processes outside \
                         this namespace are classified by what can be seen of them (addresses, \
                         ports, uid), never by another process's pid"
                    );
                }
                if let Some(e) = state.classifier.exec_hook_error() {
                    tracing::warn!(
                        "classifier: exec is not seen in the kernel ({e}): a process that execs \
                         another program keeps its class for new connections until shaper reads \
                         it again (its next report or scan)"
                    );
                }
                Ok(Some(state))
            }
            Err(reason) if config.classifier == ClassifierChoice::Auto => {
                tracing::warn!(
                    "classifier: u32 filters; the BPF classifier is not available: {reason}"
                );
                Ok(None)
            }
            Err(reason) => Err(anyhow::anyhow!(
                "classifier = bpf, but the BPF classifier cannot be used: {reason} (use \
                 --classifier auto to fall back to u32 filters)"
            )),
        }
    }

    fn attach(config: &Config, interfaces: &[String]) -> Result<BpfState, String> {
        let [interface] = interfaces else {
            return Err(format!(
                "it shapes one interface per daemon and {} are configured; run one shaper per \
                 interface",
                interfaces.len()
            ));
        };
        let root = cgroup2_root().ok();
        let cgroup = match (&config.cgroup, &root) {
            (Some(path), _) => path.clone(),
            (None, Some(root)) => root.clone(),
            (None, None) => cgroup2_root().map_err(|e| e.to_string())?,
        };
        let sees_every_socket = root
            .is_some_and(|r| std::fs::canonicalize(&r).ok() == std::fs::canonicalize(&cgroup).ok());
        // Linux ≥ 6.6 has tcx; the cls_bpf path a kernel before it takes can be forced here.
        let hook = match std::env::var_os(DOWNLOAD_HOOK_ENV) {
            Some(v) if v == "cls_bpf" => DownloadHook::ClsBpf,
            _ => DownloadHook::Tcx,
        };
        let classifier = BpfClassifier::attach_with(&cgroup, interface, hook)
            .map_err(|e| too_old(kernel_release()).unwrap_or_else(|| e.to_string()))?;
        // Not knowing is taken as a namespace of its own: owners found by the socket are right
        // in either, a tgid taken for a pid only in the initial one.
        let proc_root = Path::new("/proc");
        let own_namespace =
            (numbers_as_the_kernel(proc_root) != Some(true)).then(|| OwnNamespace {
                translation: PidTranslation::new(proc_root),
                figures: OwnPidNamespace::default(),
                lookups: Vec::new(),
                warned_unresolved: false,
            });
        Ok(BpfState {
            classifier,
            cgroup,
            connections: FxHashMap::default(),
            processes: FxHashMap::default(),
            failed: 0,
            hold: None,
            hold_failed: false,
            warned_reports: (ReportStats::default(), None),
            lingering_checked: None,
            download_error: None,
            own_namespace,
            sees_every_socket,
        })
    }

    /// How owners were found in a PID namespace of the daemon's own (`None` in the initial one).
    pub fn own_pid_namespace(&self) -> Option<OwnPidNamespace> {
        self.own_namespace.as_ref().map(|ns| OwnPidNamespace {
            processes: ns.translation.len(),
            ..ns.figures
        })
    }

    /// The sockets of `new` (reported by the kernel) as the fast path's cycle takes them, each
    /// with the pid of its creator where that is a pid of ours. In the initial PID namespace
    /// that is the reported tgid. In a namespace of its own, a tgid is never taken for a pid:
    /// `scanner` (in the daemon's network namespace) looks each socket up by its tuple and
    /// cookie and gives one still open its inode, by which the cycle finds the process holding
    /// it; a socket already closed gets its creator only through a tie learnt earlier
    /// ([`PidTranslation`]), else no owner.
    pub fn owners_of(
        &mut self,
        new: &[NewSocket],
        scanner: &mut dyn SocketSource,
    ) -> Vec<(Socket, Option<Pid>)> {
        let Some(ns) = &mut self.own_namespace else {
            return new
                .iter()
                .map(|n| {
                    let (socket, tgid) = created_socket(n);
                    (socket, Some(tgid))
                })
                .collect();
        };
        let mut failed = None;
        let open: Vec<Option<Socket>> = new
            .iter()
            .map(
                |n| match scanner.find(n.proto, n.local, n.remote, n.cookie) {
                    Ok(found) => found.filter(|s| s.inode != 0),
                    Err(e) => {
                        failed = Some(e);
                        None
                    }
                },
            )
            .collect();
        if let Some(e) = failed {
            tracing::debug!(
                "fast path: looking new sockets up by cookie failed ({e}); their owners wait \
                 for the next cycle"
            );
        }
        ns.lookups.clear();
        new.iter()
            .zip(open)
            .map(|(n, open)| match open {
                Some(socket) => {
                    ns.lookups.push(Lookup {
                        cookie: n.cookie,
                        host_tgid: n.tgid,
                        comm: n.comm.clone(),
                        first_inbound: n.first_inbound,
                    });
                    (socket, None)
                }
                None => {
                    let pid = ns.translation.local(n.tgid);
                    if pid.is_some() {
                        ns.figures.by_tie += 1;
                    } else {
                        ns.figures.unresolved += 1;
                    }
                    (created_socket(n).0, pid)
                }
            })
            .collect()
    }

    /// After the fast path's cycle: counts the owners [`Self::owners_of`] had looked up by the
    /// socket, and learns from each found which local process its creator's host tgid is —
    /// only where nothing else can explain the holder: the socket is held by one process alone,
    /// which is named as the creating thread was (the process or one of its threads), and its
    /// first packet went out (not an accepted connection, whose creator is its listener's). A
    /// tie learnt wrongly would be contradicted by the next socket of the same tgid held
    /// elsewhere, and dropped ([`PidTranslation::learn`]).
    pub fn learn_owners(&mut self, flows: &FlowTable) {
        let Some(ns) = &mut self.own_namespace else {
            return;
        };
        for lookup in ns.lookups.drain(..) {
            let found = flows
                .get(lookup.cookie)
                .and_then(|f| Some((f.connection.owner.as_ref()?, f.process?)));
            let Some((owner, process)) = found else {
                ns.figures.unresolved += 1;
                continue;
            };
            ns.figures.by_socket += 1;
            let (pid, start) = (owner.pid, process.start_time);
            let comm = lookup.comm.as_bytes();
            if owner.others.is_empty()
                && !lookup.first_inbound
                && !ns.translation.ties(lookup.host_tgid, pid, start)
                && (process.name.as_bytes() == comm || ns.translation.has_thread_named(pid, comm))
            {
                ns.translation.learn(lookup.host_tgid, pid, start);
            }
        }
        if ns.figures.unresolved > 0 && !ns.warned_unresolved {
            ns.warned_unresolved = true;
            tracing::warn!(
                "classifier: a new socket's owner was not found in shaper's PID namespace (its \
                 process runs outside it, or closed it at once): such sockets are classified \
                 by what can be seen of them until a scan finds their owner; `shaper status` \
                 counts them"
            );
        }
    }

    pub fn report_stats(&self) -> ReportStats {
        self.classifier.report_stats()
    }

    /// Processes that called exec lost their class for new connections in the kernel: forget
    /// what was written for them, so the next sync writes it again (for the program they run
    /// now; the process table reads them afresh, their name or executable having changed).
    pub fn forget_execs(&mut self) {
        for tgid in self.classifier.take_execs() {
            self.processes.remove(&tgid);
        }
    }

    /// Says (at most once a minute, and only when they grew) that reports of new sockets were
    /// deferred or lost to a flood: what it means and what still holds.
    pub fn warn_of_floods(&mut self) {
        let now = self.classifier.report_stats();
        let (last, at) = self.warned_reports;
        let grew = now.lost > last.lost || now.exec_lost > last.exec_lost;
        if !grew || at.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60)) {
            return;
        }
        tracing::warn!(
            "classifier: a flood of new sockets filled the kernel's queue to shaper: {} reports \
             found it full (each is made again on the socket's next packet) and {} were deferred; \
             sockets of processes that have a class keep it, a process never seen before waits \
             for its report",
            now.lost + now.exec_lost - last.lost - last.exec_lost,
            now.deferred - last.deferred
        );
        self.warned_reports = (now, Some(std::time::Instant::now()));
    }

    pub fn download_hook(&self) -> DownloadHook {
        self.classifier.download_hook()
    }

    pub fn classifier_mut(&mut self) -> &mut BpfClassifier {
        &mut self.classifier
    }

    /// Gives each scanned UDP socket (sock_diag has no counters for UDP) the classifier's
    /// counters: what it moved on the shaped interface since the programs were attached, the
    /// figures its close report ends with (see [`crate::classify::ByteCounters`]). A socket
    /// with none moved nothing there: when the programs are on the root cgroup, which sees
    /// every socket, it counts zero (loopback, another interface). TCP keeps the scan's
    /// tcp_info figures, which a TCP close report ends with too: the egress program counts
    /// before the qdiscs, so its figures include what the shaper's queues dropped (a 256 KB
    /// upload under a 2 Mbit/s limit counted 0.37-1 MB there).
    pub fn fill_counters(&self, sockets: &mut [Socket]) {
        for s in sockets
            .iter_mut()
            .filter(|s| s.cookie != 0 && s.proto == crate::scan::Proto::Udp)
        {
            match self.classifier.counters(s.cookie) {
                Some(c) => {
                    s.bytes_up = Some(c.up);
                    s.bytes_down = Some(c.down);
                }
                None if self.sees_every_socket => {
                    s.bytes_up = Some(0);
                    s.bytes_down = Some(0);
                }
                None => {}
            }
        }
    }

    /// Sockets that closed since the last call, with their final counts.
    pub fn take_closed(&mut self) -> Vec<crate::classify::ClosedSocket> {
        self.classifier.take_closed()
    }

    /// The shaped interface has a new index (re-created): count bytes there.
    pub fn interface_moved(&mut self, old: Option<u32>, new: u32) {
        if let Err(e) = self.classifier.set_shaped_interface(old, new) {
            tracing::warn!(
                "classifier: cannot count bytes on the re-created interface ({e}); its \
                 connections are charged only what the scan estimates"
            );
        }
    }

    /// After a plan was applied: where the download program is a cls_bpf filter (no tcx), it
    /// lives in the ingress qdisc, so it is attached once the qdisc is there and again whenever
    /// the plan re-added the qdisc (`ingress_added`). A failure leaves downloads in the default
    /// class (logged once) and is retried after the next apply.
    pub fn ingress_applied(&mut self, ingress_added: bool) {
        if !(ingress_added || self.classifier.download_pending()) {
            return;
        }
        match self.classifier.attach_cls_bpf() {
            Ok(()) => self.download_error = None,
            Err(e) => {
                let e = e.to_string();
                if self.download_error.as_ref() != Some(&e) {
                    tracing::warn!(
                        "classifier: {e}; downloads go to the default class until it attaches"
                    );
                }
                self.download_error = Some(e);
            }
        }
    }

    /// Brings the maps to `targets` (the plan just applied) for the connections of `flows`:
    /// changed entries are written, entries of connections and processes that are gone
    /// removed. A connection without a cookie (a `/proc/net` scan) is left to the default
    /// class, as is everything when a write fails: never a dropped packet. `leaves`: the minor
    /// of every leaf in the plan.
    pub fn sync(
        &mut self,
        flows: &FlowTable,
        targets: &FxHashMap<SocketKey, Targets>,
        leaves: &FxHashSet<u16>,
    ) {
        let classids = |t: &Targets, pick: fn(&Target) -> u16| -> Classids {
            let full = |t: &Option<Target>| t.as_ref().map(|t| classid(pick(t)));
            (full(&t.up), full(&t.down))
        };
        let mut connections = FxHashMap::default();
        // Per owner (by the tgid the kernel knows it by): its newest connection (cookies grow)
        // and that one's process leaves.
        let mut processes: FxHashMap<u32, (u64, Classids)> = FxHashMap::default();
        for c in flows.connections() {
            let cookie = c.socket.cookie;
            let Some(t) = targets.get(&c.socket.key()).filter(|_| cookie != 0) else {
                continue;
            };
            connections.insert(cookie, classids(t, |t| t.leaf));
            let tgid = match (&c.owner, &self.own_namespace) {
                (Some(owner), None) => Some(owner.pid),
                // A process whose host tgid is not known gets no class for new connections:
                // its connections have theirs by cookie.
                (Some(owner), Some(ns)) => flows
                    .get(c.socket.key())
                    .and_then(|f| f.process)
                    .and_then(|p| ns.translation.host(owner.pid, p.start_time)),
                (None, _) => None,
            };
            if let Some(tgid) = tgid {
                let newest = processes.entry(tgid).or_insert((0, (None, None)));
                if cookie >= newest.0 {
                    *newest = (cookie, classids(t, |t| t.process));
                }
            }
        }
        let mut processes: FxHashMap<u32, Classids> =
            processes.into_iter().map(|(p, (_, c))| (p, c)).collect();
        // A process whose connections are all closed keeps its class for new connections while
        // it lives (the kernel drops it at exit): its next connection is classified from its
        // first packet, and under a flood of its sockets their reports can be deferred. Without
        // the exit hook, entries go with the process's last connection, as before.
        if self.classifier.exec_hook_error().is_none() {
            self.linger(&mut processes, leaves);
        }

        let mut failed = 0;
        self.connections = reconcile_map(
            std::mem::take(&mut self.connections),
            connections,
            &mut self.classifier,
            &mut failed,
            |b, cookie, (up, down)| b.set_connection(cookie, up, down),
            BpfClassifier::remove_connection,
        );
        self.processes = reconcile_map(
            std::mem::take(&mut self.processes),
            processes,
            &mut self.classifier,
            &mut failed,
            |b, tgid, (up, down)| b.set_process_default(tgid, up, down),
            BpfClassifier::remove_process,
        );
        if failed > 0 && self.failed == 0 {
            tracing::warn!(
                "classifier maps: {failed} writes failed; those connections use the default \
                 class until a later cycle writes them"
            );
        }
        self.failed = failed;
    }

    /// Names the holding leaf (`minors`: upload, download; see [`crate::shape::Desired::hold`])
    /// to the kernel when it changed. A failed write is logged and tried again after the next
    /// apply; until then the kernel holds by what it had (at most 100 ms per new socket, in a
    /// leaf that may be gone: its packets then go to the default class), never drops.
    pub fn hold(&mut self, minors: (Option<u16>, Option<u16>)) {
        let classids = (minors.0.map(classid), minors.1.map(classid));
        if self.hold == Some(classids) {
            return;
        }
        match self.classifier.set_hold(classids.0, classids.1) {
            Ok(()) => {
                self.hold = Some(classids);
                self.hold_failed = false;
            }
            Err(e) => {
                if !self.hold_failed {
                    tracing::warn!(
                        "classifier: cannot name the holding leaf ({e}); a new process's first \
                         connections may run unlimited until decided"
                    );
                }
                self.hold_failed = true;
                self.hold = None;
            }
        }
    }

    /// Adds to `processes` the entries written earlier for processes that have no connection now
    /// but still run (checked at most once a second: a stat of `/proc/<tgid>` each), unless
    /// they name a leaf the plan no longer has (`leaves`: a process leaf, or one made ahead for
    /// its limited connections, goes with its last connection): its minor is given to another
    /// leaf two plans later, where the process's next connections would land.
    fn linger(&mut self, processes: &mut FxHashMap<u32, Classids>, leaves: &FxHashSet<u16>) {
        let in_plan = |c: Option<u32>| c.is_none_or(|c| leaves.contains(&((c & 0xffff) as u16)));
        let check = self
            .lingering_checked
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if check {
            self.lingering_checked = Some(std::time::Instant::now());
            if let Some(ns) = &mut self.own_namespace {
                ns.translation.prune();
            }
        }
        for (&tgid, &classes) in &self.processes {
            if processes.contains_key(&tgid) || !(in_plan(classes.0) && in_plan(classes.1)) {
                continue;
            }
            // The entries are keyed by host tgid: in a namespace of its own, whether the
            // process still runs is asked of the tie, which knows its pid here.
            let mut runs = || match &mut self.own_namespace {
                None => Path::new(&format!("/proc/{tgid}")).exists(),
                Some(ns) => ns.translation.local(tgid).is_some(),
            };
            if !check || runs() {
                processes.insert(tgid, classes);
            }
        }
    }

    /// Connections and processes the maps hold (for status and tests).
    pub fn entries(&self) -> (usize, usize) {
        (self.connections.len(), self.processes.len())
    }
}

/// Writes what changed from `old` to `new` and removes what is gone; returns what the map now
/// holds as far as we know: a failed write is left out (retried next time), a failed removal
/// kept (retried too).
fn reconcile_map<C, K: Copy + Eq + std::hash::Hash>(
    old: FxHashMap<K, Classids>,
    mut new: FxHashMap<K, Classids>,
    classifier: &mut C,
    failed: &mut usize,
    set: fn(&mut C, K, Classids) -> Result<(), BpfError>,
    remove: fn(&mut C, K) -> Result<(), BpfError>,
) -> FxHashMap<K, Classids> {
    let mut unwritten = Vec::new();
    for (&key, &value) in &new {
        if old.get(&key) != Some(&value) && set(classifier, key, value).is_err() {
            unwritten.push(key);
        }
    }
    *failed += unwritten.len();
    for key in unwritten {
        new.remove(&key);
    }
    for (key, value) in old {
        if !new.contains_key(&key) && remove(classifier, key).is_err() {
            *failed += 1;
            new.insert(key, value);
        }
    }
    new
}

/// A socket the classifier reported as new, with its creator, as the cycle takes it: keyed by
/// its cookie like the scan's, so the next scan's record replaces this one. It has no inode
/// yet (the owner comes from the tgid) and no byte counts.
pub fn created_socket(new: &NewSocket) -> (Socket, Pid) {
    let connected = new.remote.port() != 0;
    let socket = Socket {
        proto: new.proto,
        local: new.local,
        remote: new.remote,
        state: if connected || new.proto == Proto::Tcp {
            State::Established
        } else {
            State::Close
        },
        uid: new.uid,
        inode: 0,
        cookie: new.cookie,
        bytes_up: None,
        bytes_down: None,
    };
    (socket, new.tgid)
}

/// The full classid of shaper's class `minor`.
pub fn classid(minor: u16) -> u32 {
    u32::from(MAJOR) << 16 | u32::from(minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 11's 5.10 fails to load the object: the line says the kernel's age, not the
    /// verifier's log; from 5.12 the loader's own reason stands.
    #[test]
    fn a_kernel_before_5_12_is_named_as_the_reason() {
        assert_eq!(
            too_old(Some((5, 10))).as_deref(),
            Some("Linux 5.10 is older than 5.12, the oldest the BPF classifier loads on")
        );
        assert_eq!(too_old(Some((4, 19))).map(|_| ()), Some(()));
        assert_eq!(too_old(Some((5, 12))), None);
        assert_eq!(too_old(Some((6, 1))), None);
        assert_eq!(too_old(None), None);
        assert!(kernel_release().is_some_and(|r| r >= (3, 0)));
    }

    /// A map that records what it is told and fails the keys it is told to.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<u64>,
        removals: Vec<u64>,
        failing_writes: Vec<u64>,
        failing_removals: Vec<u64>,
    }

    fn refused() -> BpfError {
        BpfError::Bpf {
            what: "map conn_class".into(),
            message: "refused".into(),
        }
    }

    fn set(r: &mut Recorder, key: u64, _: Classids) -> Result<(), BpfError> {
        r.writes.push(key);
        if r.failing_writes.contains(&key) {
            Err(refused())
        } else {
            Ok(())
        }
    }

    fn remove(r: &mut Recorder, key: u64) -> Result<(), BpfError> {
        r.removals.push(key);
        if r.failing_removals.contains(&key) {
            Err(refused())
        } else {
            Ok(())
        }
    }

    fn map(entries: &[(u64, u16)]) -> FxHashMap<u64, Classids> {
        entries
            .iter()
            .map(|&(k, m)| (k, (Some(classid(m)), Some(classid(m)))))
            .collect()
    }

    #[test]
    fn only_changes_are_written_and_failures_are_retried() {
        let mut r = Recorder::default();
        let mut failed = 0;
        let held = reconcile_map(
            map(&[]),
            map(&[(1, 16), (2, 17)]),
            &mut r,
            &mut failed,
            set,
            remove,
        );
        assert_eq!((held.len(), failed), (2, 0));
        r.writes.sort();
        assert_eq!(r.writes, [1, 2]);

        // 1 unchanged, 2 moved (and its write fails), 3 new, and then 1 is gone (its removal
        // fails) while 2 stays.
        let mut r = Recorder {
            failing_writes: vec![2],
            ..Recorder::default()
        };
        let held = reconcile_map(
            held,
            map(&[(1, 16), (2, 18), (3, 19)]),
            &mut r,
            &mut failed,
            set,
            remove,
        );
        r.writes.sort();
        assert_eq!(r.writes, [2, 3], "the unchanged entry is not rewritten");
        assert_eq!(failed, 1);
        assert!(
            !held.contains_key(&2),
            "a failed write is not taken as held: retried next time"
        );
        assert_eq!(
            r.removals,
            [2],
            "the old value of a failed write is removed: default class"
        );

        let mut r = Recorder {
            failing_removals: vec![1],
            ..Recorder::default()
        };
        let mut failed = 0;
        let held = reconcile_map(held, map(&[(2, 18)]), &mut r, &mut failed, set, remove);
        assert_eq!(r.writes, [2], "the write that failed is made again");
        r.removals.sort();
        assert_eq!(r.removals, [1, 3]);
        assert_eq!(failed, 1);
        assert!(
            held.contains_key(&1),
            "a failed removal stays held: retried next time"
        );
        assert!(!held.contains_key(&3));
    }

    #[test]
    fn classids_are_under_shapers_major() {
        assert_eq!(classid(0x10), 0x5a_0010);
    }
}
