//! The walk of `/proc/*/fd` that joins socket inodes to the processes holding them.
//!
//! One `readlink` per open file descriptor on the system is the whole cost, so it is kept as lean
//! as the kernel allows: directories are opened relative to each other (`openat`), read with
//! `getdents64` into one reused buffer, and links are read into a stack buffer; nothing allocates
//! per descriptor. A process that exits mid-walk is skipped.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags, RawDir, openat, readlinkat_raw};
use rustix::io::Errno;

use super::Pid;

/// What a walk found.
#[derive(Debug, Default)]
pub struct Walk {
    /// For each wanted inode, the pids holding it (ascending).
    pub holders: HashMap<u64, Vec<Pid>>,
    /// Processes whose fd directory could not be read for lack of privilege.
    pub denied: usize,
}

/// Walks every process under `proc_root`, recording which of `wanted` inodes each one holds.
pub fn walk(proc_root: &Path, wanted: &HashSet<u64>) -> std::io::Result<Walk> {
    let root = rustix::fs::open(
        proc_root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Walk::default();
    let mut proc_buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut fd_buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut pids = Vec::new();
    let mut dir = RawDir::new(&root, &mut proc_buf);
    while let Some(entry) = dir.next() {
        let entry = entry?;
        if let Some(pid) = parse_decimal(entry.file_name().to_bytes()) {
            pids.push(pid as Pid);
        }
    }
    for pid in pids {
        let fd_dir = match openat(
            &root,
            format!("{pid}/fd").as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ACCESS | Errno::PERM) => {
                out.denied += 1;
                continue;
            }
            Err(_) => continue, // exited, or a kernel thread without fds
        };
        scan_fds(&fd_dir, pid, wanted, &mut fd_buf, &mut out.holders);
    }
    for holders in out.holders.values_mut() {
        holders.sort_unstable();
        holders.dedup();
    }
    Ok(out)
}

fn scan_fds(
    fd_dir: &OwnedFd,
    pid: Pid,
    wanted: &HashSet<u64>,
    buf: &mut [MaybeUninit<u8>],
    holders: &mut HashMap<u64, Vec<Pid>>,
) {
    let mut dir = RawDir::new(fd_dir, buf);
    let mut link = [0u8; 64];
    while let Some(entry) = dir.next() {
        let Ok(entry) = entry else { return };
        let name = entry.file_name();
        if name.to_bytes().first().is_none_or(|b| !b.is_ascii_digit()) {
            continue; // "." and ".."
        }
        let Ok(len) = readlinkat_raw(fd_dir, name, &mut link[..]) else {
            continue; // closed since the directory was read
        };
        if let Some(inode) = socket_inode(&link[..len.min(link.len())])
            && wanted.contains(&inode)
        {
            holders.entry(inode).or_default().push(pid);
        }
    }
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &[u8]) -> Option<u64> {
    link.strip_prefix(b"socket:[")?
        .strip_suffix(b"]")
        .and_then(parse_decimal)
}

fn parse_decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 19 {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
        assert_eq!(parse_decimal(b"99999999999999999999"), None);
    }

    #[test]
    fn walk_finds_this_process_socket() {
        use std::os::unix::fs::MetadataExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd_path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&listener)
        );
        let inode = std::fs::metadata(&fd_path).unwrap().ino();
        let walk = walk(Path::new("/proc"), &HashSet::from_iter([inode])).unwrap();
        assert_eq!(walk.holders[&inode], vec![std::process::id()]);
    }
}
