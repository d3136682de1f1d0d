//! Stage 2, **process lookup**: which process owns each socket.
//!
//! [`ProcessTable`] keeps `inode → owner` and `pid → Process` across cycles, so a steady cycle
//! costs one `stat` read per owning process instead of a readlink of every descriptor on the
//! system (what `ss -p` does every time). The full `/proc/*/fd` walk runs only when the scan
//! reports an inode the table has not resolved yet, or when a known owner has exited; an inode the
//! walk cannot attribute (a socket held only by the kernel, or by a process we may not inspect) is
//! searched for again only after [`RETRY_UNOWNED_CYCLES`], so it cannot force a walk every cycle.
//!
//! Ownership rules:
//! * A process is identified by pid *and* start time: a pid reused by a new process is read
//!   afresh, never confused with the one that had it before.
//! * A process that exits mid-lookup is skipped; its sockets are resolved again next cycle.
//! * A socket held by several processes (inherited across fork) is owned by the one that started
//!   first (ties: lowest pid), deterministically; the others are listed in [`Owner::others`].
//! * Without the privilege to read other users' `/proc/<pid>/fd`, the lookup resolves what it can
//!   and warns once, naming the capabilities that are missing.

mod fdwalk;
mod info;
pub mod pidns;
mod text;

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use info::{Pid, Process, cgroup_path, unit_of_cgroup};
pub use text::ProcString;

use crate::scan::Socket;

/// Cycles to wait before searching again for an inode no process was found holding.
pub const RETRY_UNOWNED_CYCLES: u64 = 10;

/// Who holds a socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: Pid,
    /// Other processes holding the same socket, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<Pid>,
}

/// What one [`ProcessTable::update`] did, for logs, `status` and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// Whether the `/proc/*/fd` walk ran.
    pub walked: bool,
    /// Inodes that were not resolved before this cycle.
    pub unknown: usize,
    /// Processes read from `/proc` this cycle.
    pub processes_read: usize,
    /// Processes whose descriptors could not be read (no privilege).
    pub denied: usize,
}

/// A cached value with the cycle its socket was last reported in, so sockets that are gone can be
/// dropped without building a set of the live ones every cycle.
#[derive(Debug)]
struct Entry<T> {
    value: T,
    seen: u64,
}

/// The inode → owner cache. See the module docs for its rules.
#[derive(Debug)]
pub struct ProcessTable {
    proc_root: PathBuf,
    owners: HashMap<u64, Entry<Owner>>,
    /// Inodes no process was found holding; the value is the cycle of the last search.
    unowned: HashMap<u64, Entry<u64>>,
    processes: HashMap<Pid, Arc<Process>>,
    users: HashMap<u32, Option<String>>,
    cycle: u64,
    warned_denied: bool,
}

impl Default for ProcessTable {
    fn default() -> Self {
        ProcessTable::new()
    }
}

impl ProcessTable {
    /// A table reading the real `/proc`.
    pub fn new() -> Self {
        ProcessTable::with_proc_root("/proc")
    }

