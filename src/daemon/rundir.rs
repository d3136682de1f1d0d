//! The daemon's files in its runtime dir: the pid file, locked for the daemon's lifetime, and
//! the control socket.
//!
//! Whoever cleans the runtime dir while the daemon runs (`rm -rf /run/shaper`, a tmpfiles rule,
//! a script) would leave a daemon that `status` and `stop` cannot find, stoppable only by a
//! signal. So the daemon looks every [`CHECK_INTERVAL`] ([`RuntimeDir::restore`]) and puts back
//! what is gone: the dir (with the checks made at start), the pid file (locked again; if another
//! daemon has taken the dir meanwhile, it is left alone) and the socket (same mode and group).
//! Files are told apart by device and inode, so a daemon never removes or replaces what is not
//! its own.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

pub const SOCKET_NAME: &str = "shaper.sock";
pub const PID_NAME: &str = "shaper.pid";
/// How often the daemon checks that its socket and pid file are still in place.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Device and inode: which file a path names.
type FileId = (u64, u64);

/// The file at `path` now, without following a symlink; `None` if there is none.
fn id_at(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The pid file, locked for the daemon's lifetime: a second daemon on the same runtime dir
/// finds it locked and refuses to start.
pub struct PidLock {
    path: PathBuf,
    id: FileId,
    _file: std::fs::File,
}

impl PidLock {
    /// Opens (never through a symlink) and locks the pid file in `dir`, which the caller has
    /// checked ([`crate::trust::private_dir`]).
    pub fn acquire(dir: &Path) -> anyhow::Result<PidLock> {
        let path = dir.join(PID_NAME);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| {
                format!(
                    "cannot open the pid file {} (if it is a symlink, remove it)",
                    path.display()
                )
            })?;
        let meta = file.metadata()?;
        if !meta.is_file() || meta.nlink() != 1 {
            anyhow::bail!(
                "the pid file {} is not a plain file (a hard link or a special file); remove it",
                path.display()
            );
        }
        if rustix::fs::flock(
            file.as_fd(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .is_err()
        {
            let mut pid = String::new();
            let _ = (&file).take(32).read_to_string(&mut pid);
            anyhow::bail!(
                "another shaper (pid {}) is running with runtime dir {}; stop it with `shaper stop` \
                 or use another --runtime-dir",
                pid.trim(),
                dir.display()
            );
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(PidLock {
            path,
            id: (meta.dev(), meta.ino()),
            _file: file,
        })
    }

    /// Whether the pid file's path still names this (locked) file.
    fn in_place(&self) -> bool {
        id_at(&self.path) == Some(self.id)
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        // Not another daemon's pid file, put there after ours was removed.
        if self.in_place() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Who may use the control socket besides root: `status_group`'s name and gid.
pub type SocketGroup = Option<(Arc<str>, u32)>;

/// The runtime dir and the daemon's files in it.
pub struct RuntimeDir {
    dir: PathBuf,
    /// Running as root: the dir must be root's and writable by no one else.
    strict: bool,
    group: SocketGroup,
    pid: PidLock,
    /// The socket this daemon bound, once bound.
    socket: Option<FileId>,
    /// A failure to restore was logged (once, until restored).
    complained: bool,
}

impl RuntimeDir {
    /// Locks the pid file in `dir`, which the caller has checked ([`crate::trust::private_dir`]
    /// with `strict`).
    pub fn acquire(dir: &Path, strict: bool, group: SocketGroup) -> anyhow::Result<RuntimeDir> {
        Ok(RuntimeDir {
            dir: dir.to_path_buf(),
            strict,
            group,
            pid: PidLock::acquire(dir)?,
            socket: None,
            complained: false,
        })
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_NAME)
    }

    /// Binds the control socket (replacing a stale one: the pid lock is ours), mode 0600, or
    /// 0660 and the status group's. Needs a tokio runtime.
    pub fn bind(&mut self) -> anyhow::Result<tokio::net::UnixListener> {
        let path = self.socket_path();
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot create the control socket {}", path.display()))?;
        let mode = match &self.group {
            Some((name, gid)) => {
                std::os::unix::fs::chown(&path, None, Some(*gid)).with_context(|| {
                    format!(
                        "cannot give the control socket {} to status_group {name:?}",
                        path.display(),
                    )
                })?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        self.socket = id_at(&path);
        Ok(listener)
    }

    /// Removes the control socket, if the path still names the one this daemon bound.
    pub fn remove_socket(&self) {
        let path = self.socket_path();
        if self.socket.is_some() && id_at(&path) == self.socket {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Puts back what was removed of the dir, the pid file and the socket (see the module docs);
    /// the new listener if the socket was bound again. A failure is logged once and tried again
    /// at the next call.
    pub fn restore(&mut self) -> Option<tokio::net::UnixListener> {
        let pid_ok = self.pid.in_place();
        let socket_ok = self.socket.is_none() || id_at(&self.socket_path()) == self.socket;
        if pid_ok && socket_ok {
            return None;
        }
        match self.put_back(pid_ok, socket_ok) {
            Ok(listener) => {
                tracing::warn!(
                    "the runtime dir {} lost this daemon's {}; put back",
                    self.dir.display(),
                    match (pid_ok, socket_ok) {
                        (false, false) => "pid file and control socket",
                        (false, true) => "pid file",
                        _ => "control socket",
                    }
                );
                self.complained = false;
                listener
            }
            Err(e) => {
                if !self.complained {
                    tracing::warn!(
                        "{e:#}; `shaper status` and `shaper stop` cannot reach this daemon until \
                         its runtime dir {} is back (SIGTERM still stops it)",
                        self.dir.display()
                    );
                    self.complained = true;
                }
                None
            }
        }
    }

    fn put_back(
        &mut self,
        pid_ok: bool,
        socket_ok: bool,
    ) -> anyhow::Result<Option<tokio::net::UnixListener>> {
        crate::trust::private_dir(&self.dir, self.strict).context("the runtime dir")?;
        if !pid_ok {
            // Fails if another daemon has taken the dir meanwhile: its socket is left alone.
            self.pid = PidLock::acquire(&self.dir)?;
        }
        if socket_ok {
            return Ok(None);
        }
        self.bind().map(Some)
    }
}
