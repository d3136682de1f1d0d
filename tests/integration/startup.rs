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
