//! Every policy in examples/ run through `shaper simulate` over fixture snapshots, at chosen
//! times and usages, with the decisions asserted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::support::{output, shaper, temp_file};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The built-in sample (the one `shaper check` uses) as a fixture file.
fn sample() -> PathBuf {
    root().join("src/policy/sample.ron")
}

struct Simulation {
    json: serde_json::Value,
}

impl Simulation {
    fn run(script: &Path, snapshot: &Path, at: &str, usage: Option<&str>) -> Simulation {
        let mut cmd = shaper();
        cmd.arg("simulate")
            .arg(script)
            .arg("--snapshot")
            .arg(snapshot)
            .args(["--at", at, "--json"])
            .env("TZ", "UTC");
        let _usage_file = usage.map(|text| {
            let (dir, path) = temp_file("usage.ron", text);
            cmd.arg("--usage").arg(&path);
            dir
        });
        let out = output(&mut cmd);
        assert!(
            out.status.success(),
            "simulate {} failed:\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Simulation {
            json: serde_json::from_slice(&out.stdout).expect("simulate --json prints JSON"),
        }
    }

    fn example(name: &str, at: &str, usage: Option<&str>) -> Simulation {
        Simulation::run(&root().join("examples").join(name), &sample(), at, usage)
    }

    fn decisions(&self) -> &Vec<serde_json::Value> {
        self.json["decisions"].as_array().unwrap()
    }

    /// (class, limit) of every connection whose process or connection text contains `what`.
    fn of(&self, what: &str) -> Vec<(String, Option<String>)> {
        let found: Vec<_> = self
            .decisions()
            .iter()
            .filter(|d| {
                d["process"].as_str().is_some_and(|p| p.contains(what))
                    || d["connection"].as_str().unwrap().contains(what)
            })
            .map(|d| {
                (
                    d["class"].as_str().unwrap().to_string(),
                    d["limit"].as_str().map(str::to_string),
                )
            })
            .collect();
        assert!(!found.is_empty(), "no connection matches {what:?}");
        found
    }

    /// The single class every connection matching `what` is in.
    fn class(&self, what: &str) -> String {
        let all = self.of(what);
        assert!(all.iter().all(|c| c.0 == all[0].0), "{what}: {all:?}");
        all[0].0.clone()
    }

    fn limit(&self, what: &str) -> Option<String> {
        self.of(what)[0].1.clone()
    }

