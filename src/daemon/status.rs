//! `shaper status`: what the daemon is doing, built from its last cycle as a read-only report
//! (rendered for people by `cli::status`, printed as is by `--json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::latency::FastPathStatus;
use super::{Daemon, Failure};
use crate::account::{Period, Usage, UsageKey};
use crate::policy::ErrorEntry;
use crate::shape::model::{ClassId, MAJOR};
use crate::units::{Rate, RatePair, Size};

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

/// Bytes up and down as integers (`--json` gives numbers, not `"1.2MB"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    pub up: u64,
    pub down: u64,
}

impl From<Usage> for Bytes {
    fn from(u: Usage) -> Bytes {
        Bytes {
            up: u.up.bytes(),
            down: u.down.bytes(),
        }
    }
}

impl Bytes {
    /// `1.2MB/3.4GB`, for people.
    pub fn human(&self) -> String {
        format!(
            "{}/{}",
            Size::from_bytes(self.up).human(),
            Size::from_bytes(self.down).human()
        )
    }
}

/// A limit per direction in bits/s; `null` (`None`) is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub up: Option<u64>,
    pub down: Option<u64>,
}

impl From<RatePair> for Limit {
    fn from(p: RatePair) -> Limit {
        Limit {
            up: p.up.map(Rate::bits_per_sec),
            down: p.down.map(Rate::bits_per_sec),
        }
    }
}

impl Limit {
    pub fn rate_pair(&self) -> RatePair {
        RatePair {
            up: self.up.map(Rate::from_bits_per_sec),
            down: self.down.map(Rate::from_bits_per_sec),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.up.is_none() && self.down.is_none()
    }

    /// The tighter of two limits, per direction.
    fn tighter(self, other: Limit) -> Limit {
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Limit {
            up: min(self.up, other.up),
            down: min(self.down, other.down),
        }
    }

    /// The looser of two limits, per direction (unlimited wins).
    fn looser(self, other: Limit) -> Limit {
        let max = |a: Option<u64>, b: Option<u64>| Some(a?.max(b?));
        Limit {
            up: max(self.up, other.up),
            down: max(self.down, other.down),
        }
    }
}

/// A rate in bits/s as a whole number (the accounting's figures are smoothed floats).
fn bits(rate: f64) -> u64 {
    rate.max(0.0).round() as u64
}

/// A tc class id as tc prints it (`5a:12`).
fn handle(minor: u16) -> String {
    ClassId(MAJOR, minor).to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassStatus {
    pub name: String,
    /// The class's tc handle (`5a:12`) on the interface and its IFB; `None` when it got none.
    #[serde(default)]
    pub handle: Option<String>,
    /// The tc handle of the class's shared leaf (connections without a leaf of their own).
    #[serde(default)]
    pub shared_handle: Option<String>,
    pub prio: u8,
    /// Guaranteed rate (HTB `rate`), bits/s; `null`: a small share of the link.
    #[serde(default)]
    pub rate: Limit,
    /// Maximum rate (HTB `ceil`), bits/s; `null`: the link.
    pub ceil: Limit,
    /// Whether the class is installed on every interface, so its ceiling applies; `false`
    /// while an interface is waiting, refused or failing.
    #[serde(default)]
    pub in_force: bool,
    /// The class drops its connections' packets (`block = true`).
    #[serde(default)]
    pub blocked: bool,
    pub each: String,
    pub connections: u64,
    /// Bits/s.
    pub rate_up: u64,
    pub rate_down: u64,
    pub today: Bytes,
    #[serde(default)]
    pub month: Bytes,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: u32,
    pub name: String,
    pub user: Option<String>,
    /// The classes its connections are in.
    #[serde(default)]
    pub classes: Vec<String>,
    /// The loosest ceiling any of its connections has (its own limit, else its class's
    /// `ceil`), bits/s; `null`: unlimited.
    #[serde(default)]
    pub limit: Limit,
    /// Its own leaf's tc handle, in an `each = "process"` class.
    #[serde(default)]
    pub handle: Option<String>,
    pub connections: u64,
    /// Bits/s.
    pub rate_up: u64,
    pub rate_down: u64,
    pub today: Bytes,
    #[serde(default)]
    pub month: Bytes,
}

/// Processes added up by user (the user name, or the uid when it has none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserStatus {
    pub name: String,
    pub processes: u64,
    pub connections: u64,
    /// Bits/s.
    pub rate_up: u64,
    pub rate_down: u64,
    pub today: Bytes,
    pub month: Bytes,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub connection: String,
    /// The name last looked up for its remote address ([`crate::names`]), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
    pub process: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    pub class: String,
    /// The connection's own limit, bits/s (`null` when the policy gave none).
    pub limit: Option<Limit>,
    /// The ceiling in force: its own limit or its class's `ceil`, whichever is tighter.
    #[serde(default)]
    pub ceil: Limit,
    /// The tc handle of the leaf its packets go to.
    #[serde(default)]
    pub handle: Option<String>,
    /// Bits/s.
    pub rate_up: u64,
    pub rate_down: u64,
}

impl ConnectionStatus {
    /// The connection as people read it: with its remote's name when one is known.
    pub fn described(&self) -> String {
        match &self.remote_host {
            Some(host) => format!("{} ({host})", self.connection),
            None => self.connection.clone(),
        }
    }
}

/// The link as a whole: its configured capacity and what all connections move.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkStatus {
    /// `uplink`/`downlink`, bits/s (`null` when not configured).
    pub capacity: Limit,
    /// Bits/s over all connections.
    pub rate_up: u64,
    pub rate_down: u64,
}

