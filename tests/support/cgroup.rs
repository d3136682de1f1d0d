//! A cgroup v2 directory a test creates under the mount (never the machine's root cgroup is
//! attached to), removed on drop once its processes are gone.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use shaper::classify::cgroup2_root;

pub struct TestCgroup {
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = cgroup2_root().expect("these tests need a cgroup v2 hierarchy");
        let dir = root.join(format!("shaper-bpftest-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TestCgroup { dir }
    }

    /// Makes `cmd` start inside this cgroup (before it creates anything). The returned file
    /// must outlive the spawn.
    pub fn enter(&self, cmd: &mut Command) -> std::fs::File {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let fd = procs.as_raw_fd();
        // SAFETY: write is async-signal-safe; the caller keeps `procs` open over the spawn.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writer.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        procs
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
