//! What shaper knows about one process, read from `/proc/<pid>` as bytes.
//!
//! Not with procfs's `stat()`/`status()`/`cmdline()`: they read the files into `String`s and fail
//! (or drop arguments) on bytes that are not UTF-8, which any process can put in its own name.

use rustc_hash::FxHashMap as HashMap;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ProcString;

pub type Pid = u32;

/// A process as the policy sees it. Read once per process lifetime (pid + start time) and cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: Pid,
    pub ppid: Pid,
    /// The kernel's short name (`comm`, at most 15 bytes), as the bytes the process set.
    pub name: ProcString,
    /// The executable's path; `None` when it cannot be read (kernel threads, or another user's
    /// process without CAP_SYS_PTRACE).
    #[serde(default)]
    pub exe: Option<ProcString>,
    pub cmdline: Vec<ProcString>,
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

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            // A process that exits while being read makes its files vanish or return ESRCH.
            Some(libc::ENOENT | libc::ESRCH) => ReadError::Gone,
            _ => ReadError::Other(e.to_string()),
        }
    }
}

/// The fields of `/proc/<pid>/stat` shaper uses. The name sits between the first `(` and the
/// *last* `)`: it may itself contain parentheses, spaces, newlines and any other byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub name: ProcString,
    pub ppid: Pid,
    pub start_time: u64,
}

/// Parses `/proc/<pid>/stat` as bytes (`None` when malformed).
pub fn parse_stat(bytes: &[u8]) -> Option<Stat> {
    let open = bytes.iter().position(|&b| b == b'(')?;
    let close = bytes.iter().rposition(|&b| b == b')')?;
    let name = bytes.get(open + 1..close)?;
    let rest = std::str::from_utf8(bytes.get(close + 1..)?).ok()?;
    // After the name: state (field 3), ppid (4), … starttime (22).
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    Some(Stat {
        name: ProcString::from(name),
        ppid: fields.get(1)?.parse::<i64>().ok()?.try_into().unwrap_or(0),
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn read_stat(proc_root: &Path, pid: Pid) -> Result<Stat, ReadError> {
    let bytes = std::fs::read(proc_root.join(pid.to_string()).join("stat"))?;
    parse_stat(&bytes).ok_or_else(|| ReadError::Other(format!("/proc/{pid}/stat is malformed")))
}

/// What tells one program running under a pid from another: the process (pid, start time) and
/// the program it runs (its name and executable), which `exec` changes while the pid and start
/// time stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub start_time: u64,
    pub name: ProcString,
    pub exe: Option<ProcString>,
}

/// The identity of `pid` now, or `None` when it is gone: one read of `stat` and one readlink.
pub fn identity(proc_root: &Path, pid: Pid) -> Option<Identity> {
    let stat = read_stat(proc_root, pid).ok()?;
    Some(Identity {
        start_time: stat.start_time,
        name: stat.name,
        exe: read_exe(proc_root, pid),
    })
}

fn read_exe(proc_root: &Path, pid: Pid) -> Option<ProcString> {
    std::fs::read_link(proc_root.join(pid.to_string()).join("exe"))
        .ok()
        .map(|p| ProcString::from(p.as_os_str().as_bytes()))
}

/// `/proc/<pid>/cmdline` split at NULs, keeping empty arguments (`""` is an argument too).
pub fn split_cmdline(bytes: &[u8]) -> Vec<ProcString> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|&b| b == 0).map(ProcString::from).collect()
}

/// The real uid and gid from `/proc/<pid>/status` (the second line of each is "real, effective,
/// saved, filesystem"). Read as bytes: the `Name:` line holds the process's own bytes.
fn parse_ids(status: &[u8]) -> Option<(u32, u32)> {
    let field = |key: &[u8]| -> Option<u32> {
        let line = status.split(|&b| b == b'\n').find(|l| l.starts_with(key))?;
        std::str::from_utf8(&line[key.len()..])
            .ok()?
            .split_ascii_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field(b"Uid:")?, field(b"Gid:")?))
}

/// Reads one process; `users` caches uid → name lookups across calls. Ancestors are filled by the
/// table, which can reuse what it already knows. Every field the process can set is read as
/// bytes, so no name, argument or path can make the process unreadable.
pub fn read_process(
    proc_root: &Path,
    pid: Pid,
    users: &mut HashMap<u32, Option<String>>,
) -> Result<Process, ReadError> {
    let dir = proc_root.join(pid.to_string());
    let stat = read_stat(proc_root, pid)?;
    let (uid, gid) = parse_ids(&std::fs::read(dir.join("status"))?)
        .ok_or_else(|| ReadError::Other(format!("/proc/{pid}/status has no Uid/Gid")))?;
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|b| split_cmdline(&b))
        .unwrap_or_default();
    let exe = read_exe(proc_root, pid);
    let cgroups = std::fs::read(dir.join("cgroup")).unwrap_or_default();
    let cgroups = String::from_utf8_lossy(&cgroups);
    let lines: Vec<(u32, Vec<String>, &str)> = cgroups
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts.next()?;
            let controllers = if controllers.is_empty() {
                Vec::new()
            } else {
                controllers.split(',').map(str::to_string).collect()
            };
            Some((hierarchy, controllers, parts.next()?))
        })
        .collect();
    let cgroup = cgroup_path(lines.iter().map(|(h, c, p)| (*h, c.as_slice(), *p)));
    let unit = cgroup
        .as_deref()
        .and_then(unit_of_cgroup)
        .map(str::to_string);
    let user = users
        .entry(uid)
        .or_insert_with(|| {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .clone();
    Ok(Process {
        pid,
        ppid: stat.ppid,
        name: stat.name,
        exe,
        cmdline,
        uid,
        user,
        gid,
        cgroup,
        unit,
        start_time: stat.start_time,
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

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn stat_names_with_any_bytes_and_parentheses_parse() {
        let mut line = b"4242 (\xff\xfe) (x\nblockme) S 17 4242 4242 0 -1 4194560".to_vec();
        line.extend_from_slice(b" 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0\n");
        let stat = parse_stat(&line).unwrap();
        assert_eq!(stat.name.as_bytes(), b"\xff\xfe) (x\nblockme");
        assert_eq!((stat.ppid, stat.start_time), (17, 987654));
        assert_eq!(parse_stat(b"4242 (x"), None);
    }

    #[test]
    fn cmdline_keeps_empty_and_non_utf8_arguments() {
        let args = split_cmdline(b"python3\0\0-c\0\xffx\0");
        let args: Vec<&[u8]> = args.iter().map(ProcString::as_bytes).collect();
        assert_eq!(args, [&b"python3"[..], b"", b"-c", b"\xffx"]);
        assert!(split_cmdline(b"").is_empty());
    }

    #[test]
    fn ids_come_from_the_real_uid_and_gid_whatever_the_name() {
        let status = b"Name:\t\xff\xfe\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t100\t0\t0\t0\n";
        assert_eq!(parse_ids(status), Some((1000, 100)));
    }
}
