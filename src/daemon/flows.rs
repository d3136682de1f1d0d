//! The flow table: one record per live connection, keyed by the scan's identity
//! ([`Socket::key`]), holding what each stage knows about it — scan and lookup the socket and its
//! owner, policy the decision, account the counters and rates. No stage keeps a map of
//! connections of its own; each reads the table and the cycle writes each stage's answer back.
//!
//! The records are stored as parallel columns (the connections in a [`Snapshot`], shared with
//! the policy thread; decisions; accounting tracks), so the planner and the policy read slices
//! without copying.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::account::{Charge, ConnStats, ConnTrack, Observed, is_local};
use crate::classify::ClosedSocket;
use crate::policy::Decision;
use crate::process::{Connection, Process, Snapshot};
use crate::scan::SocketKey;

/// The live connections and what is known about each.
#[derive(Debug, Default)]
pub struct FlowTable {
    /// Connections (socket + owner) and their processes.
    snapshot: Arc<Snapshot>,
    /// Parallel to `snapshot.connections`.
    decisions: Vec<Decision>,
    /// Parallel to `snapshot.connections`; `None` until accounting first saw the connection.
    tracks: Vec<Option<ConnTrack>>,
    index: FxHashMap<SocketKey, usize>,
    /// Records the last whole cycles dropped (their sockets were not in the scan), by cookie,
    /// kept for [`GONE_CYCLES`] cycles: a close report read after the scan that no longer saw
    /// its socket still finds who it belonged to and what was counted of it.
    gone: FxHashMap<u64, Gone>,
    /// User names by uid, for closed sockets of owners the table never saw.
    users: FxHashMap<u32, Option<String>>,
}

/// A process's name and user as usage keys name them.
fn who(process: Option<&Process>) -> (Option<String>, Option<String>) {
    (
        process.map(|p| p.name.to_string()),
        process.map(|p| p.user.clone().unwrap_or_else(|| p.uid.to_string())),
    )
}

/// Whole cycles a dropped record waits for its close report.
const GONE_CYCLES: u8 = 2;

/// A record a whole cycle dropped, as a close report needs it.
#[derive(Debug)]
struct Gone {
    process: Option<String>,
    user: Option<String>,
    class: String,
    track: Option<ConnTrack>,
    /// Over loopback: its close charges nothing, as its scans did not.
    local: bool,
    /// Whole cycles since it was dropped.
    age: u8,
}

/// A closed socket, with the class its last packets went to as the last plan names it.
#[derive(Debug, Clone)]
pub struct Closed {
    pub socket: ClosedSocket,
    pub class: Option<String>,
}

/// One record, as read.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub connection: &'a Connection,
    pub process: Option<&'a Process>,
    pub decision: &'a Decision,
    pub stats: ConnStats,
}

impl FlowTable {
    pub fn len(&self) -> usize {
        self.decisions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }

    pub fn connections(&self) -> &[Connection] {
        &self.snapshot.connections
    }

    /// Parallel to [`FlowTable::connections`].
    pub fn decisions(&self) -> &[Decision] {
        &self.decisions
    }