    /// A table reading another procfs tree (tests use fixture trees).
    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        ProcessTable {
            proc_root: root.into(),
            owners: HashMap::default(),
            unowned: HashMap::default(),
            processes: HashMap::default(),
            users: HashMap::default(),
            cycle: 0,
            warned_denied: false,
        }
    }

    pub fn owner(&self, inode: u64) -> Option<&Owner> {
        self.owners.get(&inode).map(|e| &e.value)
    }

    pub fn process(&self, pid: Pid) -> Option<&Arc<Process>> {
        self.processes.get(&pid)
    }

    /// The owning process of a socket, if known.
    pub fn owner_process(&self, inode: u64) -> Option<&Arc<Process>> {
        self.owner(inode).and_then(|o| self.process(o.pid))
    }

    /// Brings the table up to date with this cycle's sockets.
    ///
    /// The steady path (nothing new, nothing gone) is one hash lookup per socket plus one `stat`
    /// read per owning process.
    pub fn update(&mut self, sockets: &[Socket]) -> LookupStats {
        self.cycle += 1;
        let cycle = self.cycle;
        let mut stats = LookupStats::default();
        let mut changed = self.forget_exited_owners();

        let mut unknown = Vec::new();
        let (mut owned_seen, mut unowned_seen) = (0, 0);
        for inode in sockets.iter().map(|s| s.inode).filter(|&i| i != 0) {
            if let Some(e) = self.owners.get_mut(&inode) {
                owned_seen += usize::from(std::mem::replace(&mut e.seen, cycle) != cycle);
            } else if let Some(e) = self.unowned.get_mut(&inode) {
                unowned_seen += usize::from(std::mem::replace(&mut e.seen, cycle) != cycle);
                if cycle - e.value >= RETRY_UNOWNED_CYCLES {
                    unknown.push(inode);
                }
            } else {
                unknown.push(inode);
            }
        }
        if owned_seen < self.owners.len() {
            self.owners.retain(|_, e| e.seen == cycle);
            changed = true;
        }
        if unowned_seen < self.unowned.len() {
            self.unowned.retain(|_, e| e.seen == cycle);
        }
        unknown.sort_unstable();
        unknown.dedup();
        stats.unknown = unknown.len();
        if !unknown.is_empty() {
            stats.walked = true;
            changed = true;
            let live: HashSet<u64> = sockets
                .iter()
                .map(|s| s.inode)
                .filter(|&i| i != 0)
                .collect();
            self.resolve(&live, &unknown, &mut stats);
        }
        if changed {
            self.collect_garbage();
        }
        stats
    }

    /// Looks up the owners of some sockets without dropping anything else: the lookup of a
    /// cycle that sees only new sockets (the others are not gone, merely not given).
    pub fn add(&mut self, sockets: &[Socket]) -> LookupStats {
        let mut stats = LookupStats::default();
        let mut unknown: Vec<u64> = sockets
            .iter()
            .map(|s| s.inode)
            .filter(|i| *i != 0 && !self.owners.contains_key(i))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        stats.unknown = unknown.len();
        if !unknown.is_empty() {
            stats.walked = true;
            let live: HashSet<u64> = unknown.iter().copied().collect();
            self.resolve(&live, &unknown, &mut stats);
        }
        stats
    }

    /// Drops owners whose process exited (or whose pid now belongs to another process), so their
    /// sockets are looked up again.
    /// Returns whether anything was dropped.
    fn forget_exited_owners(&mut self) -> bool {
        let holders: HashSet<Pid> = self
            .owners
            .values()
            .flat_map(|e| std::iter::once(e.value.pid).chain(e.value.others.iter().copied()))
            .collect();
        let exited: HashSet<Pid> = holders
            .into_iter()
            .filter(|&pid| !self.is_current(pid))
            .collect();
        if exited.is_empty() {
            return false;
        }
        for pid in &exited {
            self.processes.remove(pid);
        }
        self.owners.retain(|_, e| {
            !exited.contains(&e.value.pid) && !e.value.others.iter().any(|p| exited.contains(p))
        });
        true
    }

    /// Whether the cached process for `pid` is still the one running under that pid, running the
    /// same program: a process that called `exec` keeps its pid and start time but must be read
    /// afresh, or the policy would go on judging the program it was before (a python3 that execs
    /// a limited program would escape its limit). The name or the executable tells; an exec of
    /// the very same executable under the same name changes neither and is not noticed here.
    fn is_current(&self, pid: Pid) -> bool {
        match (
            self.processes.get(&pid),
            info::identity(&self.proc_root, pid),
        ) {
            (Some(p), Some(now)) => {
                now.start_time == p.start_time
                    && now.name == p.name
                    && (p.exe.is_none() || now.exe == p.exe)
            }
            _ => false,
        }
    }

    fn resolve(&mut self, live: &HashSet<u64>, unknown: &[u64], stats: &mut LookupStats) {
        // The walk costs the same whichever inodes it looks for, so it refreshes them all:
        // ownership changes (fork, descriptor passing) are picked up at the same time.
        let walk = match fdwalk::walk(&self.proc_root, live) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(
                    "cannot list {}: {e}; connections stay unattributed",
                    self.proc_root.display()
                );
                return;
            }
        };
        stats.denied = walk.denied;
        if walk.denied > 0 && !self.warned_denied {
            self.warned_denied = true;
            tracing::warn!(
                "cannot read the descriptors of {} processes: their connections have no owner. \
                 Run shaper as root, or grant CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH",
                walk.denied
            );
        }
        let mut verified = HashSet::default();
        for (inode, pids) in walk.holders {
            let mut holders: Vec<Arc<Process>> = pids
                .into_iter()
                .filter_map(|pid| self.load(pid, &mut verified, stats, 0))
                .collect();
            if holders.is_empty() {
                continue;
            }
            holders.sort_by_key(|p| (p.start_time, p.pid));
            let others = holders[1..].iter().map(|p| p.pid).collect();
            let owner = Owner {
                pid: holders[0].pid,
                others,
            };
            self.unowned.remove(&inode);
            self.owners.insert(
                inode,
                Entry {
                    value: owner,
                    seen: self.cycle,
                },
            );
        }
        for &inode in unknown {
            if !self.owners.contains_key(&inode) {
                self.unowned.insert(
                    inode,
                    Entry {
                        value: self.cycle,
                        seen: self.cycle,
                    },
                );
            }
        }
    }

    /// The process `pid`, from the cache when it is still the same process, else read afresh
    /// with its ancestors. `None` when it has exited.
    fn load(
        &mut self,
        pid: Pid,
        verified: &mut HashSet<Pid>,
        stats: &mut LookupStats,
        depth: usize,
    ) -> Option<Arc<Process>> {
        if let Some(p) = self.processes.get(&pid)
            && (verified.contains(&pid) || self.is_current(pid))
        {
            verified.insert(pid);
            return Some(p.clone());
        }
        let mut process = match info::read_process(&self.proc_root, pid, &mut self.users) {
            Ok(p) => p,
            Err(info::ReadError::Gone) => {
                self.processes.remove(&pid);
                return None;
            }
            Err(info::ReadError::Other(e)) => {
                tracing::debug!("skipping process {pid}: {e}");
                return None;
            }
        };
        stats.processes_read += 1;
        verified.insert(pid);
        let parent = process.ppid;
        // Depth bound: a real tree ends at pid 0, but a fixture or a racing reparent may not.
        if parent != 0 && parent != pid && depth < 64 {
            process.ancestors.push(parent);
            if let Some(p) = self.load(parent, verified, stats, depth + 1) {
                process.ancestors.extend(p.ancestors.iter().copied());
            }
        }
        let process = Arc::new(process);
        self.processes.insert(pid, process.clone());
        Some(process)
    }

    /// Keeps only processes that own a live socket, and their ancestors.
    fn collect_garbage(&mut self) {
        let mut keep: HashSet<Pid> = HashSet::default();
        for owner in self.owners.values().map(|e| &e.value) {
            for pid in std::iter::once(owner.pid).chain(owner.others.iter().copied()) {
                if keep.insert(pid)
                    && let Some(p) = self.processes.get(&pid)
                {
                    keep.extend(p.ancestors.iter().copied());
                }
            }
        }
        self.processes.retain(|pid, _| keep.contains(pid));
    }

    /// Joins sockets with their owners into a [`Snapshot`] (for `shaper snapshot` and tests).
    pub fn snapshot(&self, sockets: Vec<Socket>) -> Snapshot {
        self.join(sockets.into_iter().map(|socket| {
            let owner = self.owner(socket.inode).cloned();
            (socket, owner)
        }))
    }

    /// Sockets reported as new by the BPF classifier, which carry no inode yet, each with the
    /// process that created it when that is known by a pid this table can read: the owner is
    /// read from `/proc/<pid>` alone, with no descriptor walk. A socket without a pid (the
    /// daemon in a PID namespace of its own, where the kernel's tgids are not ours) is looked up
    /// by its inode, when it has one, as [`ProcessTable::add`] does. A process that has exited
    /// leaves its socket without an owner.
    pub fn snapshot_created(&mut self, sockets: Vec<(Socket, Option<Pid>)>) -> Snapshot {
        let by_inode: Vec<Socket> = sockets
            .iter()
            .filter(|(s, pid)| pid.is_none() && s.inode != 0)
            .map(|(s, _)| s.clone())
            .collect();
        if !by_inode.is_empty() {
            self.add(&by_inode);
        }
        let mut verified = HashSet::default();
        let mut stats = LookupStats::default();
        let owned: Vec<(Socket, Option<Owner>)> = sockets
            .into_iter()
            .map(|(socket, pid)| {
                let owner = match pid {
                    Some(pid) => self.load(pid, &mut verified, &mut stats, 0).map(|p| Owner {
                        pid: p.pid,
                        others: Vec::new(),
                    }),
                    None => self.owner(socket.inode).cloned(),
                };
                (socket, owner)
            })
            .collect();
        self.join(owned.into_iter())
    }

    fn join(&self, sockets: impl Iterator<Item = (Socket, Option<Owner>)>) -> Snapshot {
        let mut processes = BTreeMap::new();
        let connections = sockets
            .map(|(socket, owner)| {
                if let Some(o) = &owner {
                    for pid in std::iter::once(o.pid).chain(o.others.iter().copied()) {
                        // Each process is copied once, however many connections it has.
                        if processes.contains_key(&pid) {
                            continue;
                        }
                        if let Some(p) = self.process(pid) {
                            processes.insert(pid, (**p).clone());
                            for a in &p.ancestors {
                                if let Some(ap) = self.process(*a) {
                                    processes.entry(*a).or_insert_with(|| (**ap).clone());
                                }
                            }
                        }
                    }
                }
                Connection {
                    socket,
                    owner,
                    remote_host: None,
                }
            })
            .collect();
        Snapshot {
            connections,
            processes,
        }
    }
}

