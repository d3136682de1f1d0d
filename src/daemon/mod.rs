//! The daemon: [`Daemon::tick`], run once per interval, scans, runs the [`Cycle`] (lookup →
//! policy → account into the [`flows::FlowTable`]) and reconciles + applies per interface; the
//! service around it ([`service`]: pid file, control socket, signals, systemd notifications).
//! The machine is reached only through [`Parts`], so `tick` runs on fakes in the tests.

pub mod bpf;
pub mod classifier;
pub mod cycle;
pub mod events;
pub mod flows;
pub mod iflock;
pub mod latency;
pub mod metrics;
pub mod rundir;
pub mod service;
pub mod startup;
pub mod status;

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use classifier::Classifier;
use cycle::{KernelFacts, PlanFailure, TcPlan, stage};
use flows::Closed;
use startup::existing_interfaces_hint;

pub use cycle::{
    BUILTIN_POLICY, Cycle, Inputs, Interface, Outcome, Rates, ShapingState, Sockets, Timings,
};

use crate::account::{Accounting, LinkCounters};
use crate::config::{Config, RateFile};
use crate::names::sniff::DnsSniffer;
use crate::names::{NameSource, NoNames};
use crate::policy::{Engine, PolicyError};
use crate::scan::{self, Backend, SocketSource};
use crate::shape::netlink::NetlinkBackend;
use crate::shape::watch::Watch;
use crate::shape::{Slot, TcBackend, teardown};
use crate::units::RatePair;

/// A limit from a flag, optionally overridden by a file (nbdkit's `rate=` + `rate-file=`).
#[derive(Debug)]
pub struct RateSource {
    pub flag: Option<RatePair>,
    pub file: Option<RateFile>,
    /// The value of the last cycle (for `status`).
    pub last: Option<RatePair>,
}

impl RateSource {
    /// `strict`: the file must be root's ([`RateFile::new`]).
    pub fn new(flag: Option<RatePair>, file: Option<PathBuf>, strict: bool) -> RateSource {
        RateSource {
            flag,
            file: file.map(|path| RateFile::new(path, strict)),
            last: flag,
        }
    }

    /// The value for this cycle (`None` = no limit).
    pub fn current(&mut self) -> Option<RatePair> {
        self.last = match &mut self.file {
            Some(f) => f.current(self.flag),
            None => self.flag,
        };
        self.last
    }
}

/// How the daemon runs, beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The script was named with `--script`: a missing one is an error rather than the
    /// built-in policy.
    pub script_named: bool,
    /// Log the plan, touch nothing.
    pub dry_run: bool,
    /// Replace a root or ingress qdisc shaper did not install.
    pub replace: bool,
    /// Refuse policy files root does not own or others can write (see
    /// [`crate::policy::read_source`]).
    pub strict_permissions: bool,
}

/// The clock the daemon reads: the system's, or a test's stepped one.
pub type Clock = Box<dyn Fn() -> jiff::Zoned + Send>;

/// The daemon's edges to the machine, injected so the cycle (and the fast path) can run on
/// fakes: where sockets come from, the tc/link backend, the first-packet classifier, the
/// procfs tree owners are looked up in, the clock, and where remote addresses' names come from.
pub struct Parts {
    pub sockets: Box<dyn SocketSource>,
    pub tc: Box<dyn TcBackend>,
    pub classifier: Box<dyn Classifier>,
    pub proc_root: PathBuf,
    pub clock: Clock,
    pub names: Box<dyn NameSource>,
}

/// A failure kept for `status` until the operation next succeeds: a broken reload or a usage
/// save that failed would otherwise be visible only in the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub message: String,
    /// When it happened (RFC 3339).
    pub at: String,
}

impl Failure {
    fn now(message: impl ToString) -> Failure {
        Failure {
            message: message.to_string(),
            at: jiff::Timestamp::now().to_string(),
        }
    }
}

