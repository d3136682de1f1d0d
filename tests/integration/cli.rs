//! The command line as a user meets it: exit codes and messages.

use crate::support::{output, shaper, temp_file};

#[test]
fn version_and_help() {
    let out = output(shaper().arg("--version"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("shaper "));
    let out = output(shaper().arg("--help"));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("config"), "{help}");
}

#[test]
fn config_prints_file_values_overridden_by_flags() {
    let (_dir, path) = temp_file(
        "shaper.ron",
        "(uplink: \"10mbit\", downlink: \"50mbit\", month_start_day: 5)",
    );
    let out = output(
        shaper()
            .arg("--config")
            .arg(&path)
            .args(["config", "--uplink", "8mbit"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("uplink: \"8mbit\""), "flag wins: {text}");
    assert!(
        text.contains("downlink: \"50mbit\""),
        "file value kept: {text}"
    );
    assert!(text.contains("month_start_day: 5"), "{text}");
}

#[test]
fn config_with_unknown_key_fails_naming_key_and_line() {
    let (_dir, path) = temp_file(
        "shaper.ron",
        "(\n  interval: \"1s\",\n  uplnk: \"1mbit\",\n)\n",
    );
    let out = output(shaper().arg("--config").arg(&path).arg("config"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:", path.display())), "{err}");
    assert!(err.contains("uplnk"), "{err}");
}

#[test]
fn missing_explicit_config_is_an_error() {
    let out = output(shaper().args(["--config", "/nonexistent/shaper.ron", "config"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/shaper.ron"));
}

#[test]
fn ambiguous_unit_on_the_command_line_is_a_usage_error() {
    let out = output(shaper().args(["config", "--connection-rate", "5kbps"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("5kbps") && err.contains("5kbit") && err.contains("5KB/s"),
        "{err}"
    );
}

#[test]
fn recorded_snapshots_round_trip_through_ron() {
    let sample = shaper::cli::policy::sample_snapshot();
    let text = sample.to_ron();
    let back = shaper::process::Snapshot::from_ron(&text, "written").unwrap();
    assert_eq!(back, sample);
    let err =
        shaper::process::Snapshot::from_ron("(connections: [(socket: 5)])", "bad.ron").unwrap_err();
    assert!(err.starts_with("bad.ron:1:"), "{err}");
}

#[test]
fn check_reports_problems_with_exit_status() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = output(
        shaper()
            .arg("check")
            .arg(format!("{root}/lua/default-policy.lua")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    let (_dir, bad) = temp_file(
        "policy.lua",
        "classes = { bulk = {} }\nfunction classify(conn)\n  return \"bulkk\"\nend\n",
    );
    let out = output(shaper().arg("check").arg(&bad));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "policy.lua:3: classify returned unknown class \"bulkk\" (did you mean \
             `bulk`?); declared classes: bulk, default"
        ),
        "at the return, with a suggestion: {err}"
    );
    let (_dir2, broken) = temp_file("policy.lua", "function classify(conn\n");
    let out = output(shaper().arg("check").arg(&broken));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy.lua:2:"));
}

#[test]
fn check_warns_when_priorities_have_no_link_capacity_to_act_on() {
    let root = env!("CARGO_MANIFEST_DIR");
    let policy = format!("{root}/lua/default-policy.lua");
    let check = |config: &str| {
        let (_dir, path) = temp_file("shaper.ron", config);
        output(
            shaper()
                .arg("--config")
                .arg(&path)
                .arg("check")
                .arg(&policy),
        )
    };
    let out = check("()");
    assert!(out.status.success(), "a warning, not a failure: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: the policy uses priorities but uplink and downlink are not set")
            && err.contains("a little below the line's real rate"),
        "{err}"
    );
    let out = check("(uplink: \"18mbit\")");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("but downlink is not set") && err.contains("--downlink"),
        "{err}"
    );
    // --rate caps the link class too.
    let out = check("(uplink: \"18mbit\", rate: \"unlimited:90mbit\")");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{out:?}"
    );
    // A policy of ceilings only needs no capacity.
    let (_dir, ceilings) = temp_file(
        "policy.lua",
        "classes = { slow = { ceil = \"1mbit\" } }\nfunction classify(conn) return \"slow\" end\n",
    );
    let (_cdir, config) = temp_file("shaper.ron", "()");
    let out = output(
        shaper()
            .arg("--config")
            .arg(&config)
            .arg("check")
            .arg(&ceilings),
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{out:?}"
    );
}

#[test]
fn check_and_simulate_show_print_and_take_at_and_usage() {
    let (dir, script) = temp_file(
        "policy.lua",
        "classes = { slow = { ceil = \"1mbit\" } }\n\
         function classify(conn, ctx)\n\
         \x20 local used = ctx.usage(\"month\").total\n\
         \x20 print(\"wday\", ctx.time.wday, \"used\", used)\n\
         \x20 if ctx.time.wday == 7 and used > 1e9 then return \"slow\" end\n\
         end\n",
    );
    let usage = dir.path().join("usage.ron");
    std::fs::write(&usage, "(usage: { month: { \"link\": (down: \"2GB\") } })").unwrap();
    let snapshot = dir.path().join("sample.ron");
    std::fs::write(&snapshot, shaper::cli::policy::sample_snapshot().to_ron()).unwrap();
    let config = dir.path().join("shaper.ron");
    std::fs::write(&config, "()").unwrap();
    // A Saturday (wday 7) with 2 GB used: every connection is slowed.
    let run = |command: &str, at: &str| {
        let mut cmd = shaper();
        cmd.arg("--config").arg(&config).arg(command).arg(&script);
        if command == "simulate" {
            cmd.arg("--snapshot").arg(&snapshot);
        }
        cmd.args(["--at", at, "--usage"])
            .arg(&usage)
            .env("TZ", "UTC");
        let out = output(&mut cmd);
        assert!(out.status.success(), "{command}: {out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for command in ["check", "simulate"] {
        let (stdout, stderr) = run(command, "Sat 23:00");
        assert!(
            stderr.contains("policy.lua: wday\t7\tused\t2000000000"),
            "{command}: print is shown without -v: {stderr}"
        );
        assert!(stdout.contains("Sat "), "{command}: {stdout}");
        // The class is the next-to-last column.
        let rows = |text: &str, class: &str| {
            text.lines()
                .filter(|l| l.split_whitespace().rev().nth(1) == Some(class))
                .count()
        };
        assert_eq!(
            rows(&stdout, "slow"),
            shaper::cli::policy::sample_snapshot().connections.len(),
            "{command}: {stdout}"
        );
        // A Monday: nothing slowed.
        let (stdout, _) = run(command, "2026-11-23 10:00");
        assert_eq!(rows(&stdout, "slow"), 0, "{command}: {stdout}");
    }
}

#[test]
fn log_lines_carry_local_time_with_offset_and_no_colour_off_a_terminal() {
    let (dir, script) = temp_file(
        "policy.lua",
        "function classify(conn) print(\"hello\") end\n",
    );
    let config = dir.path().join("shaper.ron");
    std::fs::write(&config, "()").unwrap();
    let log = |env: &[(&str, &str)]| {
        let mut cmd = shaper();
        cmd.arg("--config").arg(&config).arg("check").arg(&script);
        cmd.env_remove("JOURNAL_STREAM").env_remove("NO_COLOR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = output(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr
            .lines()
            .find(|l| l.contains("policy.lua: hello"))
            .unwrap_or_else(|| panic!("no print line: {stderr}"))
            .to_string()
    };
    let line = log(&[("TZ", "Asia/Kolkata")]);
    assert!(!line.contains('\x1b'), "no colour in a pipe: {line:?}");
    let stamp = line.split_whitespace().next().unwrap();
    assert!(
        stamp.len() == "2026-11-23T19:20:05.123+05:30".len() && stamp.ends_with("+05:30"),
        "local time with its offset: {line:?}"
    );
    assert!(
        stamp.parse::<jiff::Timestamp>().is_ok(),
        "an RFC 3339 time: {stamp}"
    );
    // Under systemd the journal stamps lines; where no journald listens (as here, normally), the
    // lines still go to stderr, without a time.
    if !std::path::Path::new("/run/systemd/journal/socket").exists() {
        let line = log(&[("JOURNAL_STREAM", "8:1234")]);
        assert!(
            line.trim_start().starts_with("INFO"),
            "no timestamp: {line:?}"
        );
    }
}

#[test]
fn as_root_a_script_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, script) = temp_file("policy.lua", "function classify(conn) return nil end\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = output(shaper().arg("check").arg(&script));
    assert!(
        out.status.success(),
        "root-owned 0644 is accepted: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o664)).unwrap();
    let out = output(shaper().arg("check").arg(&script));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by its group (mode 0664)"), "{err}");
    assert!(
        err.contains(&format!("chmod go-w {}", script.display())),
        "{err}"
    );
    let out = output(
        shaper()
            .args(["check", "--allow-insecure-script"])
            .arg(&script),
    );
    assert!(out.status.success(), "the documented opt-out works");

    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&script, Some(65534), None).unwrap();
    let out = output(shaper().arg("check").arg(&script));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("owned by uid 65534, not root") && err.contains("chown root:root"),
        "{err}"
    );
}

#[test]
fn as_root_a_module_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("rules.lua");
    std::fs::write(&module, "return {}\n").unwrap();
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        "local rules = require(\"rules\")\nfunction classify(conn) return nil end\n",
    )
    .unwrap();
    let out = output(shaper().arg("check").arg(&script));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rules.lua: it is writable by its group and everyone"),
        "{err}"
    );
    assert!(
        err.contains("policy.lua:1:"),
        "the require is named too: {err}"
    );
}

/// `shaper plan` over the built-in sample, with `--config` naming a script that does not exist
/// (so, as `run` would, it falls back to the built-in policy), on an interface that does not
/// exist (planned against nothing installed). Returns stdout.
fn plan(dir: &std::path::Path, script: Option<&str>, args: &[&str]) -> String {
    let config = dir.join("shaper.ron");
    let missing = dir.join("no-such-policy.lua");
    std::fs::write(
        &config,
        format!("(script: {:?})", missing.display().to_string()),
    )
    .unwrap();
    let snapshot = dir.join("sample.ron");
    std::fs::write(&snapshot, shaper::cli::policy::sample_snapshot().to_ron()).unwrap();
    let mut cmd = shaper();
    cmd.arg("--config").arg(&config).arg("plan");
    cmd.arg("--snapshot").arg(&snapshot);
    cmd.args(["-i", "shpnone0", "--state-dir"])
        .arg(dir.join("state"));
    if let Some(s) = script {
        cmd.arg("--script").arg(s);
    }
    let out = output(cmd.args(args));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "plan failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn plan_uses_rates_connection_rates_and_the_builtin_policy() {
    let dir = tempfile::tempdir().unwrap();
    let ifb = shaper::shape::ifb_name("shpnone0");
    let plain = plan(dir.path(), None, &[]);
    assert!(plain.contains("# shpnone0: "), "{plain}");
    let limited = plan(
        dir.path(),
        None,
        &["--rate", "3mbit:6mbit", "--connection-rate", "1mbit:2mbit"],
    );
    // The link classes carry --rate, one direction per device.
    assert!(
        limited.contains(
            "tc class add dev shpnone0 parent 5a: classid 5a:1 htb rate 3mbit ceil 3mbit"
        ),
        "{limited}"
    );
    assert!(
        limited.contains(&format!(
            "tc class add dev {ifb} parent 5a: classid 5a:1 htb rate 6mbit ceil 6mbit"
        )),
        "{limited}"
    );
    // --connection-rate gives every sample connection its own leaf.
    let connections = shaper::cli::policy::sample_snapshot().connections.len();
    let leaves = |dev: &str, ceil: &str| {
        limited
            .lines()
            .filter(|l| l.starts_with(&format!("tc class add dev {dev} ")) && l.contains(ceil))
            .count()
    };
    assert_eq!(leaves("shpnone0", "ceil 1mbit"), connections, "{limited}");
    assert_eq!(leaves(&ifb, "ceil 2mbit"), connections, "{limited}");
    assert!(!plain.contains("ceil 1mbit"), "{plain}");
}

#[test]
fn plan_reads_the_saved_usage_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let (_script_dir, script) = temp_file(
        "quota.lua",
        "classes = { slow = { ceil = \"1mbit\" } }\n\
         function classify(conn, ctx)\n\
         \x20 if ctx.usage(\"month\").total > 1000000 then return \"slow\" end\n\
         end\n",
    );
    let script = script.to_str().unwrap();
    // Filters naming one of slow's leaves (`flowid`): its shared leaf or a flow bucket
    // (default's connections may have filters too, to default's buckets).
    let filters = |text: &str| {
        let slow: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("tc class add") && l.contains("  # slow/"))
            .filter_map(|l| l.split_whitespace().nth(8).map(|id| format!("flowid {id}")))
            .collect();
        text.lines()
            .filter(|l| slow.iter().any(|id| l.ends_with(id.as_str())))
            .count()
    };
    let fresh = plan(dir.path(), Some(script), &[]);
    assert_eq!(filters(&fresh), 0, "nothing used, nothing slowed:\n{fresh}");
    // This month's usage, saved in the state dir as the daemon saves it.
    let month = shaper::account::period_id(shaper::account::Period::Month, &jiff::Zoned::now(), 1);
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/usage.ron"),
        format!(
            "(version: 1, saved_at: 0, periods: {{ month: (id: {month:?}, usage: {{ \"link\": (down: \"2GB\") }}) }})"
        ),
    )
    .unwrap();
    let used = plan(dir.path(), Some(script), &[]);
    let connections = shaper::cli::policy::sample_snapshot().connections.len();
    assert_eq!(
        filters(&used),
        2 * connections,
        "the quota is over, so every connection goes to slow, both ways:\n{used}"
    );
}

