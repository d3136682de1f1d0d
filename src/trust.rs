//! Files and folders a root daemon may trust, with sshd's StrictModes rules: a file shaper reads
//! as root (the policy, a module it requires, a rate file) and every folder on its way from `/`
//! must be owned by root and not writable by group or others, except folders with the sticky bit
//! (like `/tmp`), where others cannot rename or remove root's entries.
//!
//! The check cannot race with the read: the path is resolved once, then walked from `/` one
//! component at a time with `openat(O_NOFOLLOW)`, each folder checked (`fstat`) before the next
//! component is looked up in it, and the file is read from the descriptor that was checked. A
//! component swapped for a symlink after the resolution makes the open fail instead of being
//! followed.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, Stat};

/// The largest file [`read_small`] reads; anything longer is an error, not a huge allocation.
pub const SMALL_FILE_LIMIT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot open {}: {error}", path.display())]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Someone other than root could change the file (or a folder on its path).
    #[error("refusing {path}: {reason}, and shaper runs as root. Fix: {fix}")]
    Unsafe {
        /// The path as given, with what it resolves to when that differs.
        path: String,
        reason: String,
        fix: String,
    },
    /// A FIFO, device or folder where a regular file was expected.
    #[error("refusing {}: not a regular file", path.display())]
    NotRegular { path: PathBuf },
    #[error("refusing {}: longer than {limit} bytes", path.display())]
    TooLong { path: PathBuf, limit: u64 },
}

impl TrustError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, TrustError::Open { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
    }
}

fn open_error(path: &Path, e: impl Into<std::io::Error>) -> TrustError {
    TrustError::Open {
        path: path.to_path_buf(),
        error: e.into(),
    }
}

/// What is being checked: an ancestor folder (sticky folders allowed), the final folder shaper
/// writes in (never writable by others, sticky or not), or the file itself.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Ancestor,
    OwnFolder,
    File,
}

/// The StrictModes rule for one step of the walk.
fn check_one(shown: &str, at: &Path, st: &Stat, role: Role) -> Result<(), TrustError> {
    let mode = st.st_mode & 0o7777;
    let sticky = mode & 0o1000 != 0;
    let not_root = st.st_uid != 0;
    let writable = mode & 0o022 != 0 && !(role == Role::Ancestor && sticky);
    if !not_root && !writable {
        return Ok(());
    }
    let what = match role {
        Role::File => "it".to_string(),
        _ => format!("the folder {}", at.display()),
    };
    let mut reasons = Vec::new();
    if not_root {
        reasons.push(format!("{what} is owned by uid {}, not root", st.st_uid));
    }
    if writable {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, false) => "its group",
            (false, true) => "everyone",
            _ => "its group and everyone",
        };
        let subject = if not_root {
            "writable"
        } else {
            &*format!("{what} is writable")
        };
        reasons.push(format!("{subject} by {who} (mode {mode:04o})"));
    }
    let p = at.display();
    let fix = match (role, not_root, writable) {
        (Role::OwnFolder, _, _) => format!("`chown root:root {p}; chmod 755 {p}`"),
        (_, true, true) => format!("`chown root:root {p}; chmod go-w {p}`"),
        (_, true, false) => format!("`chown root:root {p}`"),
        _ => format!("`chmod go-w {p}`"),
    };
    let fix = if role == Role::Ancestor {
        format!("{fix}, or move it to a folder only root can write")
    } else {
        fix
    };
    Err(TrustError::Unsafe {
        path: shown.to_string(),
        reason: reasons.join(" and "),
        fix,
    })
}

/// `path` resolved (absolute, no symlinks), and the text that names it in messages.
fn resolve(path: &Path) -> Result<(PathBuf, String), TrustError> {
    let resolved = std::fs::canonicalize(path).map_err(|e| open_error(path, e))?;
    let shown = if resolved == path {
        path.display().to_string()
    } else {
        format!("{} (which is {})", path.display(), resolved.display())
    };
    Ok((resolved, shown))
}