/// A socket with its owner, as recorded by `shaper snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub socket: Socket,
    pub owner: Option<Owner>,
    /// The name this machine last looked up for the remote address ([`crate::names`]): a
    /// hint for the policy (`conn.remote_host`) and for people (`status`, `top`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
}

/// The live connections and every process they refer to (owners and their ancestors): the
/// input of the policy stage, and the fixture format `shaper simulate` reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub connections: Vec<Connection>,
    pub processes: BTreeMap<Pid, Process>,
}

impl Snapshot {
    /// Parses the RON form (`shaper snapshot --ron`); `origin` names the text in errors, which
    /// carry `origin:line:column`. `Some(…)` around optional values may be left out.
    pub fn from_ron(text: &str, origin: &str) -> Result<Snapshot, String> {
        ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
            .from_str(text)
            .map_err(|e| {
                format!(
                    "{origin}:{}:{}: {}",
                    e.span.start.line, e.span.start.col, e.code
                )
            })
    }

    /// The RON form, one connection per line.
    pub fn to_ron(&self) -> String {
        let pretty = ron::ser::PrettyConfig::new()
            .struct_names(false)
            .compact_structs(true)
            .extensions(ron::extensions::Extensions::IMPLICIT_SOME);
        ron::ser::to_string_pretty(self, pretty).expect("snapshots always serialise") + "\n"
    }

