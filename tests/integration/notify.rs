//! packaging/shaper-notify (issue 28, item 6) against a real session `dbus-daemon` run as a
//! normal user, with a stand-in for the desktop's notification service on it
//! (tests/fixtures/notification-service.py, python3-dbus): what a policy raises reaches the
//! user's desktop through `notify_command`, as the user (a session bus accepts no one else).

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::support::daemon::allowance;

const NOBODY: u32 = 65534;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A process as `nobody`, killed on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn as_nobody(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.uid(NOBODY).gid(NOBODY);
    cmd
}

/// A user's runtime dir (`RUNTIME/65534`, nobody's, 0700) with a session bus in it, and the
/// stand-in notification service on that bus, recording to `record`.
struct Desktop {
    runtime: tempfile::TempDir,
    record: PathBuf,
    _bus: Guard,
    service: Option<Guard>,
}

impl Desktop {
    fn start() -> Desktop {
        use std::os::unix::fs::PermissionsExt;
        let runtime = tempfile::tempdir().unwrap();
        std::fs::set_permissions(runtime.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let user = runtime.path().join(NOBODY.to_string());
        std::fs::create_dir(&user).unwrap();
        std::os::unix::fs::chown(&user, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = user.join("bus");
        let address = format!("unix:path={}", socket.display());
        let bus = as_nobody("dbus-daemon")
            .args(["--session", "--nofork", "--address", &address])
            .stdout(Stdio::null())
            .spawn()
            .expect("dbus-daemon (apt-get install dbus-daemon)");
        let bus = Guard(bus);
        let deadline = std::time::Instant::now() + allowance(2);
        while !socket.exists() {
            assert!(std::time::Instant::now() < deadline, "no session bus");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let record = user.join("notifications.jsonl");
        let mut service = as_nobody("/usr/bin/python3")
            .arg(root().join("tests/fixtures/notification-service.py"))
            .arg(&record)
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (apt-get install python3-dbus python3-gi)");
        let mut ready = String::new();
        std::io::BufReader::new(service.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready", "the stand-in owns its name");
        Desktop {
            runtime,
            record,
            _bus: bus,
            service: Some(Guard(service)),
        }
    }

    fn shown(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn notify(runtime: &Path, event: &str, message: &str) -> std::process::Output {
    Command::new(root().join("packaging/shaper-notify"))
        .env("SHAPER_NOTIFY_RUNTIME", runtime)
        .env("SHAPER_EVENT", event)
        .env("SHAPER_MESSAGE", message)
        .env("SHAPER_PERIOD", "month")
        .output()
        .unwrap()
}

#[test]
fn shaper_notify_shows_the_event_through_the_users_session_bus() {
    let mut desktop = Desktop::start();
    let out = notify(
        desktop.runtime.path(),
        "quota",
        "80 % of this month's 30 GB used",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("shown on 1 desktop(s)"), "{text}");
    let shown = desktop.shown();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["app"], "shaper");
    assert_eq!(shown[0]["summary"], "shaper: quota");
    assert_eq!(shown[0]["body"], "80 % of this month's 30 GB used");
    assert_eq!(shown[0]["urgency"], 2, "a quota warning is critical");
    assert_eq!(shown[0]["timeout"], 10000);

    // A user filter that leaves nobody out reaches no one, and says so.
    let out = Command::new(root().join("packaging/shaper-notify"))
        .env("SHAPER_NOTIFY_RUNTIME", desktop.runtime.path())
        .env("SHAPER_NOTIFY_USERS", "root")
        .env("SHAPER_MESSAGE", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // No notification service on the bus (a text login): nothing shown, exit 1 with the reason.
    desktop.service = None;
    let out = notify(desktop.runtime.path(), "quota", "95 % used");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no desktop reached (1 session bus(es)"),
        "{out:?}"
    );
    assert_eq!(desktop.shown().len(), 1);
}

/// End to end: a dry-run daemon whose policy raises a quota warning runs shaper-notify as its
/// `notify_command`, and the warning reaches the desktop once.
#[test]
fn a_policys_warning_reaches_the_desktop_through_notify_command() {
    let desktop = Desktop::start();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        "local shaper = require(\"shaper\")\n\
         function classes(ctx)\n\
         \x20 shaper.notify(\"quota\", \"80 % of this month's 30 GB used\", \"month\")\n\
         \x20 return {}\n\
         end\n\
         function classify(conn, ctx) return nil end\n",
    )
    .unwrap();
    let log = dir.path().join("shaper.log");
    let daemon = Command::new(env!("CARGO_BIN_EXE_shaper"))
        .args(["run", "--dry-run", "-i", "lo", "--interval", "200ms"])
        .arg("--script")
        .arg(&script)
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--notify-command")
        .arg(root().join("packaging/shaper-notify"))
        .env("SHAPER_NOTIFY_RUNTIME", desktop.runtime.path())
        .env("SHAPER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Guard(daemon);
    let deadline = std::time::Instant::now() + allowance(3);
    while desktop.shown().is_empty() {
        if let Some(exit) = daemon.0.try_wait().unwrap() {
            panic!(
                "shaper run exited with {exit}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing shown:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Later cycles raise it again; shaper passes it on once a month: after three more cycles
    // (counted by status, answered between cycles), still one notification.
    let cycles = || {
        let out = Command::new(env!("CARGO_BIN_EXE_shaper"))
            .args(["status", "--json", "--runtime-dir"])
            .arg(dir.path().join("run"))
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|s| s["cycles"].as_u64())
    };
    let deadline = std::time::Instant::now() + allowance(3);
    let from = loop {
        if let Some(c) = cycles() {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    while cycles().is_none_or(|c| c < from + 3) {
        assert!(std::time::Instant::now() < deadline, "cycles stopped");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let shown = desktop.shown();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["body"], "80 % of this month's 30 GB used");
    let _ = daemon.0.kill();
}