impl Parts {
    /// The real machine, in the calling thread's network namespace, with the classifier
    /// [`classifier::choose`] picks for `config` (nothing attached in a dry run).
    pub fn system(config: &Config, dry_run: bool) -> anyhow::Result<Parts> {
        Ok(Parts {
            sockets: scan::open(Backend::Auto)?,
            tc: Box::new(NetlinkBackend::new()?),
            classifier: classifier::choose(config, dry_run)?,
            proc_root: PathBuf::from(PROC),
            clock: Box::new(jiff::Zoned::now),
            names: match DnsSniffer::start() {
                Ok(sniffer) => Box::new(sniffer),
                Err(e) => {
                    tracing::warn!("{e}; conn.remote_host is nil and status shows addresses");
                    Box::new(NoNames)
                }
            },
        })
    }
}

/// The machine's procfs.
const PROC: &str = "/proc";

/// Everything a running shaper holds. Read-only views for `status` are in [`status`].
pub struct Daemon {
    config: Config,
    options: RunOptions,
    cycle: Cycle,
    sockets: Box<dyn SocketSource>,
    tc: Box<dyn TcBackend>,
    clock: Clock,
    accounting: Accounting,
    interfaces: Vec<Interface>,
    rate: RateSource,
    connection_rate: RateSource,
    /// The last cycle's outcome, for `status`.
    last: Option<Outcome>,
    timings: Timings,
    cycles: u64,
    started: jiff::Timestamp,
    /// Changes other programs make to the interfaces (none in a dry run, which changes nothing,
    /// nor on a backend that is not the kernel's).
    watch: Option<Watch>,
    /// The last reload's error (with file:line), cleared by a successful reload.
    reload_error: Option<Failure>,
    /// The last usage save's error, cleared by a successful save.
    usage_save_error: Option<Failure>,
    last_flush: Instant,
    script_mtimes: Vec<(PathBuf, Option<SystemTime>)>,
    /// The first-packet classifier (or the u32 filters): how plans classify, what is
    /// reported between cycles, and what each apply is written to.
    classifier: Box<dyn Classifier>,
    /// What the fast path costs (for `status`).
    fast_path_stats: latency::FastPathStats,
    /// Events the policy raised (`shaper.notify`).
    events: events::Events,
    /// A large fast-path batch ran since the last cycle (see [`Daemon::tick`]).
    trim_after_cycle: bool,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Daemon {
    /// Loads the policy (failing on a broken script), the saved usage, and opens the kernel
    /// interfaces, in the calling thread's network namespace.
    /// Unless in a dry run, attaches the BPF classifier as `classifier` says (see
    /// [`classifier::choose`]).
    pub fn new(config: Config, options: RunOptions) -> anyhow::Result<Daemon> {
        // The policy first: a broken script fails the start before anything is attached.
        let cycle = Cycle::load(
            &config,
            options.script_named,
            options.strict_permissions,
            Path::new(PROC),
        )?;
        let parts = Parts::system(&config, options.dry_run)?;
        let mut daemon = Daemon::assemble(config, options, cycle, parts)?;
        if !daemon.options.dry_run {
            daemon.remove_stale_download_filters();
        }
        Ok(daemon)
    }

    /// Removes a killed run's cls_bpf download filter from each interface whose ingress is
    /// shaper's, unless this run puts its own there (which replaces it): left in place, it
    /// would go on writing the dead run's class ids into the tree this run builds.
    fn remove_stale_download_filters(&mut self) {
        let own = self.classifier.download_hook() == Some(crate::classify::DownloadHook::ClsBpf);
        if own {
            return;
        }
        for iface in &self.interfaces {
            let ours = matches!(
                self.tc.installed(&iface.name).map(|i| i.ingress),
                Ok(Slot::Ours(_))
            );
            if ours && crate::classify::remove_stale_download_filter(&iface.name) {
                tracing::info!(
                    "removed the first-packet classifier's filter an earlier run left on {}'s \
                     ingress",
                    iface.name
                );
            }
        }
    }

    /// `"bpf"` when the first-packet classifier is attached, else `"u32"`.
    pub fn classifier(&self) -> &'static str {
        self.classifier.name()
    }

    /// As [`Daemon::new`], on the given edges.
    pub fn with_parts(config: Config, options: RunOptions, parts: Parts) -> anyhow::Result<Daemon> {
        let cycle = Cycle::load(
            &config,
            options.script_named,
            options.strict_permissions,
            &parts.proc_root,
        )?;
        Daemon::assemble(config, options, cycle, parts)
    }