/// Everything `shaper status` shows; `--json` prints it as is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub policy: String,
    pub started: String,
    pub cycles: u64,
    /// The cycle interval, milliseconds (how often the figures change).
    #[serde(default)]
    pub interval_ms: u64,
    pub dry_run: bool,
    /// How connections reach their class: `"bpf"` (the first-packet classifier) or `"u32"`.
    #[serde(default)]
    pub classifier: String,
    /// What the first-packet fast path costs (`None` with the u32 classifier, which has none).
    #[serde(default)]
    pub fast_path: Option<FastPathStatus>,
    /// Set when the daemon's `/proc` is not the initial PID namespace's (a container): how the
    /// owners of new sockets were found, since the kernel's pids are not the daemon's.
    #[serde(default)]
    pub own_pid_namespace: Option<super::bpf::OwnPidNamespace>,
    /// `--rate`/`rate` in force, bits/s (`None`: not set).
    pub rate: Option<Limit>,
    /// `--connection-rate`/`connection_rate` in force, bits/s (`None`: not set).
    pub connection_rate: Option<Limit>,
    #[serde(default)]
    pub link: LinkStatus,
    pub interfaces: Vec<InterfaceStatus>,
    /// Milliseconds per stage in the last cycle.
    pub stages_ms: BTreeMap<String, f64>,
    /// The link's usage in the current hour, day, week and month, bytes.
    pub usage: BTreeMap<Period, Bytes>,
    /// Of that, what no process was charged for (ICMP, ARP, retransmitted payload, sockets no
    /// owner was found for), where there is any.
    #[serde(default)]
    pub unattributed: BTreeMap<Period, Bytes>,
    pub classes: Vec<ClassStatus>,
    pub processes: Vec<ProcessStatus>,
    #[serde(default)]
    pub users: Vec<UserStatus>,
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
    /// The last events the policy raised (`shaper.notify`), oldest first.
    #[serde(default)]
    pub events: Vec<super::events::Event>,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl StatusReport {
    pub fn of(daemon: &Daemon, all: bool) -> StatusReport {
        let stages_ms = daemon
            .timings
            .stages()
            .into_iter()
            .map(|(k, v)| (k.to_string(), ms(v)))
            .collect();
        let acct = &daemon.accounting;
        let usage = |key: UsageKey| {
            (
                Bytes::from(acct.usage(Period::Day, &key)),
                Bytes::from(acct.usage(Period::Month, &key)),
            )
        };
        // Handles as the first interface's plan gave them (each interface allocates its own).
        let handles = daemon.interfaces.first().map(|i| i.handles());
        let mut classes = Vec::new();
        let mut processes: BTreeMap<u32, ProcessStatus> = BTreeMap::new();
        let mut users: BTreeMap<String, UserStatus> = BTreeMap::new();
        let mut connections = Vec::new();
        let in_force = daemon.interfaces.iter().all(|i| i.state.in_force());
        let mut link = LinkStatus {
            capacity: Limit {
                up: daemon.cycle.capacity().up.map(Rate::bits_per_sec),
                down: daemon.cycle.capacity().down.map(Rate::bits_per_sec),
            },
            ..LinkStatus::default()
        };
        if let Some(outcome) = &daemon.last {
            for c in outcome.classes.classes.values() {
                let figures = acct.classes().get(&*c.name).copied().unwrap_or_default();
                let minors = handles.and_then(|h| h.class_minors(&c.name));
                let (today, month) = usage(UsageKey::Class(c.name.to_string()));
                classes.push(ClassStatus {
                    name: c.name.to_string(),
                    handle: minors.map(|m| handle(m.0)),
                    shared_handle: minors.map(|m| handle(m.1)),
                    prio: c.prio,
                    rate: c.rate.into(),
                    ceil: c.ceil.into(),
                    in_force,
                    blocked: c.block,
                    each: c.each.as_str().to_string(),
                    connections: figures.connections,
                    rate_up: bits(figures.rate_up),
                    rate_down: bits(figures.rate_down),
                    today,
                    month,
                });
            }
            for flow in daemon.cycle.flows().iter() {
                let (c, d, s) = (flow.connection, flow.decision, flow.stats);
                let own = (d.limit != RatePair::default()).then(|| Limit::from(d.limit));
                let class_ceil = outcome
                    .classes
                    .get(&d.class)
                    .map_or_else(Limit::default, |def| def.ceil.into());
                let ceil = own.map_or(class_ceil, |own| own.tighter(class_ceil));
                link.rate_up += bits(s.rate_up);
                link.rate_down += bits(s.rate_down);
                if let Some(p) = flow.process {
                    let entry = processes.entry(p.pid).or_insert_with(|| {
                        let (today, month) = usage(UsageKey::Process(p.name.to_string()));
                        ProcessStatus {
                            pid: p.pid,
                            name: p.name.to_string(),
                            user: p.user.clone(),
                            classes: Vec::new(),
                            limit: ceil,
                            handle: None,
                            connections: 0,
                            rate_up: 0,
                            rate_down: 0,
                            today,
                            month,
                        }
                    });
                    if !entry.classes.iter().any(|k| **k == *d.class) {
                        entry.classes.push(d.class.to_string());
                    }
                    entry.limit = entry.limit.looser(ceil);
                    entry.handle = entry.handle.take().or_else(|| {
                        handles
                            .and_then(|h| h.process_minor(&d.class, p.pid))
                            .map(handle)
                    });
                    entry.connections += 1;
                    entry.rate_up += bits(s.rate_up);
                    entry.rate_down += bits(s.rate_down);
                    let name = p.user.clone().unwrap_or_else(|| p.uid.to_string());
                    let user = users.entry(name.clone()).or_insert_with(|| {
                        let (today, month) = usage(UsageKey::User(name.clone()));
                        UserStatus {
                            name,
                            processes: 0,
                            connections: 0,
                            rate_up: 0,
                            rate_down: 0,
                            today,
                            month,
                        }
                    });
                    user.processes += u64::from(entry.connections == 1);
                    user.connections += 1;
                    user.rate_up += bits(s.rate_up);
                    user.rate_down += bits(s.rate_down);
                }
                if all {
                    connections.push(ConnectionStatus {
                        connection: c.socket.to_string(),
                        remote_host: c.remote_host.clone(),
                        process: flow.process.map(|p| format!("{} ({})", p.name, p.pid)),
                        pid: flow.process.map(|p| p.pid),
                        user: flow.process.and_then(|p| p.user.clone()),
                        class: d.class.to_string(),
                        limit: own,
                        ceil,
                        handle: handles
                            .and_then(|h| {
                                h.leaf_minor(&d.class, flow.process.map(|p| p.pid), c.socket.key())
                            })
                            .map(handle),
                        rate_up: bits(s.rate_up),
                        rate_down: bits(s.rate_down),
                    });
                }
            }
        }
        let mut processes: Vec<ProcessStatus> = processes.into_values().collect();
        processes.sort_by_key(|p| std::cmp::Reverse(p.rate_up + p.rate_down));
        StatusReport {
            pid: std::process::id(),
            policy: daemon.engine().script().path.display().to_string(),
            started: daemon.started.to_string(),
            cycles: daemon.cycles,
            interval_ms: daemon.config.interval.duration().as_millis() as u64,
            dry_run: daemon.options.dry_run,
            classifier: daemon.classifier().to_string(),
            fast_path: daemon
                .report_stats()
                .map(|reports| daemon.fast_path_stats.status(reports)),
            own_pid_namespace: daemon.own_pid_namespace(),
            rate: daemon.rate.last.map(Limit::from),
            connection_rate: daemon.connection_rate.last.map(Limit::from),
            link,
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
                .map(|p| (p, acct.usage(p, &UsageKey::Link).into()))
                .collect(),
            unattributed: Period::ALL
                .into_iter()
                .map(|p| (p, acct.usage(p, &UsageKey::Unattributed)))
                .filter(|(_, u)| u.total() > 0)
                .map(|(p, u)| (p, u.into()))
                .collect(),
            classes,
            processes,
            users: users.into_values().collect(),
            connections: all.then_some(connections),
            errors: daemon.engine().errors().entries().to_vec(),
            warnings: daemon.cycle.capacity_warning().into_iter().collect(),
            reload_error: daemon.reload_error.clone(),
            usage_save_error: daemon.usage_save_error.clone(),
            events: daemon.events.recent(),
        }
    }
}
