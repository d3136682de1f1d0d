//! The first-packet classifier as one edge of the daemon, carried in [`super::Parts`] like the
//! socket source and the tc backend (netavark's `FirewallDriver`, picked once by
//! `get_supported_firewall_driver`, with `fwnone` beside it): the daemon asks it how plans
//! classify, what it reports between cycles (new sockets, closed ones) and tells it what each
//! apply installed, and never asks which one it is. Three implementations:
//!
//! - [`U32Classifier`], the fallback: no fast path, the plan's u32 filters classify, and
//!   sock_diag's TCP destroy reports (when they can be joined) are the close reports;
//! - [`super::bpf::BpfState`], the BPF programs ([`crate::classify`]) and their maps;
//! - [`RecordingClassifier`], for tests: a test reports new and closed sockets through it and
//!   reads back what each apply wrote, so the fast path runs without root.
//!
//! [`choose`] picks one from the configuration, as `shaper run` always has.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};

use super::bpf::{self, BpfState, OwnPidNamespace};
use super::flows::FlowTable;
use crate::classify::{ClosedSocket, DownloadHook, NewSocket, ReportStats};
use crate::config::Config;
use crate::process::Pid;
use crate::scan::{DestroyListener, Socket, SocketKey, SocketSource};
use crate::shape::Targets;

/// What the daemon needs of a classifier. The methods with a default are those only a
/// classifier in the kernel has something to say to (the u32 filters are part of the plan).
pub trait Classifier: Send {
    /// `"bpf"` or `"u32"`, for the log, `status` and the metrics.
    fn name(&self) -> &'static str;

    /// Whether it puts each connection into its leaf itself (by `skb->priority`): the plans
    /// then have no per-connection filters (see [`crate::shape::PlanInput::by_priority`]).
    fn by_priority(&self) -> bool;

    /// Whether it reports new sockets between cycles, for [`super::Daemon::fast_path`].
    fn has_fast_path(&self) -> bool {
        false
    }

    /// Waits up to `timeout` for sockets reported as new since the last call.
    fn poll_new_sockets(&mut self, timeout: Duration) -> Vec<NewSocket> {
        let _ = timeout;
        Vec::new()
    }

    /// The sockets of `new` as the fast path's cycle takes them, each with its creator where
    /// that is a pid of the daemon's. This default takes the reported tgid for the pid, which
    /// holds in the initial PID namespace; see [`BpfState::owners_of`] for the others.
    fn owners_of(
        &mut self,
        new: &[NewSocket],
        scanner: &mut dyn SocketSource,
    ) -> Vec<(Socket, Option<Pid>)> {
        let _ = scanner;
        new.iter()
            .map(|n| {
                let (socket, tgid) = bpf::created_socket(n);
                (socket, Some(tgid))
            })
            .collect()
    }

    /// After the fast path's cycle decided the sockets of [`Classifier::owners_of`].
    fn learn_owners(&mut self, flows: &FlowTable) {
        let _ = flows;
    }

    /// Gives scanned sockets the byte counters the classifier keeps (sock_diag has none for
    /// UDP).
    fn fill_counters(&self, sockets: &mut [Socket]) {
        let _ = sockets;
    }

    /// Sockets that closed since the last call, with their final counts.
    fn take_closed(&mut self) -> Vec<ClosedSocket>;

    /// The shaped interface has a new index (re-created).
    fn interface_moved(&mut self, old: Option<u32>, new: u32) {
        let _ = (old, new);
    }

    /// After a plan was applied in full: where each connection of `flows` now goes.
    fn applied(&mut self, flows: &FlowTable, applied: Applied<'_>) {
        let _ = (flows, applied);
    }

    /// How owners are found in a PID namespace of the daemon's own (`None` in the initial
    /// one, and where no owner comes from the kernel).
    fn own_pid_namespace(&self) -> Option<OwnPidNamespace> {
        None
    }

    /// What the kernel could not report at once (`None`: it reports nothing).
    fn report_stats(&self) -> Option<ReportStats> {
        None
    }

    /// Where its download program is attached, if it has one.
    fn download_hook(&self) -> Option<DownloadHook> {
        None
    }

    /// The kernel ids of its programs, so a change made with one is not taken for another
    /// program's (see [`crate::shape::watch::Watch::set_own_programs`]).
    fn program_ids(&mut self) -> Vec<u32> {
        Vec::new()
    }
}

