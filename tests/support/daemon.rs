//! A `shaper run` process inside a namespace, with its own runtime and state dirs; stopped with
//! SIGTERM (then killed) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;

/// CPU time (user + system) process `pid` has used, in USER_HZ ticks (10 ms), from /proc.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// How long a wait for something the daemon must do allows, when it normally takes `secs`: a
/// wait is a hang detector, not a speed test, so a loaded machine (the suite beside a build, a
/// debug binary on an emulated VM) gets ten times that, and at least a minute. A test that
/// passes only when something happens fast is a benchmark.
pub fn allowance(secs: u64) -> Duration {
    Duration::from_secs(secs.saturating_mul(10).max(60))
}

/// Waits until `ok()` holds, which normally takes up to `secs`, or panics after the
/// [`allowance`] with `what` and the last `ok`'s explanation.
pub fn wait_until(secs: u64, what: &str, mut ok: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + allowance(secs);
    loop {
        match ok() {
            Ok(()) => return,
            Err(why) => assert!(Instant::now() < deadline, "{what}: not reached; {why}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first child of `pid` (as `/proc/<pid>/task/<pid>/children` lists it), once it has one:
/// what `unshare --fork` or `nsenter` started.
pub fn first_child(pid: u32, what: &str) -> u32 {
    let mut child = None;
    wait_until(2, what, || {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        child = children
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok());
        child
            .map(|_| ())
            .ok_or_else(|| format!("{pid} has no child yet"))
    });
    child.expect("a child")
}

pub struct DaemonProcess {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The daemon's own pid (in the test's PID namespace) when `child` is the `unshare` that
    /// started it in a PID namespace of its own: signals go to it (`unshare` ignores SIGTERM).
    pub inner: Option<u32>,
}

impl DaemonProcess {
    /// Starts `shaper run -i veth0 --interval 200ms --classifier u32 ARGS` (ARGS may set another
    /// interval or classifier) in `ns`, using `dir` for its runtime
    /// and state, and waits until it answers on its socket.
    pub fn start(ns: &Netns, dir: &Path, args: &[&str]) -> DaemonProcess {
        DaemonProcess::start_with_env(ns, dir, args, &[])
    }

    /// As [`DaemonProcess::start`], with `env` set for the daemon.
    pub fn start_with_env(
        ns: &Netns,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> DaemonProcess {
        let d = DaemonProcess::spawn_with_env(ns, dir, args, env, &[]);
        d.wait_answering()
    }

    /// As [`DaemonProcess::start_bpf_policy`], with the daemon in a PID namespace of its own
    /// (`unshare --pid --fork --mount-proc`, in `ns`): its `/proc` numbers processes otherwise
    /// than the kernel's BPF helpers, as in a container. Processes for it to see are started
    /// with [`DaemonProcess::in_pid_namespace`].
    pub fn start_bpf_policy_in_own_pid_namespace(
        ns: &Netns,
        dir: &Path,
        cgroup: &super::cgroup::TestCgroup,
        policy: &str,
        args: &[&str],
    ) -> DaemonProcess {
        let script = dir.join("policy.lua");
        std::fs::write(&script, policy).unwrap();
        let cgroup = cgroup.dir.to_str().expect("a UTF-8 cgroup path");
        let mut all = vec![
            "--classifier",
            "bpf",
            "--cgroup",
            cgroup,
            "--script",
            script.to_str().expect("a UTF-8 path"),
        ];
        all.extend_from_slice(args);
        let unshare = [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGTERM",
        ];
        let mut d = DaemonProcess::spawn_with_env(ns, dir, &all, &[], &unshare);
        let outer = d.pid();
        d.inner = Some(first_child(outer, "unshare starting the daemon"));
        let d = d.wait_answering();
        d.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
        d
    }

    /// A command that runs `program` in the daemon's PID (and mount) namespace, in `ns`: a
    /// process the daemon sees under its own pid numbers. Only for a daemon started with
    /// [`DaemonProcess::start_bpf_policy_in_own_pid_namespace`].
    pub fn in_pid_namespace(&self, ns: &Netns, program: &str) -> std::process::Command {
        let inner = self.inner.expect("a daemon in a PID namespace of its own");
        let mut cmd = ns.command("nsenter");
        cmd.args([
            "--target",
            &inner.to_string(),
            "--pid",
            "--mount",
            "--",
            program,
        ]);
        cmd
    }

    /// Waits until the daemon answers on its socket.
    fn wait_answering(mut self) -> DaemonProcess {
        let d = &mut self;
        // The socket answers once the first cycle has applied its plan: seconds for a tree of
        // 10,000 classes (the daemon benchmark).
        let deadline = Instant::now() + Duration::from_secs(60);
        // The socket file of a killed daemon may still be there: wait until one answers.
        while std::os::unix::net::UnixStream::connect(d.dir.join("run/shaper.sock")).is_err() {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("shaper run exited with {status}:\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "shaper run did not start:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }

    /// As [`DaemonProcess::start`], with the BPF classifier on `cgroup` (`--classifier bpf
    /// --cgroup DIR` added to `args`).
    pub fn start_bpf(
        ns: &Netns,
        dir: &Path,
        cgroup: &super::cgroup::TestCgroup,
        args: &[&str],
    ) -> DaemonProcess {
        let cgroup = cgroup.dir.to_str().expect("a UTF-8 cgroup path");
        let mut all = vec!["--classifier", "bpf", "--cgroup", cgroup];
        all.extend_from_slice(args);
        DaemonProcess::start(ns, dir, &all)
    }

    /// Writes `policy` to `dir/policy.lua`, starts a daemon on it with the BPF classifier on
    /// `cgroup` (and `args`), and waits until it shapes.
    pub fn start_bpf_policy(
        ns: &Netns,
        dir: &Path,
        cgroup: &super::cgroup::TestCgroup,
        policy: &str,
        args: &[&str],
    ) -> DaemonProcess {
        let script = dir.join("policy.lua");
        std::fs::write(&script, policy).unwrap();
        let mut all = vec!["--script", script.to_str().expect("a UTF-8 path")];
        all.extend_from_slice(args);
        let daemon = DaemonProcess::start_bpf(ns, dir, cgroup, &all);
        daemon.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
        daemon
    }

    /// Starts without waiting (for tests of refusals).
    pub fn spawn(ns: &Netns, dir: &Path, args: &[&str]) -> DaemonProcess {
        DaemonProcess::spawn_with_env(ns, dir, args, &[], &[])
    }

    /// Spawns the daemon in `ns`, under `wrapper` (a command and its arguments, before the
    /// daemon's) if not empty.
    fn spawn_with_env(
        ns: &Netns,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> DaemonProcess {
        let log = dir.join(format!(
            "shaper-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let shaper = env!("CARGO_BIN_EXE_shaper");
        let mut command = match wrapper {
            [] => ns.command(shaper),
            [program, rest @ ..] => {
                let mut c = ns.command(program);
                c.args(rest).arg(shaper);
                c
            }
        };
        let child = command
            .arg("run")
            .args(["-i", "veth0", "--usage-flush-interval", "1s"])
            .args(if args.contains(&"--interval") {
                &[][..]
            } else {
                &["--interval", "200ms"][..]
            })
            // The BPF classifier attaches to a cgroup: only to one a test made and names.
            .args(if args.contains(&"--classifier") {
                &[][..]
            } else {
                &["--classifier", "u32"][..]
            })
            .arg("--runtime-dir")
            .arg(dir.join("run"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(args)
            .env("SHAPER_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start shaper run");
        DaemonProcess {
            child: Some(child),
            dir: dir.to_path_buf(),
            log,
            inner: None,
        }
    }

    /// Waits for the daemon to exit (a refusal at start), which normally takes `secs`; panics
    /// with the log if it is still running after the [`allowance`] (the guard then stops it).
    pub fn exit_within(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + allowance(secs);
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {:?}:\n{}",
                allowance(secs),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `shaper COMMAND --runtime-dir …` against this daemon.
    pub fn control(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_shaper"))
            .args(args)
            .arg("--runtime-dir")
            .arg(self.dir.join("run"))
            .output()
            .unwrap()
    }

    /// `shaper status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.control(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `shaper status --all --json` (with every connection).
    pub fn status_all(&self) -> serde_json::Value {
        let out = self.control(&["status", "--all", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until `ok(status)` holds, which normally takes up to `secs`, or panics after the
    /// [`allowance`] with the last status and the log.
    pub fn wait_for(&self, secs: u64, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
        self.wait_on(&["status", "--json"], secs, what, ok);
    }

    /// [`Self::wait_for`] on `status --all --json` (with every connection).
    pub fn wait_for_all(&self, secs: u64, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
        self.wait_on(&["status", "--all", "--json"], secs, what, ok);
    }

    fn wait_on(
        &self,
        command: &[&str],
        secs: u64,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + allowance(secs);
        loop {
            // A daemon only spawned may not answer yet.
            let out = self.control(command);
            let s = match serde_json::from_slice(&out.stdout) {
                Ok(s) if out.status.success() => s,
                _ => serde_json::Value::String(String::from_utf8_lossy(&out.stderr).into()),
            };
            if s.is_object() && ok(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not reached; status {s:#}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `n` whole cycles have run after this call: what a test waits for instead of
    /// sleeping "long enough" before asserting that something did *not* change. (Status is
    /// answered between cycles, so a count read here is of finished cycles.)
    pub fn cycles_pass(&self, n: u64) {
        let count = |s: &serde_json::Value| s["cycles"].as_u64().expect("a cycle count");
        let from = count(&self.status());
        self.wait_for(n, &format!("{n} cycles after cycle {from}"), |s| {
            count(s) >= from + n
        });
    }

    /// Waits until the log contains `text`, which normally takes up to `secs`.
    pub fn wait_for_log(&self, secs: u64, text: &str) {
        let deadline = Instant::now() + allowance(secs);
        while !self.log_text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} not logged:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal and waits for the process.
    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = self.inner.unwrap_or(child.id());
        // SAFETY: plain syscall on our child's (or its child's) pid.
        unsafe { libc::kill(pid as i32, sig) };
        child.wait().unwrap()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = self.inner.unwrap_or(child.id());
            // SAFETY: plain syscall on our child's (or its child's) pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