/// Walks the folder `resolved` from `/`, checking every folder on the way; returns the
/// descriptor of the last one. `path` and `shown` name what is being opened in messages.
fn walk(
    path: &Path,
    resolved: &Path,
    shown: &str,
    role_of_last_folder: Role,
) -> Result<OwnedFd, TrustError> {
    let names: Vec<_> = resolved
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut at = PathBuf::from("/");
    let mut fd =
        rustix::fs::open("/", dir_flags, Mode::empty()).map_err(|e| open_error(path, e))?;
    let last = names.len();
    let stat = |fd: &OwnedFd| rustix::fs::fstat(fd).map_err(|e| open_error(path, e));
    let role = |i: usize| {
        if i == last {
            role_of_last_folder
        } else {
            Role::Ancestor
        }
    };
    check_one(shown, &at, &stat(&fd)?, role(0))?;
    for (i, name) in names.iter().enumerate() {
        at.push(name);
        fd = rustix::fs::openat(&fd, *name, dir_flags, Mode::empty()).map_err(|e| {
            if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
                TrustError::Unsafe {
                    path: shown.to_string(),
                    reason: format!("{} changed while it was being checked", at.display()),
                    fix: "find out who is swapping files there".into(),
                }
            } else {
                open_error(path, e)
            }
        })?;
        check_one(shown, &at, &stat(&fd)?, role(i + 1))?;
    }
    Ok(fd)
}