/// What a plan applied in full installed, as a classifier needs it.
#[derive(Debug, Clone, Copy)]
pub struct Applied<'a> {
    /// Each connection's leaves (and its owner's next connections').
    pub targets: &'a FxHashMap<SocketKey, Targets>,
    /// Every leaf's minor: an entry naming another is of a leaf that is gone.
    pub leaves: &'a FxHashSet<u16>,
    /// The holding leaf's minor, upload and download (see [`crate::shape::Desired::hold`]):
    /// where a new process's sockets wait for their decision, for at most their first 100 ms.
    pub hold: (Option<u16>, Option<u16>),
    /// The plan (re-)added the ingress qdisc.
    pub ingress_added: bool,
}

/// The classifier for `config`, for the daemon's interfaces: the BPF programs as
/// `config.classifier` says (see [`BpfState::start`], which logs the one line saying why the
/// u32 path stays), else the u32 filters with sock_diag's destroy reports. A dry run attaches
/// nothing and listens to nothing.
pub fn choose(config: &Config, dry_run: bool) -> anyhow::Result<Box<dyn Classifier>> {
    if dry_run {
        return Ok(Box::new(U32Classifier::default()));
    }
    let names = config.shaped_interfaces()?;
    Ok(match BpfState::start(config, &names)? {
        Some(bpf) => Box::new(bpf),
        None => Box::new(U32Classifier::listening()),
    })
}

/// The fallback: the plan's u32 filters classify, from the first cycle that sees a connection.
/// Its close reports are sock_diag's TCP destroy reports, which name no owner and no class.
#[derive(Default)]
pub struct U32Classifier {
    /// `None` in a dry run, in tests, or when the kernel refused them.
    destroy: Option<DestroyListener>,
}

impl U32Classifier {
    /// With sock_diag's TCP destroy reports, when the kernel gives them (else said once).
    pub fn listening() -> U32Classifier {
        U32Classifier {
            destroy: DestroyListener::new()
                .map_err(|e| tracing::warn!("{e}"))
                .ok(),
        }
    }
}

impl Classifier for U32Classifier {
    fn name(&self) -> &'static str {
        "u32"
    }

    fn by_priority(&self) -> bool {
        false
    }

    fn take_closed(&mut self) -> Vec<ClosedSocket> {
        self.destroy
            .as_mut()
            .map(DestroyListener::drain)
            .unwrap_or_default()
    }
}

impl Classifier for BpfState {
    fn name(&self) -> &'static str {
        "bpf"
    }

    fn by_priority(&self) -> bool {
        true
    }

    fn has_fast_path(&self) -> bool {
        true
    }

    fn poll_new_sockets(&mut self, timeout: Duration) -> Vec<NewSocket> {
        let new = self.classifier_mut().poll_new_sockets(timeout);
        self.forget_execs();
        self.warn_of_floods();
        new
    }

    fn owners_of(
        &mut self,
        new: &[NewSocket],
        scanner: &mut dyn SocketSource,
    ) -> Vec<(Socket, Option<Pid>)> {
        BpfState::owners_of(self, new, scanner)
    }

    fn learn_owners(&mut self, flows: &FlowTable) {
        BpfState::learn_owners(self, flows);
    }

    fn fill_counters(&self, sockets: &mut [Socket]) {
        BpfState::fill_counters(self, sockets);
    }

    fn take_closed(&mut self) -> Vec<ClosedSocket> {
        BpfState::take_closed(self)
    }

    fn interface_moved(&mut self, old: Option<u32>, new: u32) {
        BpfState::interface_moved(self, old, new);
    }

    fn applied(&mut self, flows: &FlowTable, applied: Applied<'_>) {
        self.ingress_applied(applied.ingress_added);
        self.sync(flows, applied.targets, applied.leaves);
        self.hold(applied.hold);
    }

    fn own_pid_namespace(&self) -> Option<OwnPidNamespace> {
        BpfState::own_pid_namespace(self)
    }

    fn report_stats(&self) -> Option<ReportStats> {
        Some(BpfState::report_stats(self))
    }

    fn download_hook(&self) -> Option<DownloadHook> {
        Some(BpfState::download_hook(self))
    }

    fn program_ids(&mut self) -> Vec<u32> {
        self.classifier_mut().program_ids()
    }
}

