//! What shaper knows about one process, read from `/proc/<pid>` with procfs.

use rustc_hash::FxHashMap as HashMap;
use std::path::Path;

use procfs::process::Process as ProcfsProcess;
use serde::{Deserialize, Serialize};

pub type Pid = u32;

/// A process as the policy sees it. Read once per process lifetime (pid + start time) and cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: Pid,
    pub ppid: Pid,
    /// The kernel's short name (`comm`, at most 15 bytes).
    pub name: String,
    /// The executable's path; `None` when it cannot be read (kernel threads, or another user's
    /// process without CAP_SYS_PTRACE).
    #[serde(default)]
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    /// Real uid and gid.
    pub uid: u32,
    #[serde(default)]
    pub user: Option<String>,
    pub gid: u32,
    /// cgroup v2 path (`/system.slice/nginx.service`), or the systemd v1 hierarchy's on hybrid
    /// systems where the v2 path is just `/`.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The systemd unit the process runs in (`nginx.service`, `app-firefox-1234.scope`).
    #[serde(default)]
    pub unit: Option<String>,
    /// Start time in clock ticks since boot: with the pid, it identifies the process, so a reused
    /// pid is never taken for the process that had it before.
    pub start_time: u64,
    /// Parent, grandparent, … up to (not including) pid 0; nearest first.
    #[serde(default)]
    pub ancestors: Vec<Pid>,
}

/// Why a process could not be read. `Gone` is the ordinary race with an exiting process.
#[derive(Debug)]
pub enum ReadError {
    Gone,
    Other(String),
}

impl From<procfs::ProcError> for ReadError {
    fn from(e: procfs::ProcError) -> Self {
        match e {
            procfs::ProcError::NotFound(_) => ReadError::Gone,
            // A process that exits while being read makes its files return ESRCH / empty reads.
            procfs::ProcError::Io(ref io, _) if io.raw_os_error() == Some(libc::ESRCH) => {
                ReadError::Gone
            }
            other => ReadError::Other(other.to_string()),
        }
    }
}

/// The start time of `pid`, to tell whether a cached process is still the one running.
pub fn start_time(proc_root: &Path, pid: Pid) -> Option<u64> {
    let p = ProcfsProcess::new_with_root(proc_root.join(pid.to_string())).ok()?;
    p.stat().ok().map(|s| s.starttime)
}

/// Reads one process; `users` caches uid → name lookups across calls. Ancestors are filled by the
/// table, which can reuse what it already knows.
pub fn read_process(
    proc_root: &Path,
    pid: Pid,
    users: &mut HashMap<u32, Option<String>>,
) -> Result<Process, ReadError> {
    let p = ProcfsProcess::new_with_root(proc_root.join(pid.to_string()))?;
    let stat = p.stat()?;
    let status = p.status()?;
    let cmdline = p.cmdline().unwrap_or_default();
    let exe = p.exe().ok().map(|e| e.to_string_lossy().into_owned());
    let cgroups = p.cgroups().map(|c| c.0).unwrap_or_default();
    let cgroup = cgroup_path(
        cgroups
            .iter()
            .map(|c| (c.hierarchy, c.controllers.as_slice(), c.pathname.as_str())),
    );
    let unit = cgroup
        .as_deref()
        .and_then(unit_of_cgroup)
        .map(str::to_string);
    let user = users
        .entry(status.ruid)
        .or_insert_with(|| {
            nix::unistd::User::from_uid(status.ruid.into())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .clone();
    Ok(Process {
        pid,
        ppid: u32::try_from(stat.ppid).unwrap_or(0),
        name: stat.comm,
        exe,
        cmdline,
        uid: status.ruid,
        user,
        gid: status.rgid,
        cgroup,
        unit,
        start_time: stat.starttime,
        ancestors: Vec::new(),
    })
}

/// Picks the cgroup path from `/proc/<pid>/cgroup` lines `(hierarchy, controllers, path)`: the v2
/// line (`0::`), unless it is the bare root on a hybrid system where systemd's v1 hierarchy
/// (`name=systemd`) still says where the process is.
pub fn cgroup_path<'a>(
    lines: impl Iterator<Item = (u32, &'a [String], &'a str)>,
) -> Option<String> {
    let mut v2 = None;
    let mut systemd_v1 = None;
    for (hierarchy, controllers, path) in lines {
        if hierarchy == 0 && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.iter().any(|c| c == "name=systemd") {
            systemd_v1 = Some(path);
        }
    }
    match (v2, systemd_v1) {
        (Some("/") | None, Some(v1)) if v1 != "/" => Some(v1.to_string()),
        (Some(v2), _) => Some(v2.to_string()),
        (None, v1) => v1.map(str::to_string),
    }
}

/// The innermost systemd unit in a cgroup path: the last component that is a service or scope.
/// `/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-42.scope` →
/// `app-firefox-42.scope`.
pub fn unit_of_cgroup(path: &str) -> Option<&str> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_from_cgroup_paths() {
        assert_eq!(
            unit_of_cgroup("/system.slice/nginx.service"),
            Some("nginx.service")
        );
        assert_eq!(
            unit_of_cgroup(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-42.scope"
            ),
            Some("app-firefox-42.scope")
        );
        assert_eq!(
            unit_of_cgroup("/user.slice/user-1000.slice/session-3.scope"),
            Some("session-3.scope")
        );
        assert_eq!(unit_of_cgroup("/"), None);
        assert_eq!(unit_of_cgroup("/docker/abc"), None);
    }

    #[test]
    fn cgroup_v2_preferred_but_hybrid_root_falls_back_to_systemd_v1() {
        let none: Vec<String> = vec![];
        let systemd = vec!["name=systemd".to_string()];
        let cpu = vec!["cpu".to_string()];
        let lines = [
            (1, systemd.as_slice(), "/system.slice/sshd.service"),
            (2, cpu.as_slice(), "/"),
            (0, none.as_slice(), "/"),
        ];
        assert_eq!(
            cgroup_path(lines.into_iter()).as_deref(),
            Some("/system.slice/sshd.service")
        );
        let lines = [(0, none.as_slice(), "/system.slice/nginx.service")];
        assert_eq!(
            cgroup_path(lines.into_iter()).as_deref(),
            Some("/system.slice/nginx.service")
        );
        let lines = [(0, none.as_slice(), "/"), (1, systemd.as_slice(), "/")];
        assert_eq!(cgroup_path(lines.into_iter()).as_deref(), Some("/"));
    }
}