    pub fn get(&self, key: SocketKey) -> Option<Flow<'_>> {
        self.index.get(&key).map(|&i| self.flow(i))
    }

    pub fn iter(&self) -> impl Iterator<Item = Flow<'_>> {
        (0..self.len()).map(|i| self.flow(i))
    }

    fn flow(&self, i: usize) -> Flow<'_> {
        let connection = &self.snapshot.connections[i];
        Flow {
            connection,
            process: self.snapshot.owner_process(connection),
            decision: &self.decisions[i],
            stats: self.tracks[i]
                .as_ref()
                .map(ConnTrack::stats)
                .unwrap_or_default(),
        }
    }

    /// What the table knows of `snapshot`'s connections, for the policy: each one's earlier
    /// decision (`None` for a new connection) and its figures.
    pub fn known(&self, snapshot: &Snapshot) -> (Vec<Option<Decision>>, Vec<ConnStats>) {
        snapshot
            .connections
            .iter()
            .map(|c| match self.get(c.socket.key()) {
                Some(f) => (Some(f.decision.clone()), f.stats),
                None => (None, ConnStats::default()),
            })
            .unzip()
    }

    /// A whole cycle's answer: `snapshot` is every live connection, `decisions` parallel to it.
    /// Connections not in it are gone; the others keep their accounting.
    pub fn replace(&mut self, snapshot: Arc<Snapshot>, decisions: Vec<Decision>) {
        self.gone.retain(|_, g| {
            g.age += 1;
            g.age < GONE_CYCLES
        });
        let index: FxHashMap<SocketKey, usize> = snapshot
            .connections
            .iter()
            .enumerate()
            .map(|(i, c)| (c.socket.key(), i))
            .collect();
        // A connection with a cookie is keyed by it: one missing from the new index is gone.
        for (i, c) in self.snapshot.connections.iter().enumerate() {
            let cookie = c.socket.cookie;
            if cookie == 0 || index.contains_key(&c.socket.key()) {
                continue;
            }
            let (process, user) = who(self.snapshot.owner_process(c));
            self.gone.insert(
                cookie,
                Gone {
                    process,
                    user,
                    class: self.decisions[i].class.to_string(),
                    track: self.tracks[i].take(),
                    local: is_local(&c.socket),
                    age: 0,
                },
            );
        }
        let mut old = std::mem::take(&mut self.tracks);
        let tracks = snapshot
            .connections
            .iter()
            .map(|c| {
                self.index
                    .get(&c.socket.key())
                    .and_then(|&i| old.get_mut(i))
                    .and_then(Option::take)
            })
            .collect();
        self.index = index;
        self.snapshot = snapshot;
        self.decisions = decisions;
        self.tracks = tracks;
    }

    /// Part of a cycle's answer: `snapshot` holds some connections (new ones, or ones decided
    /// again), `decisions` parallel to it. Every other record stays as it is.
    pub fn merge(&mut self, snapshot: &Snapshot, decisions: Vec<Decision>) {
        let table = Arc::make_mut(&mut self.snapshot);
        for (pid, process) in &snapshot.processes {
            table.processes.insert(*pid, process.clone());
        }
        for (c, d) in snapshot.connections.iter().zip(decisions) {
            let key = c.socket.key();
            match self.index.get(&key) {
                Some(&i) => {
                    table.connections[i] = c.clone();
                    self.decisions[i] = d;
                }
                None => {
                    self.index.insert(key, table.connections.len());
                    table.connections.push(c.clone());
                    self.decisions.push(d);
                    self.tracks.push(None);
                }
            }
        }
    }

    /// The bytes closed sockets moved that accounting has not counted: each close report's
    /// totals less what earlier cycles counted of its connection (a live record, or one the
    /// last cycles dropped), charged to that connection's process, user and class (nothing for
    /// a loopback connection: its bytes never crossed the link); a socket
    /// the table never held (it lived between two looks) is charged to the owner the kernel
    /// recorded at its creation and the class its packets went to, or, when neither is known
    /// (a u32-path destroy report of a socket no scan saw), to nobody: the link's remainder
    /// counts it as unattributed.
    pub fn close(&mut self, closed: &[Closed]) -> Vec<Charge> {
        if closed.is_empty() {
            return Vec::new();
        }
        let mut charges = Vec::with_capacity(closed.len());
        for Closed { socket: s, class } in closed {
            let (up, down) = (s.bytes.up, s.bytes.down);
            // A connection with a cookie is indexed by it (see `Socket::key`).
            let live = self
                .index
                .get(&s.cookie)
                .copied()
                .filter(|&i| self.snapshot.connections[i].socket.cookie == s.cookie);
            let charge = if let Some(i) = live {
                let c = &self.snapshot.connections[i];
                let (process, user) = who(self.snapshot.owner_process(c));
                let (up, down) = ConnTrack::settle(&mut self.tracks[i], up, down);
                if is_local(&c.socket) {
                    continue;
                }
                Charge {
                    process,
                    user,
                    class: self.decisions[i].class.to_string(),
                    up,
                    down,
                }
            } else if let Some(mut g) = self.gone.remove(&s.cookie) {
                let (up, down) = ConnTrack::settle(&mut g.track, up, down);
                if g.local {
                    continue;
                }
                Charge {
                    process: g.process,
                    user: g.user,
                    class: g.class,
                    up,
                    down,
                }
            } else if s.owner.is_none() && class.is_none() {
                // Nothing ties it to anyone: a TCP destroy report (the u32 path) of a socket no
                // scan saw. Its bytes stay in the link's remainder, `(unattributed)`, rather
                // than being charged to a class it may never have been in.
                continue;
            } else {
                let owner = s.owner.as_ref();
                let user = owner.map(|o| {
                    self.users
                        .entry(o.uid)
                        .or_insert_with(|| {
                            nix::unistd::User::from_uid(o.uid.into())
                                .ok()
                                .flatten()
                                .map(|u| u.name)
                        })
                        .clone()
                        .unwrap_or_else(|| o.uid.to_string())
                });
                Charge {
                    process: owner.map(|o| o.comm.clone()),
                    user,
                    class: class.clone().unwrap_or_else(|| "default".into()),
                    up,
                    down,
                }
            };
            if charge.up > 0 || charge.down > 0 {
                charges.push(charge);
            }
        }
        charges
    }

    /// Every record as accounting takes it, with its class and limit.
    pub fn observed(&mut self) -> impl Iterator<Item = Observed<'_>> {
        let snapshot = &self.snapshot;
        snapshot
            .connections
            .iter()
            .zip(&self.decisions)
            .zip(&mut self.tracks)
            .map(|((c, d), track)| Observed {
                socket: &c.socket,
                process: snapshot.owner_process(c),
                class: &d.class,
                limit: d.limit,
                track,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{Proto, Socket, State};

    fn connection(cookie: u64, up: u64) -> Connection {
        Connection {
            socket: Socket {
                proto: Proto::Tcp,
                local: format!("10.0.0.1:{}", 1000 + cookie).parse().unwrap(),
                remote: "10.0.0.2:443".parse().unwrap(),
                state: State::Established,
                uid: 0,
                inode: cookie,
                cookie,
                bytes_up: Some(up),
                bytes_down: Some(0),
            },
            owner: None,
            remote_host: None,
        }
    }

    fn snapshot(connections: Vec<Connection>) -> Snapshot {
        Snapshot {
            connections,
            processes: Default::default(),
        }
    }

    fn decision(class: &str) -> Decision {
        Decision {
            class: class.into(),
            limit: Default::default(),
        }
    }

    /// Accounting's view of every record, as the cycle hands it over.
    fn account(table: &mut FlowTable, accounting: &mut crate::account::Accounting, second: u8) {
        let now: jiff::civil::DateTime = format!("2026-11-23T10:00:{second:02}").parse().unwrap();
        let now = now.to_zoned(jiff::tz::TimeZone::UTC).unwrap();
        accounting.observe(&now, table.observed(), &[], &[], &[]);
    }

    #[test]
    fn a_record_keeps_its_accounting_across_cycles_and_goes_with_its_socket() {
        let mut table = FlowTable::default();
        let mut accounting = crate::account::Accounting::new(1);
        let first = snapshot(vec![connection(1, 0), connection(2, 0)]);
        assert_eq!(table.known(&first).0, vec![None, None]);
        table.replace(Arc::new(first), vec![decision("a"), decision("b")]);
        account(&mut table, &mut accounting, 0);
        // Connection 1 moved 125 kB in a second; 2 is gone; 3 is new.
        let second = snapshot(vec![connection(3, 0), connection(1, 125_000)]);
        let (previous, _) = table.known(&second);
        assert_eq!(previous, vec![None, Some(decision("a"))]);
        table.replace(Arc::new(second), vec![decision("c"), decision("a")]);
        account(&mut table, &mut accounting, 1);
        assert!(table.get(2).is_none());
        assert_eq!(table.len(), 2);
        let one = table.get(1).unwrap().stats;
        assert_eq!(one.age, 1.0, "its track came along");
        assert!(one.rate_up > 0.0);
        assert_eq!(table.get(3).unwrap().stats.age, 0.0);

        // A partial answer: 4 is added, 3 is decided again, 1 is untouched.
        table.merge(
            &snapshot(vec![connection(4, 0), connection(3, 0)]),
            vec![decision("d"), decision("e")],
        );
        let classes: Vec<&str> = table.iter().map(|f| &*f.decision.class).collect();
        assert_eq!(classes, ["e", "a", "d"]);
        assert_eq!(table.get(1).unwrap().stats, one);
        assert_eq!(table.connections().len(), table.decisions().len());
    }

    fn closed(cookie: u64, up: u64, comm: Option<&str>) -> Closed {
        Closed {
            socket: ClosedSocket {
                cookie,
                proto: Proto::Tcp,
                owner: comm.map(|c| crate::classify::SocketOwner {
                    tgid: 9,
                    uid: 0,
                    comm: c.into(),
                    cgroup_id: 1,
                }),
                bytes: crate::classify::ByteCounters { up, down: 0 },
                classes: (Some(0x5a_0004), None),
            },
            class: Some("bulk".into()),
        }
    }

    /// A close report charges what no cycle counted, once: for a connection still listed (its
    /// next count is not added again), one the last scan no longer saw, and one no scan ever
    /// saw (under the owner and class the kernel reported).
    #[test]
    fn a_close_charges_what_no_cycle_counted_and_nothing_twice() {
        use crate::account::{Period, UsageKey};
        let mut table = FlowTable::default();
        let mut accounting = crate::account::Accounting::new(1);
        let both = |a, b| snapshot(vec![connection(1, a), connection(2, b)]);
        table.replace(Arc::new(both(0, 0)), vec![decision("a"), decision("b")]);
        account(&mut table, &mut accounting, 0);
        table.replace(
            Arc::new(both(1000, 500)),
            vec![decision("a"), decision("b")],
        );
        account(&mut table, &mut accounting, 1);
        // The next scan lists 1 (closing) and no longer 2; 3 lived between two scans.
        table.replace(
            Arc::new(snapshot(vec![connection(1, 1200)])),
            vec![decision("a")],
        );
        let charges = table.close(&[
            closed(1, 1500, None),
            closed(2, 800, None),
            closed(3, 700, Some("curl")),
        ]);
        let seen: Vec<_> = charges
            .iter()
            .map(|c| (c.process.as_deref(), c.class.as_str(), c.up))
            .collect();
        assert_eq!(
            seen,
            [
                (None, "a", 500),
                (None, "b", 300),
                (Some("curl"), "bulk", 700)
            ]
        );
        assert_eq!(charges[2].user.as_deref(), Some("root"));
        let now: jiff::civil::DateTime = "2026-11-23T10:00:02".parse().unwrap();
        let now = now.to_zoned(jiff::tz::TimeZone::UTC).unwrap();
        accounting.observe(&now, table.observed(), &charges, &[], &[]);
        let class = |n: &str| {
            accounting
                .usage(Period::Day, &UsageKey::Class(n.into()))
                .up
                .bytes()
        };
        assert_eq!((class("a"), class("b"), class("bulk")), (1500, 800, 700));
        assert_eq!(
            accounting
                .usage(Period::Day, &UsageKey::Process("curl".into()))
                .up
                .bytes(),
            700
        );
        // 2's dropped record went with its close.
        assert!(table.gone.is_empty());
    }

    /// The u32 path's close reports (no owner, no class): a known connection's tail goes to its
    /// record's process and class; a socket no scan saw charges nobody, and a loopback
    /// connection nothing.
    #[test]
    fn an_ownerless_close_charges_known_connections_only() {
        let mut table = FlowTable::default();
        let mut accounting = crate::account::Accounting::new(1);
        let mut local = connection(2, 0);
        local.socket.remote = "127.0.0.1:443".parse().unwrap();
        local.socket.local = "127.0.0.1:1002".parse().unwrap();
        table.replace(
            Arc::new(snapshot(vec![connection(1, 100), local])),
            vec![decision("a"), decision("b")],
        );
        account(&mut table, &mut accounting, 0);
        // Both closed before the next scan.
        table.replace(Arc::new(snapshot(vec![])), vec![]);
        let ownerless = |cookie, up| Closed {
            class: None,
            ..closed(cookie, up, None)
        };
        let charges = table.close(&[ownerless(1, 900), ownerless(2, 5000), ownerless(3, 700)]);
        let seen: Vec<_> = charges.iter().map(|c| (c.class.as_str(), c.up)).collect();
        assert_eq!(seen, [("a", 800)]);
    }
}
