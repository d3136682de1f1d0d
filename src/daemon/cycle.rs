//! The cycle as one value: [`Cycle::run`] takes one cycle's inputs — sockets (all of them, or
//! only new ones), the clock, the usage the policy reads, the rates in force — and brings the
//! flow table up to date (lookup → policy → account); [`Cycle::tc_plan`] then turns the table
//! into the operations for one interface, against the [`KernelFacts`] read for it (what it has
//! installed, its MTU, the kernel's features, how the classifier classifies): planning reads
//! and changes nothing, applying is the daemon's.
//!
//! `shaper run` (and `--dry-run`), `shaper plan` and `shaper simulate` all go through it, so what
//! `plan` prints is what `run` would do. The fast path (shaping a connection from its first
//! packet) calls [`Cycle::run`] with [`Sockets::New`]: only those connections are looked up and
//! decided, every other record stays as it is, and the plan is made from the whole table.
//!
//! The `--connection-rate` default, the capacity (the smaller of `uplink` and `--rate`) and the
//! built-in policy fallback live here and nowhere else.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::flows::{Closed, FlowTable};
use crate::account::{Accounting, LinkCounters, UsageView};
use crate::config::Config;
use crate::names::{NameSource, NoNames};
use crate::policy::{self, ClassSet, Decision, Each, Engine, EngineOptions, PolicyError, Script};
use crate::process::{Pid, ProcessTable, Snapshot};
use crate::scan::Socket;
use crate::shape::{
    Capacity, Desired, Exhausted, Features, Framing, Handles, Installed, Op, Plan, PlanInput,
    Redirect, ShapeError, Slot, Targets, TcBackend, device_mtu, plan, reconcile,
};
use crate::units::{Rate, RatePair};

/// The policy used without `--script`: every connection in `default`; the limits come from
/// `--rate`/`--connection-rate` (and their files), which the cycle applies as defaults.
pub const BUILTIN_POLICY: &str = include_str!("../../lua/builtin-policy.lua");

/// The sockets a cycle is given.
#[derive(Debug)]
pub enum Sockets {
    /// Every live socket (a scan): a connection not among them is gone.
    All(Vec<Socket>),
    /// Only some sockets (new ones): they are looked up and decided, every other connection
    /// keeps its record and its decision.
    New(Vec<Socket>),
    /// Every live connection, already joined with its owner (a recorded snapshot).
    Recorded(Snapshot),
    /// New sockets with the process that created them (the BPF classifier's reports): decided
    /// like [`Sockets::New`], the owner read from `/proc/<pid>` without a descriptor walk; a
    /// socket without a pid (the daemon in a PID namespace of its own) by its inode instead.
    Created(Vec<(Socket, Option<Pid>)>),
}

/// The whole-interface and per-connection limits in force (`--rate`, `--connection-rate` and
/// their files).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    pub rate: Option<RatePair>,
    pub connection_rate: Option<RatePair>,
}

/// One cycle's inputs besides the sockets.
pub struct Inputs<'a> {
    /// The cycle's time, in the zone the policy sees.
    pub now: jiff::Zoned,
    /// `ctx.interface`.
    pub interface: Option<String>,
    /// What `ctx.usage` and `ctx.class` read.
    pub usage: Arc<dyn UsageView>,
    /// Live accounting, updated with the cycle's counters; `None` for a cycle that only plans
    /// (`plan`, `simulate`).
    pub accounting: Option<&'a mut Accounting>,
    /// The interfaces' counters, for the `link` usage.
    pub links: &'a [LinkCounters],
    /// Sockets that closed since the last whole cycle (the BPF classifier's reports): their
    /// last bytes are charged with this cycle's (whole cycles only).
    pub closed: Vec<Closed>,
    pub rates: Rates,
}

/// Stage durations of a cycle.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub scan: Duration,
    pub lookup: Duration,
    pub policy: Duration,
    pub account: Duration,
    pub shape: Duration,
}

impl Timings {
    pub fn total(&self) -> Duration {
        self.scan + self.lookup + self.policy + self.account + self.shape
    }