    fn assemble(
        config: Config,
        options: RunOptions,
        mut cycle: Cycle,
        mut parts: Parts,
    ) -> anyhow::Result<Daemon> {
        cycle.set_names(parts.names);
        let now = (parts.clock)();
        let accounting = Accounting::load(&usage_path(&config), &now, config.month_start_day);
        let names = config.shaped_interfaces()?;
        let watch = match parts.tc.notify_port() {
            Some(port) if !options.dry_run => Watch::start(names.clone(), port)
                .map_err(|e| {
                    tracing::warn!(
                        "cannot listen for netlink notifications ({e}); changes made by other \
                         programs are noticed only when an operation fails"
                    )
                })
                .ok(),
            _ => None,
        };
        if let Some(watch) = &watch {
            // aya attaches the cls_bpf download filter from a netlink socket of its own.
            let ids = parts.classifier.program_ids();
            if !ids.is_empty() {
                watch.set_own_programs(ids);
            }
        }
        let literal = cycle.literal_limits();
        let interfaces = names
            .into_iter()
            .map(|name| {
                let mut iface = Interface::new(name);
                iface.policy_loaded(literal);
                iface
            })
            .collect();
        let script_mtimes = watched_files(cycle.engine());
        let events = events::Events::load(
            events::events_path(&config.state_dir),
            config.notify_command.clone(),
            config.month_start_day,
        );
        Ok(Daemon {
            rate: RateSource::new(
                config.rate,
                config.rate_file.clone(),
                options.strict_permissions,
            ),
            connection_rate: RateSource::new(
                config.connection_rate,
                config.connection_rate_file.clone(),
                options.strict_permissions,
            ),
            config,
            options,
            cycle,
            sockets: parts.sockets,
            tc: parts.tc,
            classifier: parts.classifier,
            clock: parts.clock,
            accounting,
            watch,
            interfaces,
            last: None,
            timings: Timings::default(),
            cycles: 0,
            started: now.timestamp(),
            reload_error: None,
            usage_save_error: None,
            last_flush: Instant::now(),
            script_mtimes,
            fast_path_stats: latency::FastPathStats::default(),
            events,
            trim_after_cycle: false,
        })
    }

    pub fn engine(&self) -> &Engine {
        self.cycle.engine()
    }

    /// Why the policy's priorities would have no effect, if they would not (see
    /// [`cycle::capacity_warning`]).
    pub fn capacity_warning(&self) -> Option<String> {
        self.cycle.capacity_warning()
    }

    /// Cycles run so far.
    pub fn cycles(&self) -> u64 {
        self.cycles
    }