#[test]
fn status_exits_3_when_no_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shaper"))
        .args(["status", "--runtime-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "the LSB code for not running");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shaper is not running") && stderr.contains("shaper run"),
        "{stderr}"
    );
    // A stale socket with nobody listening (a killed daemon's) is not running either.
    let socket = std::os::unix::net::UnixListener::bind(dir.path().join("shaper.sock")).unwrap();
    drop(socket);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shaper"))
        .args(["status", "--runtime-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

/// `shaper usage` over a history written by the library and today's usage file: per-period
/// rows for the link, per-name sums from `--since`, JSON integers, and a bar per row.
#[test]
fn usage_prints_the_history_by_link_and_by_process() {
    use shaper::account::history::{History, history_path};
    use shaper::account::{Period, Usage, UsageKey, period_id};
    use shaper::units::Size;
    let dir = tempfile::tempdir().unwrap();
    let usage_path = dir.path().join("usage.ron");
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let day = |ago: i64| {
        period_id(
            Period::Day,
            &now.checked_sub(jiff::Span::new().days(ago)).unwrap(),
            1,
        )
    };
    let figures = |pairs: &[(&str, u64)]| {
        pairs
            .iter()
            .map(|(k, down)| {
                let u = Usage {
                    up: Size::from_bytes(0),
                    down: Size::from_bytes(*down),
                };
                (k.parse::<UsageKey>().unwrap(), u)
            })
            .collect()
    };
    let mut history = History::default();
    history.archive(
        Period::Day,
        day(2),
        figures(&[("link", 4000), ("process:curl", 3000), ("process:ssh", 500)]),
    );
    history.archive(
        Period::Day,
        day(1),
        figures(&[("link", 2000), ("process:ssh", 1500)]),
    );
    history.save(&history_path(&usage_path)).unwrap();
    std::fs::write(
        &usage_path,
        format!(
            "(version: 1, saved_at: 0, periods: {{ day: (id: {:?}, usage: {{ \"link\": (down: \"1000B\"), \"process:curl\": (down: \"800B\") }}) }})",
            day(0)
        ),
    )
    .unwrap();
    let config = dir.path().join("shaper.ron");
    std::fs::write(&config, "()").unwrap();
    let run = |args: &[&str]| {
        let out = output(
            shaper()
                .env("TZ", "UTC")
                .arg("--config")
                .arg(&config)
                .args(["usage", "--state-dir"])
                .arg(dir.path())
                .args(args),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let json: serde_json::Value = serde_json::from_str(&run(&["--json"])).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{json}");
    assert_eq!(rows[0]["name"], day(2));
    assert_eq!(rows[0]["down"], 4000);
    assert_eq!(rows[2]["name"], day(0), "today last");
    assert_eq!(rows[2]["total"], 1000);
    // By process since two days ago: summed, biggest first.
    let since = day(2);
    let json: serde_json::Value =
        serde_json::from_str(&run(&["--by", "process", "--since", &since, "--json"])).unwrap();
    let names: Vec<(String, u64)> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["total"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("curl".to_string(), 3800), ("ssh".to_string(), 2000)]
    );
    // Without --since: today's only.
    let json: serde_json::Value =
        serde_json::from_str(&run(&["--by", "process", "--json"])).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 1, "{json}");
    // The table: a header, a bar per row (plain, not a terminal), the longest full.
    let table = run(&["--by", "process", "--since", &since]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[1].starts_with("PROCESS") && lines[1].contains("TOTAL"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("curl") && lines[2].ends_with(&"#".repeat(20)),
        "{table}"
    );
    assert!(
        lines[3].starts_with("ssh") && lines[3].ends_with(&"#".repeat(10)),
        "{table}"
    );
    // A bad date is a usage error naming the format.
    let out = output(shaper().args(["usage", "--since", "yesterday"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("YYYY-MM-DD"));
}

/// A story's policy with a typo on a branch no sample connection takes (mpv is not among them),
/// and a class that is declared but never returned.
const TYPO_POLICY: &str = "classes = {\n\
    \x20 video = { ceil = \"2mbit\" },\n\
    \x20 calls = { prio = 1 },\n\
    \x20 updates = { ceil = \"1mbit\" },\n\
    }\n\
    function classify(conn, ctx)\n\
    \x20 local name = conn.process and conn.process.name\n\
    \x20 if name == \"mpv\" then\n\
    \x20   return \"vidoe\"\n\
    \x20 elseif name == \"zoom\" then\n\
    \x20   return 'calls', \"5mbit\" -- return \"not-a-class\" in a comment\n\
    \x20 end\n\
    \x20 return nil\n\
    end\n";

/// Issue 28, item 2: `check` reads the class names classify returns: a literal no class
/// matches is a warning with the `return`'s file:line and the closest class, a declared class
/// never returned is one too, and `--strict` fails on them.
#[test]
fn check_finds_returned_class_names_no_class_matches_and_strict_fails_on_them() {
    let (_dir, script) = temp_file("policy.lua", TYPO_POLICY);
    let (_cdir, config) = temp_file("shaper.ron", "(uplink: \"18mbit\", downlink: \"90mbit\")");
    let check = |strict: bool| {
        let mut cmd = shaper();
        cmd.arg("--config").arg(&config).arg("check");
        if strict {
            cmd.arg("--strict");
        }
        output(cmd.arg(&script))
    };
    let out = check(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "warnings only: {err}");
    let path = script.display();
    assert!(
        err.contains(&format!(
            "warning: {path}:9: classify returns \"vidoe\", which no declared class matches \
             (did you mean `video`?); declared classes: calls, default, updates, video"
        )),
        "{err}"
    );
    for never in ["video", "updates"] {
        assert!(
            err.contains(&format!(
                "warning: {path}: class \"{never}\" is declared but classify never returns it"
            )),
            "{never}: {err}"
        );
    }
    assert!(
        !err.contains("\"calls\" is declared"),
        "zoom goes to calls: {err}"
    );
    assert!(!err.contains("not-a-class"), "comments are not code: {err}");
    let out = check(true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("3 class-name warning(s), failing with --strict"),
        "{err}"
    );
    // A policy whose every class is returned and declared passes --strict.
    let (_gdir, good) = temp_file(
        "policy.lua",
        &TYPO_POLICY
            .replace("\"vidoe\"", "\"video\"")
            .replace("  updates = { ceil = \"1mbit\" },\n", ""),
    );
    let out = output(
        shaper()
            .arg("--config")
            .arg(&config)
            .args(["check", "--strict"])
            .arg(&good),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A class name computed at run time is checked when it is returned: the error names the line
/// of the `return` (not of `function classify`) and the closest class, in `check` and in
/// `simulate`, and `simulate` warns about literal typos on branches its snapshot does not take.
#[test]
fn a_computed_class_name_is_reported_at_its_return_with_the_closest_class() {
    let (dir, script) = temp_file(
        "policy.lua",
        "classes = { video = {}, bulk = {} }\n\
         local function pick(conn)\n\
         \x20 return \"vid\" .. \"oe\"\n\
         end\n\
         function classify(conn, ctx)\n\
         \x20 if conn.remote_port == 22 then\n\
         \x20   local name = pick(conn)\n\
         \x20   return name\n\
         \x20 elseif conn.process and conn.process.name == \"mpv\" then\n\
         \x20   return \"bulkk\"\n\
         \x20 end\n\
         \x20 return \"bulk\"\n\
         end\n",
    );
    let snapshot = dir.path().join("sample.ron");
    std::fs::write(&snapshot, shaper::cli::policy::sample_snapshot().to_ron()).unwrap();
    let path = script.display();
    let runtime = format!(
        "error: {path}:8: classify returned unknown class \"vidoe\" (did you mean `video`?); \
         declared classes: bulk, default, video"
    );
    let out = output(shaper().arg("check").arg(&script));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&runtime), "{err}");
    let out = output(
        shaper()
            .arg("simulate")
            .arg(&script)
            .arg("--snapshot")
            .arg(&snapshot),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&runtime), "{err}");
    assert!(
        err.contains(&format!(
            "warning: {path}:10: classify returns \"bulkk\", which no declared class matches \
             (did you mean `bulk`?)"
        )),
        "{err}"
    );
    let out = output(
        shaper()
            .arg("simulate")
            .arg(&script)
            .arg("--snapshot")
            .arg(&snapshot)
            .arg("--json"),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains(":10: classify returns \"bulkk\"")),
        "{json:#}"
    );
}

/// Issue 28, item 4: the unit's ExecStartPre checks the script shaper.ron names (the one `run`
/// will load), not a fixed /etc/shaper/policy.lua. Run here with the test's config (the unit's
/// own is /etc/shaper/shaper.ron).
#[test]
fn the_units_pre_start_check_follows_the_configured_script() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/shaper.service"),
    )
    .unwrap();
    let pre: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .expect("an ExecStartPre= line")
        .split_whitespace()
        .collect();
    assert_eq!(pre[0], "/usr/bin/shaper", "{pre:?}");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("elsewhere.lua");
    std::fs::write(&broken, "function classify(conn\n").unwrap();
    let config = dir.path().join("shaper.ron");
    std::fs::write(
        &config,
        format!("(script: {:?})", broken.display().to_string()),
    )
    .unwrap();
    let run = || output(shaper().arg("--config").arg(&config).args(&pre[1..]));
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the broken script named: {err}");
    assert!(err.contains("elsewhere.lua:2:"), "{err}");
    std::fs::write(&broken, "function classify(conn) return nil end\n").unwrap();
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("elsewhere.lua: OK"));
}