    /// Each stage's time and the total, by name (for `status` and the metrics).
    pub fn stages(&self) -> [(&'static str, Duration); 6] {
        [
            ("scan", self.scan),
            ("lookup", self.lookup),
            ("policy", self.policy),
            ("account", self.account),
            ("shape", self.shape),
            ("total", self.total()),
        ]
    }
}

/// Runs `f` as the stage `name`: in a tracing span (`SHAPER_LOG=debug` prints its time when it
/// closes), its duration stored in `slot`.
pub fn stage<T>(name: &'static str, slot: &mut Duration, f: impl FnOnce() -> T) -> T {
    let _span = tracing::debug_span!("stage", stage = name).entered();
    let t = Instant::now();
    let out = f();
    *slot = t.elapsed();
    out
}

/// What one run of the cycle produced besides the flow table.
#[derive(Debug)]
pub struct Outcome {
    pub classes: ClassSet,
    /// Connections decided in this run.
    pub decided: usize,
    /// Of those, how many got a fallback decision (error, or a failed cycle).
    pub fallbacks: usize,
    /// Set when the policy failed as a whole; the decisions are then the previous ones.
    pub failure: Option<PolicyError>,
    /// What the policy raised with `shaper.notify` (see [`super::events`]).
    pub notices: Vec<crate::policy::Notice>,
}

/// The pipeline and what it keeps between cycles: the policy engine, the lookup cache and the
/// flow table.
pub struct Cycle {
    engine: Engine,
    builtin: bool,
    lookup: ProcessTable,
    flows: FlowTable,
    /// Names for remote addresses, asked after the lookup (see [`crate::names`]).
    names: Box<dyn NameSource>,
    /// `uplink`/`downlink` from the configuration.
    link: Capacity,
    /// The capacity in force: `link` narrowed by `--rate`.
    capacity: Capacity,
}

impl Cycle {
    /// A cycle running `engine`, with link capacity `link`, looking owners up in `proc_root`.
    pub fn new(engine: Engine, link: Capacity, proc_root: &Path) -> Cycle {
        Cycle {
            engine,
            builtin: false,
            lookup: ProcessTable::with_proc_root(proc_root),
            flows: FlowTable::default(),
            names: Box::new(NoNames),
            link,
            capacity: link,
        }
    }