    fn class_def(&self, name: &str) -> &serde_json::Value {
        self.json["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no class {name}"))
    }

    fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for d in self.decisions() {
            *counts
                .entry(d["class"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        counts
    }
}

#[test]
fn evening_bulk_caps_downloads_only_in_the_evening() {
    let evening = Simulation::example("evening-bulk.lua", "2026-11-23 20:00", None);
    for bulk in ["transmission-da", "steam", "http (3100)"] {
        assert_eq!(evening.class(bulk), "bulk", "{bulk}");
    }
    assert_eq!(evening.class("ssh"), "interactive");
    assert_eq!(evening.class("1.1.1.1:53"), "interactive");
    assert_eq!(evening.class("Socket Process"), "default");
    assert_eq!(evening.class_def("bulk")["ceil"], "512kbit:2mbit");
    let morning = Simulation::example("evening-bulk.lua", "2026-11-23 10:00", None);
    assert_eq!(morning.class("steam"), "bulk");
    assert_eq!(
        morning.class_def("bulk")["ceil"],
        "unlimited",
        "no cap outside the window"
    );
}

#[test]
fn monthly_quota_lowers_class_ceilings_gradually() {
    let usage = |gb: u32| format!("(usage: {{ month: {{ \"link\": (down: \"{gb}GB\") }} }})");
    let early = Simulation::example("monthly-quota.lua", "2026-11-10 12:00", Some(&usage(50)));
    assert_eq!(early.class_def("default")["ceil"], "unlimited");
    let later = Simulation::example("monthly-quota.lua", "2026-11-20 12:00", Some(&usage(85)));
    assert_eq!(later.class_def("default")["ceil"], "10500kbit");
    assert_eq!(later.class_def("interactive")["ceil"], "10500kbit");
    let over = Simulation::example("monthly-quota.lua", "2026-11-28 12:00", Some(&usage(120)));
    assert_eq!(over.class_def("default")["ceil"], "512kbit");
    assert_eq!(
        over.class_def("interactive")["ceil"],
        "2mbit",
        "interactive keeps 2 Mbit/s"
    );
    assert_eq!(over.class("ssh"), "interactive");
    assert_eq!(over.class("steam"), "default");
    // As docs/policy.md advises: a class ceiling, never a limit per connection.
    for sim in [&early, &later, &over] {
        assert!(
            sim.decisions().iter().all(|d| d["limit"].is_null()),
            "{:#}",
            sim.json
        );
    }
    // The warnings it would raise: none at 50 %, 80 % at 85 %, both past the cap.
    let notices = |s: &Simulation| -> Vec<String> {
        s.json["notices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| format!("{} {} {}", n["name"], n["period"], n["message"]))
            .collect()
    };
    assert!(notices(&early).is_empty());
    let warn = |p: u32| format!("\"quota\" \"month\" \"{p} % of this month's 100 GB used\"");
    assert_eq!(notices(&later), [warn(80)]);
    assert_eq!(notices(&over), [warn(80), warn(95)]);
}

/// The sample connections with rsync's process renamed to `mpv` (a player streaming), for the
/// metered-4G story.
fn sample_with_mpv() -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(sample()).unwrap();
    assert!(text.contains("name: \"rsync\""));
    temp_file(
        "sample.ron",
        &text.replace("name: \"rsync\"", "name: \"mpv\""),
    )
}

/// examples/metered-4g.lua across day and night, under and over its 30 GB quota: calls first
/// and never slowed, streaming capped, updates blocked by day and capped at night, everything
/// lowered past the quota, with the warnings on the way.
#[test]
fn metered_4g_across_day_and_night_and_the_quota() {
    let (_dir, snapshot) = sample_with_mpv();
    let script = root().join("examples/metered-4g.lua");
    let usage = |gb: u32| format!("(usage: {{ month: {{ \"link\": (down: \"{gb}GB\") }} }})");
    let run = |at: &str, gb: u32| Simulation::run(&script, &snapshot, at, Some(&usage(gb)));

    let day = run("2026-11-23 12:00", 10);
    assert_eq!(day.class("zoom"), "calls");
    assert_eq!(day.class("mpv"), "streaming");
    assert_eq!(
        day.class("http (3100)"),
        "updates",
        "apt's method, by ancestry"
    );
    assert_eq!(day.class("steam"), "updates");
    assert_eq!(day.class("firefox (2300)"), "default");
    assert_eq!(day.class_def("calls")["prio"], 0);
    assert_eq!(day.class_def("streaming")["ceil"], "unlimited:3mbit");
    assert_eq!(day.class_def("updates")["block"], true, "blocked by day");
    assert_eq!(day.class_def("default")["ceil"], "unlimited");
    assert!(day.json["notices"].as_array().unwrap().is_empty());
    assert!(day.json["warnings"].as_array().unwrap().is_empty());

    let night = run("2026-11-23 23:30", 10);
    assert_eq!(night.class("http (3100)"), "updates");
    assert_eq!(
        night.class_def("updates")["block"],
        false,
        "allowed at night"
    );
    assert_eq!(night.class_def("updates")["ceil"], "5mbit");

    let warned = run("2026-11-23 12:00", 25);
    let messages: Vec<&str> = warned.json["notices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["80 % of this month's 30 GB used"]);

    for at in ["2026-11-23 12:00", "2026-11-23 23:30"] {
        let over = run(at, 31);
        assert_eq!(over.class("zoom"), "calls");
        assert!(over.class_def("calls")["ceil"] == "unlimited", "calls stay");
        assert_eq!(over.class_def("default")["ceil"], "1mbit", "{at}");
        assert_eq!(over.class_def("streaming")["ceil"], "512kbit", "{at}");
        assert_eq!(over.class_def("updates")["block"], true, "{at}: blocked");
        assert_eq!(over.json["notices"].as_array().unwrap().len(), 2, "{at}");
    }
    // Class ceilings only: no connection carries a limit of its own.
    assert!(day.decisions().iter().all(|d| d["limit"].is_null()));
}

#[test]
fn priorities_follow_process_and_ancestry() {
    let sim = Simulation::example("priorities.lua", "2026-11-23 12:00", None);
    assert_eq!(sim.class("ssh"), "interactive");
    assert_eq!(sim.class("zoom"), "interactive");
    assert_eq!(sim.class("firefox (2300)"), "browsing");
    assert_eq!(
        sim.class("Socket Process"),
        "browsing",
        "firefox's child, by ancestry"
    );
    assert_eq!(sim.class("transmission-da"), "torrents");
    assert_eq!(sim.class("syncthing"), "default");
    assert_eq!(sim.class_def("interactive")["prio"], 0);
    assert!(
        sim.decisions().iter().all(|d| d["limit"].is_null()),
        "no limits"
    );
}

#[test]
fn per_user_limits_follow_daily_usage() {
    let sim = Simulation::example("per-user.lua", "2026-11-23 12:00", None);
    assert_eq!(sim.class("rsync"), "root");
    assert_eq!(sim.class("systemd-resolve"), "services");
    assert_eq!(sim.class("nginx"), "services");
    assert_eq!(sim.class("ssh"), "users");
    assert_eq!(sim.limit("ssh"), None);
    assert_eq!(sim.class_def("users")["each"], "process");
    let heavy = Simulation::example(
        "per-user.lua",
        "2026-11-23 12:00",
        Some("(usage: { day: { \"user:alice\": (down: \"6GB\") } })"),
    );
    assert_eq!(heavy.limit("ssh").as_deref(), Some("2mbit"));
    assert_eq!(heavy.limit("transmission-da"), None, "another user");
}

#[test]
fn pyshaper_rules_port() {
    let script = root().join("examples/pyshaper-rules.lua");
    let fixture = root().join("tests/fixtures/pyshaper.ron");
    let sim = Simulation::run(&script, &fixture, "2026-11-23 12:00", None);
    assert_eq!(sim.class(":21 "), "slow");
    assert_eq!(sim.class("198.51.100.30:80 "), "web-bob");
    assert_eq!(sim.class("198.51.100.30:443 "), "default");
    assert_eq!(sim.class("192.0.2.9:873"), "backup");
    assert_eq!(sim.class("203.0.113.9:873"), "default");
    assert_eq!(sim.class_def("slow")["ceil"], "40kbit:unlimited", "5 KB/s");
    assert_eq!(
        sim.class_def("web-bob")["ceil"],
        "unlimited:512kbit",
        "64 KB/s"
    );
}

#[test]
fn netlimiter_scopes() {
    let sim = Simulation::example("netlimiter.lua", "2026-11-23 12:00", None);
    assert_eq!(sim.class("zoom"), "realtime");
    assert_eq!(sim.class("steam"), "default", "realtime is UDP only");
    assert_eq!(sim.class("http (3100)"), "updaters");
    assert_eq!(sim.class("syncthing"), "sync");
    assert_eq!(sim.class("rsync"), "backup");
    assert_eq!(sim.class_def("updaters")["each"], "process");
    assert_eq!(sim.class_def("sync")["each"], "connection");
    assert_eq!(sim.class_def("backup")["each"], "class");
}

#[test]
fn nbdkit_rates_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(root().join("examples/nbdkit-rates.lua"))
        .unwrap()
        .replace("/run/shaper/", &format!("{}/", dir.path().display()));
    let script = dir.path().join("nbdkit-rates.lua");
    std::fs::write(&script, source).unwrap();
    let none = Simulation::run(&script, &sample(), "2026-11-23 12:00", None);
    assert!(
        none.decisions().iter().all(|d| d["limit"].is_null()),
        "absent files: unlimited"
    );
    std::fs::write(dir.path().join("connection-rate"), "1mbit:4mbit\n").unwrap();
    std::fs::write(dir.path().join("rate"), "20mbit:100mbit\n").unwrap();
    let set = Simulation::run(&script, &sample(), "2026-11-23 12:00", None);
    assert_eq!(set.limit("ssh").as_deref(), Some("1mbit:4mbit"));
    assert_eq!(set.counts()["default"], 15);
    assert_eq!(set.class_def("default")["ceil"], "20mbit:100mbit");
}
