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

    /// The ids of the programs attached to this cgroup at each hook shaper uses (cgroup_skb
    /// ingress and egress, sock_create, sock_ops, sock_release), from the kernel
    /// (BPF_PROG_QUERY), with the hook's name.
    pub fn attached_programs(&self) -> Vec<(&'static str, u32)> {
        // enum bpf_attach_type and enum bpf_cmd (linux/bpf.h; not in the libc crate).
        const HOOKS: [(&str, u32); 5] = [
            ("ingress", 0),
            ("egress", 1),
            ("sock_create", 2),
            ("sock_ops", 3),
            ("sock_release", 34),
        ];
        const BPF_PROG_QUERY: libc::c_long = 16;
        let dir = std::fs::File::open(&self.dir).expect("open the cgroup");
        let mut found = Vec::new();
        for (hook, attach_type) in HOOKS {
            let mut ids = [0_u32; 64];
            // `union bpf_attr`'s query member, as far as BPF_PROG_QUERY reads it.
            #[repr(C)]
            #[derive(Default)]
            struct Query {
                target_fd: u32,
                attach_type: u32,
                query_flags: u32,
                attach_flags: u32,
                prog_ids: u64,
                prog_cnt: u32,
                pad: u32,
                rest: [u64; 4],
            }
            let mut q = Query {
                target_fd: dir.as_raw_fd() as u32,
                attach_type,
                prog_ids: ids.as_mut_ptr() as u64,
                prog_cnt: ids.len() as u32,
                ..Query::default()
            };
            // SAFETY: `q` is a valid bpf_attr prefix of the size passed; `ids` outlives the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_QUERY,
                    &mut q as *mut Query,
                    std::mem::size_of::<Query>() as u32,
                )
            };
            assert_eq!(
                r,
                0,
                "BPF_PROG_QUERY {hook}: {}",
                std::io::Error::last_os_error()
            );
            found.extend(ids[..q.prog_cnt as usize].iter().map(|id| (hook, *id)));
        }
        found
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
