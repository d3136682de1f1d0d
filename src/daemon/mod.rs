//! The daemon: the cycle, run once per interval by [`Daemon::tick`], which reads top to bottom
//! as the pipeline — scan, lookup, policy, account, reconcile + apply — and the service around
//! it ([`service`]: pid file, control socket, signals, systemd notifications).

pub mod iflock;
pub mod service;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustc_hash::FxHashMap;

use crate::account::{Accounting, LinkCounters};
use crate::config::{Config, RateFile};
use crate::policy::{
    ConnStats, CycleInput, CycleOutcome, Decision, Engine, EngineOptions, PolicyError, Script,
    SocketKey, socket_key,
};
use crate::process::{ProcessTable, Snapshot};
use crate::scan::{self, Backend, SocketSource};
use crate::shape::netlink::NetlinkBackend;
use crate::shape::watch::Watch;
use crate::shape::{
    Capacity, Desired, Handles, Installed, PlanInput, Redirect, Slot, TcBackend, plan, reconcile,
    teardown,
};
use crate::units::{Rate, RatePair};

/// The policy used without `--script`: every connection in `default`; the limits come from
/// `--rate`/`--connection-rate` (and their files), which the daemon applies as defaults.
pub const BUILTIN_POLICY: &str = include_str!("../../lua/builtin-policy.lua");

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
    /// Use the built-in policy instead of `config.script`.
    pub builtin_policy: bool,
    /// Log the plan, touch nothing.
    pub dry_run: bool,
    /// Replace a root or ingress qdisc shaper did not install.
    pub replace: bool,
    /// Refuse policy files root does not own or others can write (see
    /// [`crate::policy::check_permissions`]).
    pub strict_permissions: bool,
}

/// One shaped interface's state between cycles.
#[derive(Debug)]
pub struct Interface {
    pub name: String,
    ifindex: Option<u32>,
    handles: Handles,
    /// What the last successful apply left installed; `None` means "read the kernel".
    applied: Option<Desired>,
    /// A hash of what that plan was made from: when the next cycle's inputs hash the same, the
    /// plan would be the same, so planning is skipped.
    applied_from: Option<u64>,
    pub state: String,
    pub operations: usize,
    pub failures: u64,
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

/// Stage durations of the last cycle.
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
}

