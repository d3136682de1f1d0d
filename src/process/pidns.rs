//! Owners when shaper's `/proc` is not the initial PID namespace's (the daemon in an LXC/Incus
//! container, under systemd's `PrivatePIDs=`, in a pod).
//!
//! The BPF classifier records a socket's creator with `bpf_get_current_pid_tgid`, which gives
//! the tgid in the *initial* PID namespace; `/proc` numbers processes in the namespace it was
//! mounted for. Taken as a local pid, a reported tgid names another process or none: the
//! socket would be judged as someone else's. So in a namespace of its own the daemon never
//! uses a reported tgid as a pid. It finds a reported socket's owner by the socket itself
//! (sock_diag by cookie → inode → the process holding it under `/proc`), and learns from that
//! which local process a host tgid is ([`PidTranslation`]): the kernel's per-process class for
//! new connections is keyed by host tgid, so only processes whose host tgid is known get one.

use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;

use super::{Pid, info};

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`, include/linux/proc_ns.h):
/// fixed since Linux 3.8.
pub const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// Whether the procfs at `proc_root` numbers processes as the kernel's BPF helpers do (the
/// initial PID namespace): read from its pid 1's namespace (pid 1 of a procfs is always in the
/// namespace the procfs was mounted for), else from the reader's own. `None` when neither can
/// be read.
pub fn numbers_as_the_kernel(proc_root: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    ["1/ns/pid", "self/ns/pid"]
        .iter()
        .find_map(|p| std::fs::metadata(proc_root.join(p)).ok())
        .map(|m| m.ino() == PROC_PID_INIT_INO)
}

/// A local process, as learnt for one host tgid: its pid here and start time (a pid reused by
/// another process is not the same process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Local {
    pid: Pid,
    start_time: u64,
}

/// Host tgid ↔ local pid, for the processes whose host tgid the kernel reported and whose
/// socket was then found under a local pid. See the module docs.
#[derive(Debug)]
pub struct PidTranslation {
    proc_root: PathBuf,
    by_host: FxHashMap<u32, Local>,
    by_local: FxHashMap<Pid, (u32, u64)>,
}

impl PidTranslation {
    pub fn new(proc_root: impl Into<PathBuf>) -> PidTranslation {
        PidTranslation {
            proc_root: proc_root.into(),
            by_host: FxHashMap::default(),
            by_local: FxHashMap::default(),
        }
    }

    /// Records that host tgid `host` is local process `pid` (started at `start_time`). A host
    /// tgid already tied to another living process is a contradiction (a socket passed on
    /// before its first packet): both ties are dropped rather than one guessed.
    pub fn learn(&mut self, host: u32, pid: Pid, start_time: u64) {
        let local = Local { pid, start_time };
        match self.by_host.get(&host) {
            Some(known) if *known == local => return,
            Some(&known) if self.alive(known) => {
                self.forget_host(host);
                return;
            }
            _ => {}
        }
        self.forget_host(host);
        if let Some((old_host, _)) = self.by_local.get(&pid).copied() {
            self.by_host.remove(&old_host);
        }
        self.by_host.insert(host, local);
        self.by_local.insert(pid, (host, start_time));
    }

    /// The local pid of host tgid `host`, if learnt and that process still runs (one read of
    /// its `stat`); a tie to a process that has gone is dropped.
    pub fn local(&mut self, host: u32) -> Option<Pid> {
        let known = *self.by_host.get(&host)?;
        if self.alive(known) {
            Some(known.pid)
        } else {
            self.forget_host(host);
            None
        }
    }

    /// The host tgid of local process `pid` started at `start_time`, if learnt (no read: the
    /// caller has the process).
    pub fn host(&self, pid: Pid, start_time: u64) -> Option<u32> {
        self.by_local
            .get(&pid)
            .filter(|(_, start)| *start == start_time)
            .map(|(host, _)| *host)
    }

    /// Drops the ties of processes that have gone (one `stat` read each).
    pub fn prune(&mut self) {
        let gone: Vec<u32> = self
            .by_host
            .iter()
            .filter(|(_, l)| !self.alive(**l))
            .map(|(h, _)| *h)
            .collect();
        for host in gone {
            self.forget_host(host);
        }
    }

    /// Whether host tgid `host` is already tied to local process `pid` started at `start_time`.
    pub fn ties(&self, host: u32, pid: Pid, start_time: u64) -> bool {
        self.by_host.get(&host) == Some(&Local { pid, start_time })
    }

    /// Whether local process `pid` has a thread named `comm` (the kernel reports the name of
    /// the thread that created a socket, which in a threaded program is not the process's).
    pub fn has_thread_named(&self, pid: Pid, comm: &[u8]) -> bool {
        let Ok(tasks) = std::fs::read_dir(self.proc_root.join(pid.to_string()).join("task")) else {
            return false;
        };
        tasks.flatten().any(|task| {
            std::fs::read(task.path().join("comm"))
                .is_ok_and(|name| name.strip_suffix(b"\n").unwrap_or(&name) == comm)
        })
    }

    /// Processes whose host tgid is known.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    fn alive(&self, local: Local) -> bool {
        info::identity(&self.proc_root, local.pid).is_some_and(|i| i.start_time == local.start_time)
    }

    fn forget_host(&mut self, host: u32) {
        if let Some(local) = self.by_host.remove(&host)
            && self
                .by_local
                .get(&local.pid)
                .is_some_and(|(h, _)| *h == host)
        {
            self.by_local.remove(&local.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::tests::FakeProc;

    #[test]
    fn this_machines_proc_is_read() {
        // The test runs in some namespace; what matters is that the answer is read, and that
        // it agrees with the inode of our own namespace when /proc is ours.
        assert!(numbers_as_the_kernel(Path::new("/proc")).is_some());
        assert_eq!(numbers_as_the_kernel(Path::new("/nonexistent")), None);
    }

    #[test]
    fn a_tie_holds_while_its_process_runs() {
        let fake = FakeProc::new();
        fake.add(7, 1, "curl", 1000, &[]);
        let mut t = PidTranslation::new(fake.dir.path());
        t.learn(40_007, 7, 1000);
        assert_eq!(t.local(40_007), Some(7));
        assert_eq!(t.host(7, 1000), Some(40_007));
        assert_eq!(t.host(7, 999), None, "another process under the same pid");
        assert_eq!(t.local(40_008), None, "never learnt");

        // Pid 7 is reused by another process: the tie is gone, never handed to the new one.
        fake.add(7, 1, "curl", 2000, &[]);
        assert_eq!(t.local(40_007), None);
        assert_eq!(t.host(7, 2000), None);
        assert!(t.is_empty());
    }

    #[test]
    fn a_contradiction_drops_the_tie_instead_of_guessing() {
        let fake = FakeProc::new();
        fake.add(7, 1, "worker", 1000, &[]);
        fake.add(8, 1, "worker", 1001, &[]);
        let mut t = PidTranslation::new(fake.dir.path());
        t.learn(40_007, 7, 1000);
        // The same host tgid's socket is found held by another living process.
        t.learn(40_007, 8, 1001);
        assert_eq!(t.local(40_007), None);
        assert_eq!((t.host(7, 1000), t.host(8, 1001)), (None, None));
        // Once the first has gone, a new tie can be learnt.
        t.learn(40_007, 7, 1000);
        fake.remove(7);
        t.learn(40_007, 8, 1001);
        assert_eq!(t.local(40_007), Some(8));
    }

    #[test]
    fn a_creator_is_recognised_by_any_of_its_threads_names() {
        let fake = FakeProc::new();
        fake.add(7, 1, "rates-main", 1000, &[]);
        for (tid, name) in [(7, "rates-main"), (9, "transfers_child")] {
            let task = fake.dir.path().join(format!("7/task/{tid}"));
            std::fs::create_dir_all(&task).unwrap();
            std::fs::write(task.join("comm"), format!("{name}\n")).unwrap();
        }
        let t = PidTranslation::new(fake.dir.path());
        assert!(t.has_thread_named(7, b"transfers_child"));
        assert!(t.has_thread_named(7, b"rates-main"));
        assert!(!t.has_thread_named(7, b"curl"));
        assert!(!t.has_thread_named(8, b"rates-main"), "no such process");
    }

    #[test]
    fn prune_forgets_processes_that_have_gone() {
        let fake = FakeProc::new();
        fake.add(7, 1, "a", 1000, &[]);
        fake.add(8, 1, "b", 1000, &[]);
        let mut t = PidTranslation::new(fake.dir.path());
        t.learn(40_007, 7, 1000);
        t.learn(40_008, 8, 1000);
        fake.remove(8);
        t.prune();
        assert_eq!(t.len(), 1);
        assert_eq!(t.host(8, 1000), None);
        assert_eq!(t.host(7, 1000), Some(40_007));
    }
}
