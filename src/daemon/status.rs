//! `shaper status`: what the daemon is doing, built from its last cycle as a read-only report
//! (rendered for people by `cli::status`, printed as is by `--json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::latency::FastPathStatus;
use super::{Daemon, Failure};
use crate::account::{Period, Usage, UsageKey};
use crate::policy::ErrorEntry;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// One word: `starting`, `waiting` (the interface does not exist yet), `shaping` (the
    /// classes are in force), `dry-run`, `refused` (another program's qdisc is in the way),
    /// `error` or `failing` (see [`super::ShapingState`]).
    pub state: String,
    /// Why, for `waiting`, `refused`, `error` and `failing`.
    #[serde(default)]
    pub detail: Option<String>,
    /// Operations the last cycle applied.
    pub operations: usize,
    pub failures: u64,
    /// Classes and filters the last plan could not give a tc handle.
    #[serde(default)]
    pub unplaced: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassStatus {
    pub name: String,
    pub prio: u8,
    pub ceil: String,
    /// Whether the class is installed on every interface, so its ceiling applies; `false`
    /// while an interface is waiting, refused or failing.
    #[serde(default)]
    pub in_force: bool,
    /// The class drops its connections' packets (`block = true`).
    #[serde(default)]
    pub blocked: bool,
    pub each: String,
    pub connections: u64,
    pub rate_up: f64,
    pub rate_down: f64,
    pub today: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: u32,
    pub name: String,
    pub user: Option<String>,
    pub connections: u64,
    pub rate_up: f64,
    pub rate_down: f64,
    pub today: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub connection: String,
    pub process: Option<String>,
    pub class: String,
    pub limit: Option<String>,
    pub rate_up: f64,
    pub rate_down: f64,
}

/// Everything `shaper status` shows; `--json` prints it as is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub policy: String,
    pub started: String,
    pub cycles: u64,
    pub dry_run: bool,
    /// How connections reach their class: `"bpf"` (the first-packet classifier) or `"u32"`.
    #[serde(default)]
    pub classifier: String,
    /// What the first-packet fast path costs (`None` with the u32 classifier, which has none).
    #[serde(default)]
    pub fast_path: Option<FastPathStatus>,
    pub rate: Option<String>,
    pub connection_rate: Option<String>,
    pub interfaces: Vec<InterfaceStatus>,
    /// Milliseconds per stage in the last cycle.
    pub stages_ms: BTreeMap<String, f64>,
    /// The link's usage in the current hour, day, week and month.
    pub usage: BTreeMap<Period, Usage>,
    pub classes: Vec<ClassStatus>,
    pub processes: Vec<ProcessStatus>,
    pub connections: Option<Vec<ConnectionStatus>>,
    pub errors: Vec<ErrorEntry>,
    /// Configuration that makes the policy do less than it says (priorities without a link
    /// capacity).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The last failed reload (cleared by a successful one): the old policy is still running.
    #[serde(default)]
    pub reload_error: Option<Failure>,
    /// The last failed usage save (cleared by a successful one).
    #[serde(default)]
    pub usage_save_error: Option<Failure>,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl StatusReport {
    pub fn of(daemon: &Daemon, all: bool) -> StatusReport {
        let t = &daemon.timings;
        let stages_ms = [
            ("scan", t.scan),
            ("lookup", t.lookup),
            ("policy", t.policy),
            ("account", t.account),
            ("shape", t.shape),
            ("total", t.total()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ms(v)))
        .collect();
        let acct = &daemon.accounting;
        let mut classes = Vec::new();
        let mut processes: BTreeMap<u32, ProcessStatus> = BTreeMap::new();
        let mut connections = Vec::new();
        let in_force = daemon.interfaces.iter().all(|i| i.state.in_force());
        if let Some(outcome) = &daemon.last {
            for c in outcome.classes.classes.values() {
                let figures = acct.classes().get(&*c.name).copied().unwrap_or_default();
                classes.push(ClassStatus {
                    name: c.name.to_string(),
                    prio: c.prio,
                    ceil: c.ceil.to_string(),
                    in_force,
                    blocked: c.block,
                    each: c.each.as_str().to_string(),
                    connections: figures.connections,
                    rate_up: figures.rate_up,
                    rate_down: figures.rate_down,
                    today: acct.usage(Period::Day, &UsageKey::Class(c.name.to_string())),
                });
            }
            for flow in daemon.cycle.flows().iter() {
                let (c, d, s) = (flow.connection, flow.decision, flow.stats);
                if let Some(p) = flow.process {
                    let entry = processes.entry(p.pid).or_insert_with(|| ProcessStatus {
                        pid: p.pid,
                        name: p.name.clone(),
                        user: p.user.clone(),
                        connections: 0,
                        rate_up: 0.0,
                        rate_down: 0.0,
                        today: acct.usage(Period::Day, &UsageKey::Process(p.name.clone())),
                    });
                    entry.connections += 1;
                    entry.rate_up += s.rate_up;
                    entry.rate_down += s.rate_down;
                }
                if all {
                    connections.push(ConnectionStatus {
                        connection: c.socket.to_string(),
                        process: flow.process.map(|p| format!("{} ({})", p.name, p.pid)),
                        class: d.class.to_string(),
                        limit: (d.limit != Default::default()).then(|| d.limit.to_string()),
                        rate_up: s.rate_up,
                        rate_down: s.rate_down,
                    });
                }
            }
        }
        let mut processes: Vec<ProcessStatus> = processes.into_values().collect();
        processes.sort_by(|a, b| (b.rate_up + b.rate_down).total_cmp(&(a.rate_up + a.rate_down)));
        StatusReport {
            pid: std::process::id(),
            policy: daemon.engine().script().path.display().to_string(),
            started: daemon.started.to_string(),
            cycles: daemon.cycles,
            dry_run: daemon.options.dry_run,
            classifier: daemon.classifier().to_string(),
            fast_path: daemon
                .has_fast_path()
                .then(|| daemon.fast_path_stats.status()),
            rate: daemon.rate.last.map(|r| r.to_string()),
            connection_rate: daemon.connection_rate.last.map(|r| r.to_string()),
            interfaces: daemon
                .interfaces
                .iter()
                .map(|i| InterfaceStatus {
                    name: i.name.clone(),
                    state: i.state.keyword().to_string(),
                    detail: i.state.detail(),
                    operations: i.operations,
                    failures: i.failures,
                    unplaced: i.unplaced,
                })
                .collect(),
            stages_ms,
            usage: Period::ALL
                .into_iter()
                .map(|p| (p, acct.usage(p, &UsageKey::Link)))
                .collect(),
            classes,
            processes,
            connections: all.then_some(connections),
            errors: daemon.engine().errors().entries().to_vec(),
            warnings: daemon.cycle.capacity_warning().into_iter().collect(),
            reload_error: daemon.reload_error.clone(),
            usage_save_error: daemon.usage_save_error.clone(),
        }
    }
}