/// Opens a file only root can change, through folders only root can change (see the module
/// documentation). FIFOs and devices are refused, so a read cannot block or never end.
pub fn open_trusted(path: &Path) -> Result<File, TrustError> {
    let (resolved, shown) = resolve(path)?;
    let (Some(parent), Some(name)) = (resolved.parent(), resolved.file_name()) else {
        return Err(TrustError::NotRegular {
            path: path.to_path_buf(),
        });
    };
    let dir = walk(path, parent, &shown, Role::Ancestor)?;
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = rustix::fs::openat(&dir, name, flags, Mode::empty()).map_err(|e| {
        if e == rustix::io::Errno::LOOP {
            TrustError::Unsafe {
                path: shown.clone(),
                reason: "it became a symlink while it was being checked".into(),
                fix: "find out who is swapping files there".into(),
            }
        } else {
            open_error(path, e)
        }
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| open_error(path, e))?;
    if !rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() {
        return Err(TrustError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    check_one(&shown, &resolved, &st, Role::File)?;
    Ok(File::from(fd))
}

/// Opens a regular file: through [`open_trusted`] when `strict`, else plainly (still refusing
/// FIFOs and devices).
pub fn open_regular(path: &Path, strict: bool) -> Result<File, TrustError> {
    if strict {
        return open_trusted(path);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    let is_file = file
        .metadata()
        .map_err(|e| open_error(path, e))?
        .file_type()
        .is_file();
    if !is_file {
        return Err(TrustError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// Reads a whole text file opened with [`open_regular`].
pub fn read_text(path: &Path, strict: bool) -> Result<String, TrustError> {
    let mut text = String::new();
    open_regular(path, strict)?
        .read_to_string(&mut text)
        .map_err(|e| open_error(path, e))?;
    Ok(text)
}

/// Reads a file of at most [`SMALL_FILE_LIMIT`] bytes opened with [`open_regular`] (a rate file:
/// no `/dev/zero` can make it allocate without end).
pub fn read_small(path: &Path, strict: bool) -> Result<Vec<u8>, TrustError> {
    let mut bytes = Vec::new();
    open_regular(path, strict)?
        .take(SMALL_FILE_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| open_error(path, e))?;
    if bytes.len() as u64 > SMALL_FILE_LIMIT {
        return Err(TrustError::TooLong {
            path: path.to_path_buf(),
            limit: SMALL_FILE_LIMIT,
        });
    }
    Ok(bytes)
}

/// Creates `dir` (mode 0755, with missing parents) and, when `strict` (running as root), checks
/// that only root can write in it or replace it: the folder itself owned by root and writable by
/// no one else, every folder above it as for a policy file. Shaper's runtime and state folders
/// hold the control socket, the pid file and usage; another user who could write there could
/// replace the socket or plant links.
pub fn private_dir(dir: &Path, strict: bool) -> Result<(), TrustError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| open_error(dir, e))?;
    if strict {
        check_private_dir(dir)?;
    }
    Ok(())
}

/// Checks that only root can write in `dir` or replace it (see [`private_dir`]), e.g. before
/// trusting the control socket in it.
pub fn check_private_dir(dir: &Path) -> Result<(), TrustError> {
    let (resolved, shown) = resolve(dir)?;
    walk(dir, &resolved, &shown, Role::OwnFolder).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const NOBODY: u32 = 65534;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
    }

    fn unsafe_message(r: Result<impl std::fmt::Debug, TrustError>) -> String {
        match r {
            Err(e @ TrustError::Unsafe { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A root-owned 0755 folder in /tmp (sticky, root's): the baseline everything passes in.
    fn root_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        chmod(d.path(), 0o755);
        d
    }

    #[test]
    fn a_root_file_in_root_folders_under_sticky_tmp_is_read() {
        let d = root_dir();
        let f = d.path().join("p.lua");
        std::fs::write(&f, "x").unwrap();
        assert_eq!(read_text(&f, true).unwrap(), "x");
        // Through a symlink that stays in root's folders: checked at its target.
        let link = d.path().join("link.lua");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(read_text(&link, true).unwrap(), "x");
    }

    #[test]
    fn a_folder_others_can_write_is_refused_naming_it_and_the_fix() {
        let d = root_dir();
        let sub = d.path().join("open");
        std::fs::create_dir(&sub).unwrap();
        let f = sub.join("p.lua");
        std::fs::write(&f, "x").unwrap();
        chmod(&sub, 0o777);
        let m = unsafe_message(read_text(&f, true));
        let s = sub.display();
        assert!(
            m.contains(&format!(
                "the folder {s} is writable by its group and everyone (mode 0777)"
            )),
            "{m}"
        );
        assert!(m.contains(&format!("`chmod go-w {s}`")), "{m}");
        // A folder owned by another user is refused the same way, even at mode 0755.
        chmod(&sub, 0o755);
        chown(&sub, NOBODY);
        let m = unsafe_message(read_text(&f, true));
        assert!(
            m.contains(&format!("the folder {s} is owned by uid 65534")),
            "{m}"
        );
        assert!(m.contains(&format!("`chown root:root {s}`")), "{m}");
        // Without strict the same file reads.
        assert_eq!(read_text(&f, false).unwrap(), "x");
    }

    #[test]
    fn a_symlink_to_another_users_file_is_refused_at_its_target() {
        let d = root_dir();
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        chown(&theirs, NOBODY);
        let evil = theirs.join("evil.lua");
        std::fs::write(&evil, "os.execute('id')").unwrap();
        chown(&evil, NOBODY);
        let link = d.path().join("policy.lua");
        std::os::unix::fs::symlink(&evil, &link).unwrap();
        let m = unsafe_message(read_text(&link, true));
        assert!(
            m.contains(&format!(
                "refusing {} (which is {})",
                link.display(),
                evil.display()
            )),
            "{m}"
        );
        // A file another user owns in root's folder: refused for its owner.
        let owned = d.path().join("owned.lua");
        std::fs::write(&owned, "x").unwrap();
        chown(&owned, NOBODY);
        let m = unsafe_message(read_text(&owned, true));
        assert!(m.contains("it is owned by uid 65534, not root"), "{m}");
        chown(&owned, 0);
        chmod(&owned, 0o666);
        let m = unsafe_message(read_text(&owned, true));
        assert!(
            m.contains("it is writable by its group and everyone (mode 0666)"),
            "{m}"
        );
    }

    #[test]
    fn a_sticky_folder_is_fine_above_but_not_as_our_own_folder() {
        let d = root_dir();
        let sticky = d.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        chmod(&sticky, 0o1777);
        let f = sticky.join("rate");
        std::fs::write(&f, "1mbit").unwrap();
        assert_eq!(read_text(&f, true).unwrap(), "1mbit");
        let m = unsafe_message(private_dir(&sticky, true));
        let s = sticky.display();
        assert!(
            m.contains(&format!("`chown root:root {s}; chmod 755 {s}`")),
            "{m}"
        );
        // A missing folder is created 0755 and accepted.
        let run = d.path().join("a/run");
        private_dir(&run, true).unwrap();
        let mode = std::fs::metadata(&run).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn fifos_and_huge_files_are_refused_without_blocking() {
        let d = root_dir();
        let fifo = d.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(
            read_small(&fifo, false),
            Err(TrustError::NotRegular { .. })
        ));
        assert!(matches!(
            read_small(&fifo, true),
            Err(TrustError::NotRegular { .. })
        ));
        let big = d.path().join("big");
        std::fs::write(&big, vec![b'1'; 10_000]).unwrap();
        assert!(matches!(
            read_small(&big, true),
            Err(TrustError::TooLong { .. })
        ));
    }
}
