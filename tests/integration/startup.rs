//! `shaper run`'s start in a namespace: failures no waiting cures exit at once with the fix and
//! their own exit status; a missing interface is waited for, named with the ones that exist;
//! `status` shows each interface's state and whether the class ceilings are in force.

use std::os::unix::process::CommandExt;
use std::process::Stdio;

use crate::support::daemon::DaemonProcess;
use crate::support::netns::{Netns, NetnsPair};

/// A policy with a ceiling, so `status` has a class whose ceiling is (or is not) in force, and
/// priorities, which need a link capacity to act on.
const POLICY: &str = "classes = { slow = { ceil = \"3mbit\", prio = 6 } }\n\
                      function classify(conn) return \"slow\" end\n";

fn policy(dir: &std::path::Path) -> String {
    let path = dir.join("policy.lua");
    std::fs::write(&path, POLICY).unwrap();
    path.to_str().unwrap().to_string()
}

fn add_foreign_root(ns: &Netns) {
    let out = ns
        .command("tc")
        .args([
            "qdisc", "add", "dev", "veth0", "root", "handle", "1:", "htb",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn interface<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {status:#}"))
}

#[test]
fn without_cap_net_admin_run_exits_at_once_naming_the_capability() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("shaper.log");
    let mut command = pair.a.command(env!("CARGO_BIN_EXE_shaper"));
    // After the namespace is entered (as root), become `nobody`: no capabilities left.
    // SAFETY: setgroups, setgid and setuid are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .args(["run", "-i", "veth0", "--classifier", "u32", "--runtime-dir"])
        .arg(dir.path().join("run"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("SHAPER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = DaemonProcess {
        child: Some(child),
        dir: dir.path().to_path_buf(),
        log,
        inner: None,
    };
    let exit = daemon.exit_within(5);
    let text = daemon.log_text();
    assert_eq!(exit.code(), Some(4), "LSB's insufficient privilege: {text}");
    for fix in ["CAP_NET_ADMIN", "AmbientCapabilities=", "as root"] {
        assert!(text.contains(fix), "{fix} not named: {text}");
    }
    assert_eq!(
        text.matches("CAP_NET_ADMIN to install").count(),
        1,
        "said once, no retry loop: {text}"
    );
}

#[test]
fn a_mistyped_interface_is_waited_for_naming_the_interfaces_that_exist() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let script = policy(dir.path());
    // `-i veth0` (which the kit adds) and the typo `eht0`.
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["-i", "eht0", "--script", &script]);
    daemon.wait_for(10, "veth0 shaped, eht0 waiting", |s| {
        interface(s, "veth0")["state"] == "shaping" && interface(s, "eht0")["state"] == "waiting"
    });
    let log = daemon.log_text();
    assert!(
        log.contains("eht0: interface not present; waiting")
            && log.contains("interfaces here: lo, veth0; did you mean veth0?"),
        "{log}"
    );
    let status = daemon.status();
    assert_eq!(
        status["classes"][0]["in_force"], false,
        "not installed on eht0: {status:#}"
    );
    let warnings = status["warnings"].to_string();
    assert!(
        warnings.contains("priorities but uplink and downlink are not set"),
        "{status:#}"
    );
    assert!(log.contains("uplink and downlink are not set"), "{log}");
    let text = String::from_utf8_lossy(&daemon.control(&["status"]).stdout).into_owned();
    assert!(
        text.contains("warning: the policy uses priorities")
            && text.contains("interface eht0: waiting")
            && text.contains("3mbit (not in force)")
            && text.contains("not in force (eht0 is waiting)"),
        "{text}"
    );
}

#[test]
fn a_foreign_root_qdisc_on_the_only_interface_stops_the_start_naming_replace() {
    let pair = NetnsPair::new();
    add_foreign_root(&pair.a);
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = DaemonProcess::spawn(&pair.a, dir.path(), &[]);
    let exit = daemon.exit_within(10);
    let log = daemon.log_text();
    assert_eq!(exit.code(), Some(6), "nothing to shape: {log}");
    assert!(
        log.contains("nothing can be shaped") && log.contains("--replace"),
        "{log}"
    );
    let qdiscs = pair
        .a
        .command("tc")
        .args(["qdisc", "show"])
        .output()
        .unwrap();
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(
        qdiscs.contains("htb 1:") && !qdiscs.contains("5a:"),
        "the other qdisc stays, nothing of shaper's: {qdiscs}"
    );
}

#[test]
fn a_refused_interface_shows_in_status_while_another_is_waited_for() {
    let pair = NetnsPair::new();
    add_foreign_root(&pair.a);
    let dir = tempfile::tempdir().unwrap();
    let script = policy(dir.path());
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["-i", "ppp9", "--script", &script]);
    daemon.wait_for(10, "veth0 refused, ppp9 waiting", |s| {
        interface(s, "veth0")["state"] == "refused" && interface(s, "ppp9")["state"] == "waiting"
    });
    let status = daemon.status();
    let detail = interface(&status, "veth0")["detail"].as_str().unwrap_or("");
    assert!(detail.contains("--replace"), "{status:#}");
    assert_eq!(status["classes"][0]["in_force"], false, "{status:#}");
    let log = daemon.log_text();
    assert!(log.contains("--replace"), "{log}");
}

/// Runs `shaper ARGS` as `nobody` (no capabilities), with `env`.
fn as_nobody(args: &[&str], env: &[(&str, &std::path::Path)]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_shaper"));
    command
        .args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .env("SHAPER_LOG", "info")
        .uid(65534)
        .gid(65534);
    command
}

/// A world-readable folder (nobody must read the policy in it), removed on drop.
fn open_folder() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Issue 28, item 3: the exit-4 message says `--dry-run` needs no capabilities, and so it is: a
/// normal user's dry run keeps its runtime and state under `$XDG_RUNTIME_DIR/shaper` (root's
/// /run/shaper and /var/lib/shaper are not writable), answers `status` and `stop` from that
/// user, and says where it put them.
#[test]
fn a_normal_users_dry_run_keeps_its_files_in_the_users_runtime_dir() {
    use std::os::unix::fs::PermissionsExt;
    let files = open_folder();
    let script = policy(files.path());
    let xdg = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(xdg.path(), Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(xdg.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = [("XDG_RUNTIME_DIR", xdg.path())];
    let log = files.path().join("shaper.log");
    let mut daemon = as_nobody(
        &[
            "run",
            "--dry-run",
            "-i",
            "lo",
            "--interval",
            "200ms",
            "--script",
            &script,
        ],
        &env,
    );
    let child = daemon
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = DaemonProcess {
        child: Some(child),
        dir: xdg.path().join("shaper"),
        log,
        inner: None,
    };
    let deadline = std::time::Instant::now() + crate::support::daemon::allowance(10);
    let status = loop {
        let out = as_nobody(&["status", "--json"], &env).output().unwrap();
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        if let Some(exit) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
            daemon.child = None;
            panic!("the dry run exited with {exit}:\n{}", daemon.log_text());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status as nobody: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status["dry_run"], true, "{status:#}");
    assert!(xdg.path().join("shaper/shaper.sock").exists());
    let text = daemon.log_text();
    assert!(
        text.contains(&format!(
            "using {}/shaper as the runtime_dir",
            xdg.path().display()
        )) && text.contains(&format!(
            "using {}/shaper/state as the state_dir",
            xdg.path().display()
        )),
        "{text}"
    );
    let out = as_nobody(&["stop"], &env).output().unwrap();
    assert!(
        out.status.success(),
        "stop as the daemon's own user: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exit = daemon.exit_within(5);
    assert!(exit.success(), "{exit}: {}", daemon.log_text());
    assert!(
        daemon.log_text().contains("`shaper stop`: stopping"),
        "the stop is logged: {}",
        daemon.log_text()
    );
    assert!(
        xdg.path().join("shaper/state/usage.ron").exists(),
        "usage saved in the user's state dir"
    );
}

/// An error whose cause is printed in its message is not followed by that cause again
/// (`cannot open /root/x: Permission denied (os error 13): Permission denied (os error 13)`).
#[test]
fn a_refused_runtime_dir_says_its_cause_once() {
    let files = open_folder();
    let script = policy(files.path());
    let out = as_nobody(
        &[
            "run",
            "--dry-run",
            "-i",
            "lo",
            "--script",
            &script,
            "--runtime-dir",
            "/root/shaper-test-run",
            "--state-dir",
            "/root/shaper-test-state",
        ],
        &[],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("shaper: error:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("the runtime dir: cannot open /root/shaper-test-run: Permission denied"),
        "{line}"
    );
    assert_eq!(line.matches("Permission denied").count(), 1, "{line}");
}