    /// The cycle `run` and `plan` use: the configured script, or the built-in policy when no
    /// script was named (`script_named`) and none exists at the configured path.
    pub fn load(
        config: &Config,
        script_named: bool,
        strict_permissions: bool,
        proc_root: &Path,
    ) -> Result<Cycle, PolicyError> {
        let builtin = !script_named && !config.script.exists();
        let engine = if builtin {
            tracing::info!(
                "no policy script at {}: using the built-in policy (limits from --rate and \
                 --connection-rate only)",
                config.script.display()
            );
            Engine::from_script(
                Script {
                    path: "<built-in policy>".into(),
                    source: BUILTIN_POLICY.to_string(),
                },
                EngineOptions::default(),
            )?
        } else {
            Engine::load(
                &config.script,
                EngineOptions {
                    strict_permissions,
                    ..EngineOptions::default()
                },
            )?
        };
        let link = Capacity {
            up: config.uplink,
            down: config.downlink,
            framing: Framing {
                overhead: config.overhead,
                mpu: config.mpu,
                link_layer: config.linklayer,
            },
        };
        Ok(Cycle {
            builtin,
            ..Cycle::new(engine, link, proc_root)
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// The least per-connection limit, per direction (bits/s), that `classify` returns as a
    /// literal (`return "bulk", "2mbit"`): what the BPF classifier holds a new process's first
    /// connections at before any connection has been given a limit.
    pub fn literal_limits(&self) -> (Option<u64>, Option<u64>) {
        let engine = &self.engine;
        let limits = engine.classify_span().map_or_else(Vec::new, |span| {
            crate::policy::lint::returned_limits(&engine.script().source, span)
        });
        let least = |side: fn(&RatePair) -> Option<Rate>| {
            limits.iter().filter_map(side).map(Rate::bits_per_sec).min()
        };
        (least(|p| p.up), least(|p| p.down))
    }

    /// Where connections' remote names come from (none by default).
    pub fn set_names(&mut self, names: Box<dyn NameSource>) {
        self.names = names;
    }

    /// Whether the built-in policy runs (nothing to reload).
    pub fn builtin(&self) -> bool {
        self.builtin
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// The capacity the last run put in force.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// [`capacity_warning`] for the classes and capacity of the last run.
    pub fn capacity_warning(&self) -> Option<String> {
        capacity_warning(self.engine.classes(), self.capacity)
    }

    /// Runs lookup → policy → account for `sockets` and updates the flow table. Stage times go
    /// to `timings`.
    pub fn run(&mut self, sockets: Sockets, input: Inputs<'_>, timings: &mut Timings) -> Outcome {
        let partial = matches!(sockets, Sockets::New(_) | Sockets::Created(_));
        let snapshot = stage("lookup", &mut timings.lookup, || {
            let mut snapshot = match sockets {
                Sockets::All(sockets) => {
                    self.lookup.update(&sockets);
                    self.lookup.snapshot(sockets)
                }
                Sockets::New(sockets) => {
                    self.lookup.add(&sockets);
                    self.lookup.snapshot(sockets)
                }
                // A recording carries its own names.
                Sockets::Recorded(snapshot) => return snapshot,
                Sockets::Created(sockets) => self.lookup.snapshot_created(sockets),
            };
            name_remotes(&mut snapshot, self.names.as_mut());
            snapshot
        });
        let Inputs {
            now,
            interface,
            usage,
            accounting,
            links,
            closed,
            rates,
        } = input;

        let outcome = stage("policy", &mut timings.policy, || {
            let (previous, stats) = self.flows.known(&snapshot);
            let snapshot = Arc::new(snapshot);
            let mut outcome = self.engine.run(policy::CycleInput {
                snapshot: snapshot.clone(),
                stats,
                previous,
                now: now.clone(),
                interface,
                usage,
                rate: rates.rate,
                connection_rate: rates.connection_rate,
            });
            apply_connection_rate(&mut outcome.decisions, rates.connection_rate);
            let decided = outcome.decisions.len();
            if partial {
                self.flows.merge(&snapshot, outcome.decisions);
            } else {
                self.flows.replace(snapshot, outcome.decisions);
            }
            Outcome {
                classes: outcome.classes,
                decided,
                fallbacks: outcome.fallbacks,
                failure: outcome.failure,
                notices: outcome.notices,
            }
        });

        // Accounting counts whole cycles: a partial one has no counters for the others.
        if let Some(accounting) = accounting.filter(|_| !partial) {
            stage("account", &mut timings.account, || {
                let ceilings = class_ceilings(&outcome.classes);
                let charges = self.flows.close(&closed);
                accounting.observe(&now, self.flows.observed(), &charges, &ceilings, links);
            });
        }
        // The rates in force are read once per whole cycle: a partial one keeps its capacity.
        if !partial {
            self.capacity = Capacity {
                up: min_rate(self.link.up, rates.rate.and_then(|r| r.up)),
                down: min_rate(self.link.down, rates.rate.and_then(|r| r.down)),
                framing: self.link.framing,
            };
        }
        outcome
    }

    /// The operations bringing `iface` to what the flow table wants, against `facts`, or
    /// `None` when nothing the plan is made from changed since the last apply. Reads and
    /// changes nothing in the kernel: a refusal carries the one operation that must be applied
    /// regardless ([`PlanFailure::unblock`]).
    pub fn tc_plan(
        &self,
        iface: &mut Interface,
        facts: KernelFacts,
        replace: bool,
    ) -> Result<Option<TcPlan>, PlanFailure> {
        let KernelFacts {
            features,
            mtu,
            installed,
            by_priority,
        } = facts;
        let inputs = self.plan_inputs_hash(features, mtu, by_priority);
        if iface.applied.is_some() && iface.applied_from == Some(inputs) {
            return Ok(None);
        }
        let desired = plan(
            &PlanInput {
                classes: self.engine.classes(),
                connections: self.flows.connections(),
                decisions: self.flows.decisions(),
                capacity: self.capacity,
                features,
                mtu,
                by_priority,
            },
            &mut iface.handles,
        );
        iface.note_exhausted(iface.handles.exhausted());
        // The tree last applied is moved into the comparison, not copied: with a leaf per
        // connection it is the daemon's largest structure.
        let installed = match (installed, iface.applied.take()) {
            (Some(read), _) => read,
            (None, Some(applied)) => Installed {
                upload: Slot::Ours(applied.upload),
                ingress: Slot::Ours(Redirect::ToIfb),
                download: Some(Slot::Ours(applied.download)),
            },
            // `KernelFacts::read` reads the kernel whenever the interface does not know.
            (None, None) => Installed::nothing(),
        };
        let ops = match reconcile(&iface.name, &desired, &installed, replace) {
            Ok(ops) => ops,
            Err(reason) => {
                // Nothing else may be done here (a foreign qdisc), but shaper's own redirect to
                // a missing IFB drops every inbound packet: it goes regardless.
                let unblock = (installed.ingress == Slot::Ours(Redirect::Dangling)).then(|| Plan {
                    ops: vec![Op::DeleteIngress {
                        dev: iface.name.clone(),
                    }],
                });
                return Err(PlanFailure { reason, unblock });
            }
        };
        Ok(Some(TcPlan {
            ops,
            desired,
            inputs,
        }))
    }

    /// Everything the planner reads, hashed: the classes, each connection's identity, owner and
    /// decision, the capacity and the kernel features.
    fn plan_inputs_hash(&self, features: Features, mtu: u32, by_priority: bool) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        self.engine.classes().hash(&mut h);
        self.capacity.hash(&mut h);
        features.hash(&mut h);
        mtu.hash(&mut h);
        by_priority.hash(&mut h);
        for (c, d) in self.flows.connections().iter().zip(self.flows.decisions()) {
            // The addresses too: an unconnected UDP socket that connects keeps its key but
            // needs another filter.
            c.socket.key().hash(&mut h);
            (c.socket.proto, c.socket.local, c.socket.remote).hash(&mut h);
            c.owner.as_ref().map(|o| o.pid).hash(&mut h);
            d.hash(&mut h);
        }
        h.finish()
    }
}

/// What the kernel holds that one interface's plan is made against, read before planning so
/// [`Cycle::tc_plan`] reads nothing itself.
#[derive(Debug)]
pub struct KernelFacts {
    features: Features,
    mtu: u32,
    /// What is installed, read only when the interface does not know it from its last apply.
    installed: Option<Installed>,
    /// The classifier puts each connection into its leaf itself: plan no per-connection
    /// filters (see [`PlanInput::by_priority`]).
    by_priority: bool,
}

impl KernelFacts {
    /// Reads, through `backend`, what `iface`'s plan needs: the kernel's features, the MTU,
    /// and what is installed when the last apply does not say.
    pub fn read(
        backend: &mut dyn TcBackend,
        iface: &Interface,
        by_priority: bool,
    ) -> Result<KernelFacts, ShapeError> {
        let features = backend.features();
        let mtu = device_mtu(backend, &iface.name);
        let installed = match iface.applied {
            Some(_) => None,
            None => Some(backend.installed(&iface.name)?),
        };
        Ok(KernelFacts {
            features,
            mtu,
            installed,
            by_priority,
        })
    }
}

/// Why an interface's plan could not be made (its state could not be read, or another
/// program's qdisc is in the way), and what must be applied regardless.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct PlanFailure {
    pub reason: ShapeError,
    /// Removes shaper's own redirect to an IFB that is gone, which would drop every inbound
    /// packet.
    pub unblock: Option<Plan>,
}

/// The operations for one interface, and what they install.
#[derive(Debug)]
pub struct TcPlan {
    pub ops: Plan,
    desired: Desired,
    inputs: u64,
}

impl TcPlan {
    /// Where each connection goes once the plan is applied (for the BPF classifier's maps),
    /// taken out: the installed state does not keep it.
    pub fn take_targets(&mut self) -> rustc_hash::FxHashMap<crate::scan::SocketKey, Targets> {
        std::mem::take(&mut self.desired.targets)
    }

    /// The holding leaf's minor, upload and download (see [`Desired::hold`]).
    pub fn hold(&self) -> (Option<u16>, Option<u16>) {
        self.desired.hold
    }

    /// The minors of every leaf the plan installs, either way (one minor is one slot in both
    /// directions), for telling a classid still in the tree from one of a deleted leaf.
    pub fn leaf_minors(&self) -> rustc_hash::FxHashSet<u16> {
        let (up, down) = (&self.desired.upload.leaves, &self.desired.download.leaves);
        up.keys().chain(down.keys()).copied().collect()
    }
}

/// Whether an interface's tree is in the kernel, and if not, why: what `status` shows in its
/// own column, so ceilings that are not in force never look as if they were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapingState {
    /// Before the first cycle.
    Starting,
    /// The interface does not exist (yet): a ppp link redialling, a USB modem not plugged in, or
    /// a typo. Shaped within a cycle of its appearing.
    Waiting,
    /// The last plan was applied: the classes are in force.
    Shaping,
    /// `--dry-run`: the plan is logged, nothing is installed.
    DryRun,
    /// A qdisc shaper did not install is in the way (without `--replace`).
    Refused(String),
    /// The kernel could not be read or the plan could not be made.
    Error(String),
    /// This many operations of the last apply failed; the next cycle reads the kernel again.
    Failing(usize),
}

impl ShapingState {
    /// The one word `status` shows (and `--json` reports as `state`).
    pub fn keyword(&self) -> &'static str {
        match self {
            ShapingState::Starting => "starting",
            ShapingState::Waiting => "waiting",
            ShapingState::Shaping => "shaping",
            ShapingState::DryRun => "dry-run",
            ShapingState::Refused(_) => "refused",
            ShapingState::Error(_) => "error",
            ShapingState::Failing(_) => "failing",
        }
    }