/// Everything a running shaper holds.
pub struct Daemon {
    pub config: Config,
    pub options: RunOptions,
    engine: Engine,
    scanner: Box<dyn SocketSource>,
    processes: ProcessTable,
    pub accounting: Accounting,
    conn_stats: FxHashMap<SocketKey, ConnStats>,
    backend: NetlinkBackend,
    /// Changes other programs make to the interfaces (none in a dry run, which changes nothing).
    watch: Option<Watch>,
    pub interfaces: Vec<Interface>,
    pub rate: RateSource,
    pub connection_rate: RateSource,
    /// The last cycle, for `status`.
    pub last: Option<(Arc<Snapshot>, CycleOutcome, Vec<ConnStats>)>,
    pub timings: Timings,
    pub cycles: u64,
    pub started: jiff::Timestamp,
    /// The last reload's error (with file:line), cleared by a successful reload.
    pub reload_error: Option<Failure>,
    /// The last usage save's error, cleared by a successful save.
    pub usage_save_error: Option<Failure>,
    last_flush: Instant,
    script_mtimes: Vec<(PathBuf, Option<SystemTime>)>,
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Daemon {
    /// Loads the policy (failing on a broken script), the saved usage, and opens the kernel
    /// interfaces, in the calling thread's network namespace.
    pub fn new(config: Config, options: RunOptions) -> anyhow::Result<Daemon> {
        let engine = if options.builtin_policy {
            Engine::from_script(
                Script {
                    path: PathBuf::from("<built-in policy>"),
                    source: BUILTIN_POLICY.to_string(),
                },
                EngineOptions::default(),
            )?
        } else {
            Engine::load(
                &config.script,
                EngineOptions {
                    strict_permissions: options.strict_permissions,
                    ..EngineOptions::default()
                },
            )?
        };
        let now = jiff::Zoned::now();
        let accounting = Accounting::load(&usage_path(&config), &now, config.month_start_day);
        let backend = NetlinkBackend::new()?;
        let names = config.shaped_interfaces()?;
        let watch = if options.dry_run {
            None
        } else {
            Watch::start(names.clone(), backend.port())
                .map_err(|e| {
                    tracing::warn!(
                        "cannot listen for netlink notifications ({e}); changes made by other \
                         programs are noticed only when an operation fails"
                    )
                })
                .ok()
        };
        let interfaces = names
            .into_iter()
            .map(|name| Interface {
                name,
                ifindex: None,
                handles: Handles::default(),
                applied: None,
                applied_from: None,
                state: "starting".into(),
                operations: 0,
                failures: 0,
            })
            .collect();
        let script_mtimes = engine
            .files()
            .into_iter()
            .map(|f| (f.clone(), mtime(&f)))
            .collect();
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
            engine,
            scanner: scan::open(Backend::Auto)?,
            processes: ProcessTable::new(),
            accounting,
            conn_stats: FxHashMap::default(),
            backend,
            watch,
            interfaces,
            last: None,
            timings: Timings::default(),
            cycles: 0,
            started: jiff::Timestamp::now(),
            reload_error: None,
            usage_save_error: None,
            last_flush: Instant::now(),
            script_mtimes,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// One cycle: scan → lookup → policy → account → reconcile + apply.
    pub fn tick(&mut self, now: jiff::Zoned) {
        self.cycles += 1;
        let t = Instant::now();
        let sockets = match self.scanner.scan() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("scan failed: {e}; shaping stays as it is");
                return;
            }
        };
        self.timings.scan = t.elapsed();

        let t = Instant::now();
        self.processes.update(&sockets);
        let snapshot = Arc::new(self.processes.snapshot(sockets));
        self.timings.lookup = t.elapsed();

        let t = Instant::now();
        let (rate, connection_rate) = (self.rate.current(), self.connection_rate.current());
        let stats: Vec<ConnStats> = snapshot
            .connections
            .iter()
            .map(|c| {
                self.conn_stats
                    .get(&socket_key(&c.socket))
                    .copied()
                    .unwrap_or_default()
            })
            .collect();
        let mut outcome = self.engine.run(CycleInput {
            snapshot: snapshot.clone(),
            stats,
            now: now.clone(),
            interface: self.interfaces.first().map(|i| i.name.clone()),
            usage: Arc::new(self.accounting.view()),
            rate,
            connection_rate,
        });
        apply_connection_rate(&mut outcome.decisions, connection_rate);
        self.timings.policy = t.elapsed();

        let t = Instant::now();
        let links = self.link_counters();
        let stats = self.accounting.observe(
            &now,
            &snapshot,
            &outcome.classes,
            &outcome.decisions,
            &links,
        );
        self.conn_stats = snapshot
            .connections
            .iter()
            .zip(&stats)
            .map(|(c, s)| (socket_key(&c.socket), *s))
            .collect();
        self.timings.account = t.elapsed();

        let t = Instant::now();
        let capacity = Capacity {
            up: min_rate(self.config.uplink, rate.and_then(|r| r.up)),
            down: min_rate(self.config.downlink, rate.and_then(|r| r.down)),
        };
        if let Some(watch) = &self.watch {
            for name in watch.take_changed() {
                // Someone else changed the kernel's state: read it instead of trusting the tree
                // last applied, so the reconcile repairs what was changed.
                if let Some(iface) = self.interfaces.iter_mut().find(|i| i.name == name) {
                    iface.applied = None;
                }
            }
        }
        for i in 0..self.interfaces.len() {
            self.shape_interface(i, &snapshot, &outcome, capacity);
        }
        self.timings.shape = t.elapsed();
        self.last = Some((snapshot, outcome, stats));

        if self.last_flush.elapsed() >= self.config.usage_flush_interval.duration() {
            self.flush(&now);
        }
    }

    /// Interface byte counters, noting interfaces that appeared, vanished or were re-created.
    fn link_counters(&mut self) -> Vec<LinkCounters> {
        let mut out = Vec::new();
        for iface in &mut self.interfaces {
            match self.backend.link_counters(&iface.name) {
                Ok(Some((index, tx, rx))) => {
                    if iface.ifindex != Some(index) {
                        if iface.ifindex.is_none() {
                            tracing::info!("{}: present (index {index}); shaping it", iface.name);
                        } else {
                            tracing::info!(
                                "{}: re-created (index {index}); reinstalling",
                                iface.name
                            );
                        }
                        iface.ifindex = Some(index);
                        iface.applied = None;
                    }
                    out.push(LinkCounters {
                        interface: iface.name.clone(),
                        tx_bytes: tx,
                        rx_bytes: rx,
                    });
                }
                Ok(None) => {
                    if iface.ifindex.is_some() || iface.state == "starting" {
                        tracing::warn!(
                            "{}: interface not present; waiting for it to appear",
                            iface.name
                        );
                    }
                    iface.ifindex = None;
                    iface.applied = None;
                    iface.state = "waiting for the interface".into();
                }
                Err(e) => tracing::warn!("{}: {e}", iface.name),
            }
        }
        out
    }