/// Full classids (`5a:minor`) of a connection's leaves, upload and download, as the BPF
/// classifier's `conn_class` map holds them (`None`: the default class).
pub type Leaves = (Option<u32>, Option<u32>);

/// What a [`RecordingClassifier`] was told and has yet to report.
#[derive(Debug, Default)]
struct Recorded {
    new: Vec<NewSocket>,
    closed: Vec<ClosedSocket>,
    /// Each connection's leaves by cookie, as the last apply left them.
    connections: FxHashMap<u64, Leaves>,
    /// Where each process's next connections start, by pid: its newest connection's
    /// [`crate::shape::Target::process`] leaves.
    processes: FxHashMap<Pid, Leaves>,
    /// The holding leaf, as the last apply named it.
    hold: Leaves,
    applies: usize,
}

/// A classifier in the kernel, played by a test: it reports the new and closed sockets the
/// test gives it (as the BPF ring buffer would) and records what each apply would write to the
/// maps, so [`super::Daemon::fast_path`] and the close charge run on fakes. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct RecordingClassifier(Arc<Mutex<Recorded>>);

impl RecordingClassifier {
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kernel reports `socket` as new (its first packet).
    pub fn report_new(&self, socket: NewSocket) {
        self.lock().new.push(socket);
    }

    /// The kernel reports `socket` closed, with its final counts.
    pub fn report_closed(&self, socket: ClosedSocket) {
        self.lock().closed.push(socket);
    }

    /// The leaves the last apply gave the connection `cookie` (`None`: it has no entry, so
    /// its packets go by its process's class or to the default class).
    pub fn leaves(&self, cookie: u64) -> Option<Leaves> {
        self.lock().connections.get(&cookie).copied()
    }

    /// The leaves the last apply gave process `pid`'s next connections (`None`: it has no
    /// entry).
    pub fn process_leaves(&self, pid: Pid) -> Option<Leaves> {
        self.lock().processes.get(&pid).copied()
    }

    /// The holding leaf the last apply named (full classids; `(None, None)`: no holding).
    pub fn hold(&self) -> Leaves {
        self.lock().hold
    }

    /// How many applies it was told of.
    pub fn applies(&self) -> usize {
        self.lock().applies
    }
}

impl Classifier for RecordingClassifier {
    fn name(&self) -> &'static str {
        "recording"
    }

    fn by_priority(&self) -> bool {
        true
    }

    fn has_fast_path(&self) -> bool {
        true
    }

    fn poll_new_sockets(&mut self, _timeout: Duration) -> Vec<NewSocket> {
        std::mem::take(&mut self.lock().new)
    }

    fn take_closed(&mut self) -> Vec<ClosedSocket> {
        std::mem::take(&mut self.lock().closed)
    }

    /// As [`BpfState::sync`] writes `conn_class` and `proc_class` (in the initial PID
    /// namespace, with no process lingering): every connection with a cookie and a target, and
    /// each owner's newest connection's process leaves.
    fn applied(&mut self, flows: &FlowTable, applied: Applied<'_>) {
        let targets = applied.targets;
        let full = |t: &Targets, pick: fn(&crate::shape::Target) -> u16| -> Leaves {
            let one = |t: &Option<crate::shape::Target>| t.as_ref().map(|t| bpf::classid(pick(t)));
            (one(&t.up), one(&t.down))
        };
        let mut connections = FxHashMap::default();
        let mut processes: FxHashMap<Pid, (u64, Leaves)> = FxHashMap::default();
        for c in flows.connections().iter().filter(|c| c.socket.cookie != 0) {
            let Some(t) = targets.get(&c.socket.key()) else {
                continue;
            };
            connections.insert(c.socket.cookie, full(t, |t| t.leaf));
            if let Some(owner) = &c.owner {
                let newest = processes.entry(owner.pid).or_insert((0, (None, None)));
                if c.socket.cookie >= newest.0 {
                    *newest = (c.socket.cookie, full(t, |t| t.process));
                }
            }
        }
        let mut recorded = self.lock();
        recorded.connections = connections;
        recorded.processes = processes.into_iter().map(|(p, (_, l))| (p, l)).collect();
        recorded.hold = (
            applied.hold.0.map(bpf::classid),
            applied.hold.1.map(bpf::classid),
        );
        recorded.applies += 1;
    }
}