    /// Why, for the states that have a reason.
    pub fn detail(&self) -> Option<String> {
        match self {
            ShapingState::Refused(why) | ShapingState::Error(why) => Some(why.clone()),
            ShapingState::Failing(n) => Some(format!("{n} operations of the last cycle failed")),
            ShapingState::Waiting => Some("the interface does not exist (yet)".into()),
            _ => None,
        }
    }

    /// Whether the classes are installed on this interface, so their ceilings apply.
    pub fn in_force(&self) -> bool {
        matches!(self, ShapingState::Shaping)
    }
}

impl std::fmt::Display for ShapingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.keyword())?;
        match self.detail() {
            Some(detail) => write!(f, " ({detail})"),
            None => Ok(()),
        }
    }
}

/// One shaped interface between cycles: its index, its handle allocation, and what the last
/// successful apply left installed.
#[derive(Debug)]
pub struct Interface {
    pub(crate) name: String,
    pub(crate) ifindex: Option<u32>,
    handles: Handles,
    /// What the last successful apply left installed; `None` means "read the kernel".
    applied: Option<Desired>,
    /// A hash of what that plan was made from: when the next cycle's inputs hash the same, the
    /// plan would be the same, so planning is skipped.
    applied_from: Option<u64>,
    pub(crate) state: ShapingState,
    pub(crate) operations: usize,
    pub(crate) failures: u64,
    /// Classes and filters the last plan could not give a handle (a full minor space or hash
    /// bucket): their connections are shaped by their class's shared leaf, or by `default`.
    pub(crate) unplaced: usize,
}