    fn shape_interface(
        &mut self,
        i: usize,
        snapshot: &Snapshot,
        outcome: &CycleOutcome,
        capacity: Capacity,
    ) {
        let features = self.backend.features();
        let iface = &mut self.interfaces[i];
        if iface.ifindex.is_none() {
            return;
        }

        let inputs = plan_inputs_hash(snapshot, outcome, capacity, features);
        if iface.applied.is_some() && iface.applied_from == Some(inputs) {
            iface.operations = 0;
            return;
        }
        let desired = plan(
            &PlanInput {
                classes: &outcome.classes,
                connections: &snapshot.connections,
                decisions: &outcome.decisions,
                capacity,
                features,
            },
            &mut iface.handles,
        );
        // The tree last applied is moved into the comparison, not copied: with a leaf per
        // connection it is the daemon's largest structure.
        let installed = match iface.applied.take() {
            Some(applied) => Installed {
                upload: Slot::Ours(applied.upload),
                ingress: Slot::Ours(Redirect::ToIfb),
                download: Some(Slot::Ours(applied.download)),
            },
            None => match self.backend.installed(&iface.name) {
                Ok(i) => i,
                Err(e) => {
                    iface.state = format!("error: {e}");
                    return;
                }
            },
        };
        let ops = match reconcile(&iface.name, &desired, &installed, self.options.replace) {
            Ok(ops) => ops,
            Err(e) => {
                if iface.state != format!("refused: {e}") {
                    tracing::error!("{e}");
                }
                iface.state = format!("refused: {e}");
                return;
            }
        };
        iface.operations = ops.ops.len();
        if self.options.dry_run {
            if !ops.is_empty() {
                tracing::info!("{}: would apply:\n{ops}", iface.name);
            }
            iface.applied = Some(desired);
            iface.applied_from = Some(inputs);
            iface.state = "dry run".into();
            return;
        }
        let failures = self.backend.apply(&ops);
        if failures.is_empty() {
            iface.applied = Some(desired);
            iface.applied_from = Some(inputs);
            iface.state = "shaping".into();
        } else {
            iface.failures += failures.len() as u64;
            for (op, e) in failures.iter().take(3) {
                tracing::warn!("{}: {op}: {e}", iface.name);
            }
            // Read the kernel next cycle rather than trust what was meant to be installed.
            iface.applied = None;
            iface.state = format!("{} operations failed", failures.len());
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
        if self.options.builtin_policy {
            return Ok(());
        }
        let result = self.engine.reload();
        // Remember what was on disk either way, so a broken edit is reported once.
        self.script_mtimes = self
            .engine
            .files()
            .into_iter()
            .map(|f| (f.clone(), mtime(&f)))
            .collect();
        match &result {
            Ok(()) => tracing::info!("policy reloaded from {}", self.config.script.display()),
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
        self.flush(&jiff::Zoned::now());
        if self.options.dry_run {
            return;
        }
        for iface in &self.interfaces {
            match self.backend.installed(&iface.name) {
                Ok(installed) => {
                    for (op, e) in self.backend.apply(&teardown(&iface.name, &installed)) {
                        tracing::warn!("teardown: {op}: {e}");
                    }
                }
                Err(e) => tracing::warn!("teardown of {}: {e}", iface.name),
            }
        }
    }
}

/// Everything the planner reads, hashed: the classes, each connection's identity, owner and
/// decision, the capacity and the kernel features.
fn plan_inputs_hash(
    snapshot: &Snapshot,
    outcome: &CycleOutcome,
    capacity: Capacity,
    features: crate::shape::Features,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    outcome.classes.hash(&mut h);
    capacity.hash(&mut h);
    features.hash(&mut h);
    for (c, d) in snapshot.connections.iter().zip(&outcome.decisions) {
        socket_key(&c.socket).hash(&mut h);
        c.owner.as_ref().map(|o| o.pid).hash(&mut h);
        d.hash(&mut h);
    }
    h.finish()
}

fn usage_path(config: &Config) -> PathBuf {
    config.state_dir.join("usage.ron")
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
