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

use crate::account::{ConnStats, ConnTrack, Observed};
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
        self.index = snapshot
            .connections
            .iter()
            .enumerate()
            .map(|(i, c)| (c.socket.key(), i))
            .collect();
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
        accounting.observe(&now, table.observed(), &[], &[]);
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
}