    pub fn owner_process(&self, connection: &Connection) -> Option<&Process> {
        connection
            .owner
            .as_ref()
            .and_then(|o| self.processes.get(&o.pid))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::scan::{Proto, State};

    /// A fake `/proc` with processes built from this process's own `stat` and `status`, so the
    /// files have every field procfs expects.
    pub(super) struct FakeProc {
        pub(super) dir: tempfile::TempDir,
    }

    impl FakeProc {
        pub(super) fn new() -> Self {
            FakeProc {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        pub(super) fn add(&self, pid: Pid, ppid: Pid, name: &str, start: u64, sockets: &[u64]) {
            let d = self.dir.path().join(pid.to_string());
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("fd")).unwrap();
            let real = std::fs::read_to_string("/proc/self/stat").unwrap();
            let rest = &real[real.rfind(')').unwrap() + 2..];
            let mut fields: Vec<String> = rest.split(' ').map(str::to_string).collect();
            fields[1] = ppid.to_string();
            fields[19] = start.to_string();
            std::fs::write(
                d.join("stat"),
                format!("{pid} ({name}) {}", fields.join(" ")),
            )
            .unwrap();
            let status: String = std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .map(|l| match l.split(':').next().unwrap() {
                    "Name" => format!("Name:\t{name}"),
                    "Pid" => format!("Pid:\t{pid}"),
                    "PPid" => format!("PPid:\t{ppid}"),
                    "Uid" => "Uid:\t1000\t1000\t1000\t1000".to_string(),
                    "Gid" => "Gid:\t100\t100\t100\t100".to_string(),
                    _ => l.to_string(),
                })
                .map(|l| l + "\n")
                .collect();
            std::fs::write(d.join("status"), status).unwrap();
            std::fs::write(d.join("cmdline"), format!("/usr/bin/{name}\0--flag\0")).unwrap();
            std::fs::write(d.join("cgroup"), "0::/system.slice/demo.service\n").unwrap();
            std::os::unix::fs::symlink(format!("/usr/bin/{name}"), d.join("exe")).unwrap();
            for (fd, inode) in sockets.iter().enumerate() {
                std::os::unix::fs::symlink(
                    format!("socket:[{inode}]"),
                    d.join("fd").join((fd + 3).to_string()),
                )
                .unwrap();
            }
        }

        pub(super) fn remove(&self, pid: Pid) {
            std::fs::remove_dir_all(self.dir.path().join(pid.to_string())).unwrap();
        }

        fn table(&self) -> ProcessTable {
            ProcessTable::with_proc_root(self.dir.path())
        }
    }

    fn socket(inode: u64) -> Socket {
        Socket {
            proto: Proto::Tcp,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:443".parse().unwrap(),
            state: State::Established,
            uid: 1000,
            inode,
            cookie: inode,
            bytes_up: Some(0),
            bytes_down: Some(0),
        }
    }

    #[test]
    fn reads_attributes_and_ancestors() {
        let fake = FakeProc::new();
        fake.add(1, 0, "init", 1, &[]);
        fake.add(50, 1, "bash", 500, &[]);
        fake.add(100, 50, "curl", 1000, &[555]);
        let mut table = fake.table();
        let stats = table.update(&[socket(555)]);
        assert_eq!((stats.walked, stats.processes_read), (true, 3));
        let p = table.owner_process(555).unwrap();
        assert_eq!(p.name, "curl");
        assert_eq!(p.ppid, 50);
        assert_eq!(p.ancestors, vec![50, 1]);
        assert_eq!(p.cmdline, vec!["/usr/bin/curl", "--flag"]);
        assert_eq!(p.exe, Some("/usr/bin/curl".into()));
        assert_eq!((p.uid, p.gid), (1000, 100));
        assert_eq!(p.cgroup.as_deref(), Some("/system.slice/demo.service"));
        assert_eq!(p.unit.as_deref(), Some("demo.service"));
        assert_eq!(table.process(50).unwrap().name, "bash");
    }

    #[test]
    fn reused_pid_is_read_afresh() {
        let fake = FakeProc::new();
        fake.add(100, 0, "old", 1000, &[555]);
        let mut table = fake.table();
        table.update(&[socket(555)]);
        assert_eq!(table.owner_process(555).unwrap().name, "old");
        // The process exits and an unrelated one gets pid 100 (and, here, the same socket).
        fake.add(100, 0, "new", 2000, &[555]);
        let stats = table.update(&[socket(555)]);
        assert!(
            stats.walked,
            "the owner changed, so the socket is looked up again"
        );
        let p = table.owner_process(555).unwrap();
        assert_eq!((p.name.to_string().as_str(), p.start_time), ("new", 2000));
    }

    #[test]
    fn exec_is_noticed_by_name_or_executable() {
        let fake = FakeProc::new();
        fake.add(100, 0, "python3", 1000, &[555]);
        let mut table = fake.table();
        table.update(&[socket(555)]);
        assert_eq!(table.owner_process(555).unwrap().name, "python3");
        // exec: same pid and start time, another program.
        fake.add(100, 0, "limited", 1000, &[555]);
        table.update(&[socket(555)]);
        let p = table.owner_process(555).unwrap();
        assert_eq!(p.name, "limited");
        assert_eq!(p.exe, Some("/usr/bin/limited".into()));
        // The fast path's lookup by tgid notices it too.
        fake.add(100, 0, "curl", 1000, &[555]);
        let snap = table.snapshot_created(vec![(socket(556), Some(100))]);
        assert_eq!(snap.processes[&100].name, "curl");
    }

    /// In a PID namespace of its own the daemon has no usable pid for a reported socket: the
    /// socket's inode finds its owner, and a socket already closed (no inode) has none.
    #[test]
    fn a_created_socket_without_a_pid_is_owned_by_the_process_holding_it() {
        let fake = FakeProc::new();
        fake.add(100, 0, "curl", 1000, &[555]);
        let mut table = fake.table();
        let mut closed = socket(0);
        closed.cookie = 777;
        let snap = table.snapshot_created(vec![(socket(555), None), (closed, None)]);
        assert_eq!(snap.connections[0].owner.as_ref().map(|o| o.pid), Some(100));
        assert_eq!(snap.processes[&100].name, "curl");
        assert_eq!(snap.connections[1].owner, None);
        assert_eq!(
            table.owner(555).map(|o| o.pid),
            Some(100),
            "known to the next scan"
        );
    }

    #[test]
    fn a_name_that_is_not_utf8_is_read_as_bytes() {
        let fake = FakeProc::new();
        fake.add(100, 0, "placeholder", 1000, &[555]);
        let stat = fake.dir.path().join("100/stat");
        let text = std::fs::read(&stat).unwrap();
        let rest = &text[text.iter().rposition(|&b| b == b')').unwrap()..];
        let mut raw = b"100 (\xff\xfeblockme".to_vec();
        raw.extend_from_slice(rest);
        std::fs::write(&stat, raw).unwrap();
        std::fs::write(fake.dir.path().join("100/cmdline"), b"/usr/bin/\xffx\0").unwrap();
        let mut table = fake.table();
        table.update(&[socket(555)]);
        let p = table.owner_process(555).expect("the process is visible");
        assert_eq!(p.name.as_bytes(), b"\xff\xfeblockme");
        assert_eq!(p.cmdline[0].as_bytes(), b"/usr/bin/\xffx");
        assert_eq!(p.uid, 1000);
    }

    #[test]
    fn exited_owner_and_closed_sockets_are_dropped() {
        let fake = FakeProc::new();
        fake.add(100, 0, "a", 1000, &[555]);
        fake.add(200, 0, "b", 1000, &[666]);
        let mut table = fake.table();
        table.update(&[socket(555), socket(666)]);
        assert!(table.owner(555).is_some() && table.owner(666).is_some());
        // 555 is closed; 200 exits while its socket 666 is still reported (the race).
        fake.remove(200);
        table.update(&[socket(666)]);
        assert_eq!(table.owner(555), None);
        assert_eq!(table.owner(666), None);
        assert!(
            table.process(100).is_none(),
            "processes without sockets are forgotten"
        );
        assert!(table.process(200).is_none());
    }

    #[test]
    fn unowned_inodes_do_not_force_a_walk_every_cycle() {
        let fake = FakeProc::new();
        fake.add(100, 0, "a", 1000, &[555]);
        let mut table = fake.table();
        assert!(table.update(&[socket(555), socket(777)]).walked);
        for _ in 1..RETRY_UNOWNED_CYCLES {
            assert!(!table.update(&[socket(555), socket(777)]).walked);
        }
        assert!(table.update(&[socket(555), socket(777)]).walked, "retried");
    }

    #[test]
    fn shared_socket_owner_is_the_oldest_process() {
        let fake = FakeProc::new();
        fake.add(300, 0, "child", 2000, &[555]);
        fake.add(400, 0, "parent", 1000, &[555]);
        let mut table = fake.table();
        table.update(&[socket(555)]);
        assert_eq!(
            table.owner(555),
            Some(&Owner {
                pid: 400,
                others: vec![300]
            })
        );
    }
}