impl Interface {
    /// The policy class of each minor of a full classid (`5a:minor`) in the last plan.
    pub fn classes_by_minor(&self) -> rustc_hash::FxHashMap<u16, &str> {
        self.handles.classes_by_minor()
    }

    pub fn new(name: String) -> Interface {
        Interface {
            name,
            ifindex: None,
            handles: Handles::default(),
            applied: None,
            applied_from: None,
            state: ShapingState::Starting,
            operations: 0,
            failures: 0,
            unplaced: 0,
        }
    }

    /// Keeps the count of classes and filters the last plan could not place, for `status`
    /// (the planner logs the cause once).
    fn note_exhausted(&mut self, exhausted: Exhausted) {
        self.unplaced = exhausted.minors + exhausted.filters;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tc handles the last plan gave classes, leaves and connections (for `status`).
    pub fn handles(&self) -> &Handles {
        &self.handles
    }

    /// The policy was reloaded: the holding leaf no longer keeps the limits the old one gave
    /// connections but starts at those the new one returns as literals (`literal`, see
    /// [`Cycle::literal_limits`]), and the next cycle plans even if its inputs look the same.
    pub fn policy_reloaded(&mut self, literal: (Option<u64>, Option<u64>)) {
        self.handles.forget_hold();
        self.policy_loaded(literal);
        self.applied_from = None;
    }

    /// The holding leaf starts at the limits the policy returns as literals.
    pub fn policy_loaded(&mut self, literal: (Option<u64>, Option<u64>)) {
        self.handles.seed_hold(literal.0, literal.1);
    }

    /// `plan` is installed (or, in a dry run, taken as installed).
    pub fn installed(&mut self, plan: TcPlan) {
        self.applied = Some(plan.desired);
        self.applied_from = Some(plan.inputs);
    }

    /// What is installed is no longer known (a failed operation, a re-created interface): the
    /// next plan reads the kernel.
    pub fn forget_installed(&mut self) {
        self.applied = None;
    }
}

/// Gives each connection the name last looked up for its remote address. Loopback and
/// unconnected remotes are not looked up: no answer names them.
fn name_remotes(snapshot: &mut Snapshot, names: &mut dyn NameSource) {
    let now = Instant::now();
    for c in &mut snapshot.connections {
        let ip = c.socket.remote.ip();
        if ip.is_loopback() || ip.is_unspecified() {
            continue;
        }
        c.remote_host = names.name_of(ip, now).map(|n| n.to_string());
    }
}

/// The classes whose ceiling applies to the class as a whole, with that ceiling: what
/// accounting keeps class buckets for.
fn class_ceilings(classes: &ClassSet) -> Vec<(&str, RatePair)> {
    classes
        .classes
        .values()
        .filter(|d| d.each == Each::Class)
        .map(|d| (&*d.name, d.ceil))
        .collect()
}

/// Why the policy's priorities (or guaranteed rates) would do nothing: they only act when a
/// queue forms in shaper's classes, which needs the link class capped a little below the line's
/// real rate. Without `uplink`/`downlink` (or `--rate`) the link class is 100 Gbit/s, the queue
/// forms in the modem instead, and every class is served as if it had the same priority.
/// `None` when the policy uses neither, or the capacity is set in each direction.
pub fn capacity_warning(classes: &ClassSet, capacity: Capacity) -> Option<String> {
    let prios: std::collections::BTreeSet<u8> = classes.classes.values().map(|c| c.prio).collect();
    let guaranteed: Vec<&str> = classes
        .classes
        .values()
        .filter(|c| c.rate != RatePair::default())
        .map(|c| &*c.name)
        .collect();
    let uses = match (prios.len() > 1, guaranteed.is_empty()) {
        (false, true) => return None,
        (true, true) => "priorities".to_string(),
        (false, false) => format!("guaranteed rates ({})", guaranteed.join(", ")),
        (true, false) => format!(
            "priorities and guaranteed rates ({})",
            guaranteed.join(", ")
        ),
    };
    let unset: Vec<&str> = [("uplink", capacity.up), ("downlink", capacity.down)]
        .into_iter()
        .filter(|(_, rate)| rate.is_none())
        .map(|(key, _)| key)
        .collect();
    if unset.is_empty() {
        return None;
    }
    let keys = unset.join(" and ");
    Some(format!(
        "the policy uses {uses} but {keys} {} not set, so they have no effect: the link \
         class is then 100 Gbit/s and the queue forms in the modem, not in shaper's classes. Set \
         {keys} in /etc/shaper/shaper.ron (or --{}) a little below the line's real rate, e.g. \
         90 % of a speed test",
        if unset.len() == 1 { "is" } else { "are" },
        unset.join("/--")
    ))
}

fn min_rate(a: Option<Rate>, b: Option<Rate>) -> Option<Rate> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `--connection-rate` as the default: a direction the policy left unlimited gets it.
fn apply_connection_rate(decisions: &mut [Decision], connection_rate: Option<RatePair>) {
    let Some(default) = connection_rate else {
        return;
    };
    for d in decisions {
        d.limit.up = d.limit.up.or(default.up);
        d.limit.down = d.limit.down.or(default.down);
    }
}