    /// One line of each interface's state (`eth0: shaping`), for systemd's status.
    pub fn summary(&self) -> String {
        self.interfaces
            .iter()
            .map(|i| format!("{}: {}", i.name, i.state.keyword()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One cycle at the clock's time: scan → lookup → policy → account → reconcile + apply.
    pub fn tick(&mut self) {
        self.cycles += 1;
        let now = (self.clock)();
        let scanner = &mut self.sockets;
        let mut sockets = match stage("scan", &mut self.timings.scan, || scanner.scan()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("scan failed: {e}; shaping stays as it is");
                return;
            }
        };
        self.classifier.fill_counters(&mut sockets);
        let links = self.link_counters();
        let rates = Rates {
            rate: self.rate.current(),
            connection_rate: self.connection_rate.current(),
        };
        if let Some(watch) = &self.watch {
            for name in watch.take_changed() {
                // Someone else changed the kernel's state: read it instead of trusting the tree
                // last applied, so the reconcile repairs what was changed.
                if let Some(iface) = self.interfaces.iter_mut().find(|i| i.name == name) {
                    iface.forget_installed();
                }
            }
        }
        let closed = self.closed_sockets();
        let outcome = self.cycle.run(
            Sockets::All(sockets),
            Inputs {
                now: now.clone(),
                interface: self.interfaces.first().map(|i| i.name.clone()),
                usage: std::sync::Arc::new(self.accounting.view_at(&now)),
                accounting: Some(&mut self.accounting),
                links: &links,
                closed,
                rates,
            },
            &mut self.timings,
        );
        let mut outcome = outcome;
        self.events
            .raise(std::mem::take(&mut outcome.notices), &now);
        self.last = Some(outcome);
        let mut shape_time = std::time::Duration::ZERO;
        stage("shape", &mut shape_time, || {
            for i in 0..self.interfaces.len() {
                self.shape_interface(i);
            }
        });
        self.timings.shape = shape_time;

        if self.last_flush.elapsed() >= self.config.usage_flush_interval.duration() {
            self.flush(&now);
        }
        if std::mem::take(&mut self.trim_after_cycle) {
            // This cycle forgot a flood's short-lived sockets: hand the freed memory back, so
            // the daemon's RSS returns to what it needs (glibc keeps it otherwise).
            // SAFETY: malloc_trim only releases free heap memory; no pointer is involved.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Whether the classifier reports new sockets, for [`Daemon::fast_path`].
    pub fn has_fast_path(&self) -> bool {
        self.classifier.has_fast_path()
    }

    /// How the owners of new sockets are found when the daemon's `/proc` is not the initial PID
    /// namespace's (`None` there, and without the BPF classifier).
    pub fn own_pid_namespace(&self) -> Option<bpf::OwnPidNamespace> {
        self.classifier.own_pid_namespace()
    }

    /// What the kernel could not report at once (a flood of new sockets), when the BPF
    /// classifier is attached.
    pub fn report_stats(&self) -> Option<crate::classify::ReportStats> {
        self.classifier.report_stats()
    }

    /// Between cycles: waits up to `timeout` for sockets the classifier reports as new and
    /// shapes them at once — lookup (by the creating tgid, no descriptor walk; by the socket in
    /// a PID namespace of the daemon's own, see [`bpf::BpfState::owners_of`]) and policy for
    /// those alone, then plan, apply and map writes — instead of at the next scan. Returns
    /// without waiting when the classifier reports no new sockets (the u32 filters).
    pub fn fast_path(&mut self, timeout: std::time::Duration) {
        if !self.classifier.has_fast_path() {
            return;
        }
        let new = self.classifier.poll_new_sockets(timeout);
        if new.is_empty() {
            return;
        }
        let started = Instant::now();
        let cpu_started = latency::thread_cpu();
        let count = new.len();
        self.trim_after_cycle |= count >= 1024;
        let sockets = self.classifier.owners_of(&new, self.sockets.as_mut());
        let links = Vec::new();
        let mut fast_timings = Timings::default();
        let now = (self.clock)();
        let mut outcome = self.cycle.run(
            Sockets::Created(sockets),
            Inputs {
                now: now.clone(),
                interface: self.interfaces.first().map(|i| i.name.clone()),
                usage: std::sync::Arc::new(self.accounting.view_at(&now)),
                accounting: None,
                links: &links,
                closed: Vec::new(),
                rates: Rates {
                    rate: self.rate.last,
                    connection_rate: self.connection_rate.last,
                },
            },
            // The status shows whole cycles' stage times.
            &mut fast_timings,
        );
        self.classifier.learn_owners(self.cycle.flows());
        if let Some(e) = &outcome.failure {
            tracing::debug!("fast path: policy failed ({e}); the next cycle decides again");
        }
        self.events
            .raise(std::mem::take(&mut outcome.notices), &now);
        for i in 0..self.interfaces.len() {
            self.shape_interface(i);
        }
        // The decisions are in the maps now: each socket waited from its report until here.
        let done = latency::monotonic();
        for socket in &new {
            self.fast_path_stats
                .record(done.saturating_sub(socket.reported_at));
        }
        self.fast_path_stats
            .add_round(count, latency::thread_cpu().saturating_sub(cpu_started));
        tracing::debug!(
            "fast path: {count} new sockets shaped in {:?} ({fast_timings:?})",
            started.elapsed()
        );
    }

    /// The sockets the kernel reported closed since the last cycle, each with the policy class
    /// its last packets went to (upload's, else download's) as the last plan names it. The
    /// u32 path's reports name no class: a known connection is charged under its record's, an
    /// unknown one to nobody (see `FlowTable::close`).
    fn closed_sockets(&mut self) -> Vec<Closed> {
        let closed = self.classifier.take_closed();
        if closed.is_empty() {
            return Vec::new();
        }
        let classes = self
            .interfaces
            .first()
            .map(Interface::classes_by_minor)
            .unwrap_or_default();
        let class_of = |classid: u32| classes.get(&((classid & 0xffff) as u16)).copied();
        closed
            .into_iter()
            .map(|socket| {
                let (up, down) = socket.classes;
                let class = up
                    .and_then(class_of)
                    .or_else(|| down.and_then(class_of))
                    .map(str::to_string);
                Closed { socket, class }
            })
            .collect()
    }

    /// Interface byte counters, noting interfaces that appeared, vanished or were re-created.
    fn link_counters(&mut self) -> Vec<LinkCounters> {
        let mut out = Vec::new();
        for iface in &mut self.interfaces {
            match self.tc.link(&iface.name) {
                Ok(Some(link)) => {
                    let index = link.index;
                    if iface.ifindex != Some(index) {
                        if iface.ifindex.is_none() {
                            tracing::info!("{}: present (index {index}); shaping it", iface.name);
                        } else {
                            tracing::info!(
                                "{}: re-created (index {index}); reinstalling",
                                iface.name
                            );
                        }
                        self.classifier.interface_moved(iface.ifindex, index);
                        iface.ifindex = Some(index);
                        iface.forget_installed();
                    }
                    let (tx_bytes, rx_bytes) = link.ip_bytes();
                    out.push(LinkCounters {
                        interface: iface.name.clone(),
                        tx_bytes,
                        rx_bytes,
                    });
                }
                Ok(None) => {
                    if iface.ifindex.is_some() || iface.state == ShapingState::Starting {
                        tracing::warn!(
                            "{}: interface not present; waiting for it to appear (a ppp link \
                             redialling, a modem plugged in later){}",
                            iface.name,
                            existing_interfaces_hint(&iface.name)
                        );
                    }
                    iface.ifindex = None;
                    iface.forget_installed();
                    iface.state = ShapingState::Waiting;
                }
                Err(e) => tracing::warn!("{}: {e}", iface.name),
            }
        }
        out
    }

    /// Plans interface `i` against what its kernel holds and applies the plan.
    fn shape_interface(&mut self, i: usize) {
        let iface = &mut self.interfaces[i];
        if iface.ifindex.is_none() {
            return;
        }
        let by_priority = self.classifier.by_priority();
        let planned = KernelFacts::read(self.tc.as_mut(), iface, by_priority)
            .map_err(|reason| PlanFailure {
                reason,
                unblock: None,
            })
            .and_then(|facts| self.cycle.tc_plan(iface, facts, self.options.replace));
        self.apply(i, planned);
    }

    /// The one apply step of the cycle and the fast path: applies interface `i`'s plan (or,
    /// where none could be made, the operation that must go regardless), then tells the
    /// classifier what is installed; a failure is counted and makes the next plan read the
    /// kernel.
    fn apply(&mut self, i: usize, planned: Result<Option<TcPlan>, PlanFailure>) {
        let iface = &mut self.interfaces[i];
        let mut plan = match planned {
            Ok(Some(plan)) => plan,
            Ok(None) => {
                iface.operations = 0;
                return;
            }
            Err(PlanFailure { reason: e, unblock }) => {
                if let Some(unblock) = unblock {
                    for (op, e) in self.tc.apply(&unblock) {
                        tracing::error!("{}: {op}: {e}", iface.name);
                    }
                }
                let state = match e {
                    crate::shape::ShapeError::Foreign { .. } => {
                        ShapingState::Refused(e.to_string())
                    }
                    _ => ShapingState::Error(e.to_string()),
                };
                // Once per distinct failure, not every cycle.
                if iface.state != state {
                    tracing::error!("{}: {e}", iface.name);
                }
                iface.state = state;
                return;
            }
        };
        iface.operations = plan.ops.ops.len();
        if self.options.dry_run {
            // One log line per operation: a log line never holds a newline (see
            // `cli::logging`), and each reads on its own in the journal.
            for op in plan.ops.to_string().lines() {
                tracing::info!("{}: would apply: {op}", iface.name);
            }
            iface.installed(plan);
            iface.state = ShapingState::DryRun;
            return;
        }
        let failures = self.tc.apply(&plan.ops);
        if failures.is_empty() {
            let targets = plan.take_targets();
            let leaves = plan.leaf_minors();
            let hold = plan.hold();
            let ingress_added = plan
                .ops
                .ops
                .iter()
                .any(|op| matches!(op, crate::shape::Op::AddIngress { .. }));
            iface.installed(plan);
            iface.state = ShapingState::Shaping;
            let applied = classifier::Applied {
                targets: &targets,
                leaves: &leaves,
                hold,
                ingress_added,
            };
            self.classifier.applied(self.cycle.flows(), applied);
        } else {
            iface.failures += failures.len() as u64;
            for (op, e) in failures.iter().take(3) {
                tracing::warn!("{}: {op}: {e}", iface.name);
            }
            // Read the kernel next cycle rather than trust what was meant to be installed.
            iface.forget_installed();
            iface.state = ShapingState::Failing(failures.len());
        }
    }

    /// Reloads the script if it (or a module it requires) changed on disk.
    pub fn reload_if_changed(&mut self) {
        let changed = self
            .script_mtimes
            .iter()
            .any(|(path, seen)| mtime(path) != *seen);
        if changed {
            tracing::info!("policy script changed on disk; reloading");
            let _ = self.reload();
        }
    }

    /// Checks and swaps in the script from disk; on error the running one stays.
    pub fn reload(&mut self) -> Result<(), PolicyError> {
        if self.cycle.builtin() {
            return Ok(());
        }
        let result = self.cycle.engine_mut().reload();
        // Remember what was on disk either way, so a broken edit is reported once.
        self.script_mtimes = watched_files(self.cycle.engine());
        match &result {
            Ok(()) => {
                tracing::info!("policy reloaded from {}", self.config.script.display());
                let literal = self.cycle.literal_limits();
                for iface in &mut self.interfaces {
                    iface.policy_reloaded(literal);
                }
                if let Some(w) = self.capacity_warning() {
                    tracing::warn!("{w}");
                }
            }
            Err(e) => tracing::error!("reload failed, the previous policy stays in force: {e}"),
        }
        self.reload_error = result.as_ref().err().map(Failure::now);
        result
    }

    /// Writes usage to the state dir.
    pub fn flush(&mut self, now: &jiff::Zoned) {
        self.last_flush = Instant::now();
        let path = usage_path(&self.config);
        let result = self.accounting.save(&path, now);
        if let Err(e) = &result {
            tracing::warn!("cannot save usage to {}: {e}", path.display());
        }
        self.usage_save_error = result
            .err()
            .map(|e| Failure::now(format!("cannot save usage to {}: {e}", path.display())));
    }

    /// Removes everything shaper installed and saves usage.
    pub fn shutdown(&mut self) {
        // Stopped first: the teardown's own deletions need no repair.
        self.watch = None;
        // Detached before the tree goes: packets are unclassified, then unshaped.
        self.classifier = Box::new(classifier::U32Classifier::default());
        self.flush(&(self.clock)());
        if self.options.dry_run {
            return;
        }
        for iface in &self.interfaces {
            match self.tc.installed(&iface.name) {
                Ok(installed) => {
                    for (op, e) in self.tc.apply(&teardown(&iface.name, &installed)) {
                        tracing::warn!("teardown: {op}: {e}");
                    }
                }
                Err(e) => tracing::warn!("teardown of {}: {e}", iface.name),
            }
        }
    }
}

/// The script and its modules, with their modification times: what reload watches.
fn watched_files(engine: &Engine) -> Vec<(PathBuf, Option<SystemTime>)> {
    engine
        .files()
        .into_iter()
        .map(|f| {
            let t = mtime(&f);
            (f, t)
        })
        .collect()
}

#[cfg(test)]
mod tests;

/// Where usage is saved (and where `plan` reads it from).
pub fn usage_path(config: &Config) -> PathBuf {
    config.state_dir.join("usage.ron")
}
